"DA-VSN: the step's losses against an independent computation, where gradients flow, and exact resume with the discriminators."
import pytest
import torch
import torch.nn.functional as F

from tps.config import apply_overrides
from tps.presets import get_preset
from tps.model import TPSNet
from tps.augment import to_input
from tps.steps import StepContext, random_batches
from tps.davsn import step_davsn, davsn_extras, DISCRIMINATORS
from test_train import _child


def _setup(seed=0, C=4):
    cfg = apply_overrides(get_preset('smoke'), {'train.method': 'davsn', 'model.fusion': 'splat', 'model.splat': 'last',
                                                 'model.num_classes': C})
    torch.manual_seed(seed)
    net = TPSNet('resnet18', C, fusion='splat', splat='last', bn='frozen')
    ex = davsn_extras(cfg, 'cpu')
    return cfg, net, ex


def test_losses_equal_an_independent_computation():
    "Source CE, the generator's BCE terms and the discriminators' halves, written out with plain torch from the network's outputs."
    cfg, net, ex = _setup()
    src, tgt = random_batches(cfg, seed=3)[0]
    with torch.no_grad():
        so = net(to_input(src['d']), to_input(src['c']), src['flow_dc'])
        to = net(to_input(tgt['d']), to_input(tgt['c']), tgt['flow_dc'])
    up = lambda x, size: F.interpolate(x, size=size, mode='bilinear', align_corners=True)
    lab = src['label'].long()
    keep = lab != 255
    ce = lambda s: -(up(s, lab.shape[-2:]).log_softmax(1).gather(1, lab.clamp(max=3)[:, None])[:, 0][keep]).mean()
    want_src = ce(so.fused_main) + 0.1 * ce(so.fused_aux)
    sig = lambda z, y: -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    Ht = tgt['d'].shape[-2:]
    D = lambda n, a, b: ex[n](torch.softmax(up(torch.cat([a, b], 1), Ht), 1))
    with torch.no_grad():
        want_sta = sig(D('d_sta_main', to.cf_main, to.kf_main), 0.0)
        want_sa = sig(D('d_sa_main', to.cf_main, to.cf_main), 0.0)
        want_d_tgt = sum(sig(D(n, a, b), 1.0) / 2 for n, a, b in (('d_sta_main', to.cf_main, to.kf_main),
                         ('d_sta_aux', to.cf_aux, to.kf_aux), ('d_sa_main', to.cf_main, to.cf_main), ('d_sa_aux', to.cf_aux, to.cf_aux)))
    terms = step_davsn(StepContext(net, cfg, torch.Generator().manual_seed(0), torch.device('cpu'), extras=ex), src, tgt)
    assert abs(float(terms['src']) - float(want_src)) < 1e-4
    assert abs(float(terms['tgt_adv_sta']) - float(want_sta)) < 1e-5 and abs(float(terms['tgt_adv_sa']) - float(want_sa)) < 1e-5
    assert abs(float(terms['d_tgt']) - float(want_d_tgt)) < 1e-5


def test_gradients_go_only_where_the_reference_sends_them():
    "The fusion conv learns from the source CE only; the network's gradient is clipped to norm 1; every discriminator moves."
    cfg, net, ex = _setup(1)
    src, tgt = random_batches(cfg, seed=1)[0]
    ctx = StepContext(net, cfg, torch.Generator().manual_seed(0), torch.device('cpu'), extras=ex)
    before = {n: [p.detach().clone() for p in ex[n].parameters()] for n in DISCRIMINATORS}
    terms = step_davsn(ctx, src, tgt)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
    assert float(terms['grad_norm']) > 1 and abs(float(norm) - 1) < 1e-4              # clipped to 1
    g_sf = net.sf_layer.weight.grad.clone()
    # the source loss alone gives the fusion conv the same (pre-clip) direction: the target terms never reach it
    net.zero_grad()
    so = net(to_input(src['d']), to_input(src['c']), src['flow_dc'])
    from tps.losses import seg_loss
    seg_loss(so.fused_main, so.fused_aux, src['label'])['loss'].backward()
    a, b = g_sf.flatten(), net.sf_layer.weight.grad.flatten()
    assert torch.allclose(a / a.norm(), b / b.norm(), atol=1e-5)
    for n in DISCRIMINATORS: assert any(not torch.equal(x, y) for x, y in zip(before[n], ex[n].parameters())), n


@pytest.mark.slow   # a training subprocess killed and resumed
def test_resume_after_sigkill_is_exact_with_discriminators(smoke_config, tmp_path):
    "A DA-VSN run killed after its iteration-2 checkpoint and resumed ends with the uninterrupted run's network and discriminators."
    from tps.runs import load_training_checkpoint
    cfg = smoke_config('davsn', iters=4, save_every=2)
    cfg.model.fusion = 'splat'
    full = _child(cfg, tmp_path/'full', -1, tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _child(cfg, tmp_path/'killed', 2, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cfg.train.resume = str(tmp_path/'killed')
    resumed = _child(cfg, tmp_path/'killed', -1, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_training_checkpoint(tmp_path/'full'/'checkpoints'/'iter_0000004.pth')
    b = load_training_checkpoint(tmp_path/'killed'/'checkpoints'/'iter_0000004.pth')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for n in DISCRIMINATORS:
        assert all(torch.equal(a['extras'][n][k], b['extras'][n][k]) for k in a['extras'][n]), n
        sa, sb = a['extras'][f'opt_{n}']['state'], b['extras'][f'opt_{n}']['state']
        assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) for i in sa)


def test_speed_yardstick_computes_the_same_step(smoke_config):
    "davsn_speed's Python-loop splatting is a yardstick for the same computation: with the 'last' rule, same loss terms."
    from tps.tools.davsn_speed import davsn_speed
    cfg = smoke_config('davsn')
    cfg.model.splat = 'last'
    r = davsn_speed(cfg, device='cpu', warmup=1, iters=2)
    assert set(r['s_per_iter']) == {'tps', 'davsn', 'davsn_python_splat'} and all(v > 0 for v in r['s_per_iter'].values())
    a, b = r['timings']['davsn']['loss_terms'], r['timings']['davsn_python_splat']['loss_terms']
    assert set(a) == set(b) and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a), (a, b)
    assert r['davsn_over_tps'] == r['s_per_iter']['davsn'] / r['s_per_iter']['tps']


@pytest.mark.parametrize('base', ['syn2city', 'viper2city'])
def test_davsn_presets_are_the_published_runs(base):
    "`syn2city_davsn` / `viper2city_davsn`: the paper preset with DA-VSN's published recipe (`DAVSN_PAPER`), nothing else."
    from tps.config import validate
    from tps.presets import DAVSN_PAPER, get_preset, preset_diff
    c = validate(get_preset(f'{base}_davsn'))
    assert (c.train.method, c.model.fusion, c.model.splat) == ('davsn', 'splat', 'last')
    assert (c.train.lr, c.train.iters, c.train.save_every) == (2.5e-4, 120000, 1000)
    assert set(preset_diff(f'{base}_davsn')) <= set(DAVSN_PAPER) and c.data == get_preset(base).data

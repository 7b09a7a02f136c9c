"The switches beyond the paper (EMA teacher, pseudo-label quality weight): formulas, equality with TPS where they must agree, exact resume, and the paper presets untouched."
import pytest
import torch

from tps.config import apply_overrides
from tps.presets import get_preset


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _step(cfg, batches, extras=None, seed=0):
    "One training iteration of `cfg` from fixed weights on fixed batches; the network after it."
    from tps.model import build_model
    from tps.steps import StepContext
    from tps.train import build_optimizer, make_extras, method_step, seed_everything
    seed_everything(seed)
    net = build_model(cfg.model).train()
    opt = build_optimizer(net, cfg.train)
    ex = make_extras(cfg, torch.device('cpu')) if extras is None else extras
    ctx = StepContext(net, cfg, torch.Generator().manual_seed(seed), torch.device('cpu'), extras=ex)
    opt.zero_grad()
    terms = method_step(cfg.train.method)(ctx, *batches)
    opt.step()
    return net, terms, ex


def _smoke(**ov):
    cfg = get_preset('smoke')
    cfg.model.width = 16
    return apply_overrides(cfg, {'train.method': 'tps', **ov})


def _batches(cfg):
    from tps.steps import random_batches
    return random_batches(cfg, 1, seed=3)[0]


def test_ema_teacher_at_iteration_zero_is_the_student():
    "a = min(1 - 1/(0 + 1), alpha) = 0: the EMA teacher's pseudo labels are the student's, so the weights after one step are TPS's."
    base = _smoke(); ema = _smoke(**{'train.teacher': 'ema'})
    b = _batches(base)
    n1, t1, _ = _step(base, b)
    n2, t2, ex = _step(ema, b)
    assert set(ex) == {'ema_teacher'}
    for (k, p), q in zip(n1.named_parameters(), n2.parameters()): assert torch.equal(p, q), k
    assert torch.equal(t1['tgt'], t2['tgt'])
    # the teacher now holds the student's weights from before the step (alpha 0 copies them)
    assert not all(torch.equal(p, q) for p, q in zip(ex['ema_teacher'].parameters(), n2.parameters()))


def test_ema_teacher_differs_later_and_follows_the_formula():
    "`teacher_of` only names the teacher; `update_teacher` moves it (the step calls it first)."
    from tps.steps import teacher_of, update_teacher, StepContext
    from tps.model import build_model
    from tps.teacher import make_ema_teacher
    cfg = _smoke(**{'train.teacher': 'ema', 'train.ema_alpha': 0.9})
    net = build_model(cfg.model)
    teacher = make_ema_teacher(cfg.model)
    ctx = StepContext(net, cfg, torch.Generator(), torch.device('cpu'), extras={'ema_teacher': teacher})
    before = [p.clone() for p in teacher.parameters()]
    assert teacher_of(ctx) is teacher                              # no side effect: the weights are untouched
    assert all(torch.equal(p, q) for p, q in zip(before, teacher.parameters()))
    ctx.it = 0; assert update_teacher(ctx) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), net.parameters()))
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in net.parameters(): p.add_(1.0)
    ctx.it = 50; update_teacher(ctx)                               # a = min(1 - 1/51, 0.9) = 0.9
    for b, t, s in zip(before, teacher.parameters(), net.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    ctx.extras = {}
    with pytest.raises(KeyError, match='ema_teacher'): teacher_of(ctx)
    with pytest.raises(KeyError, match='ema_teacher'): update_teacher(ctx)
    self_ctx = StepContext(net, _smoke(), torch.Generator(), torch.device('cpu'))
    assert teacher_of(self_ctx) is net and update_teacher(self_ctx) is None


def test_quality_weight_enters_the_loss():
    "pl_weighting='quality' with threshold 0 weighs every fully labelled image 1 (= TPS); with threshold > 1 it weighs 0 (no target gradient)."
    b = None
    base = _smoke()
    b = _batches(base)
    n1, t1, _ = _step(base, b)
    n2, t2, _ = _step(_smoke(**{'train.pl_weighting': 'quality', 'train.quality_threshold': 0.0}), b)
    for p, q in zip(n1.parameters(), n2.parameters()): assert torch.allclose(p, q, atol=1e-7)
    assert float(t2['tgt_weight']) == 1.0
    n3, t3, _ = _step(_smoke(**{'train.pl_weighting': 'quality', 'train.quality_threshold': 1.0}), b)
    n4, t4, _ = _step(_smoke(**{'train.lambda_t': 0.0}), b)
    assert float(t3['tgt_weight']) == 0.0 and float(t3['tgt']) == 0.0
    for p, q in zip(n3.parameters(), n4.parameters()): assert torch.allclose(p, q, atol=1e-7)   # = no target loss


def test_quality_weight_independent_computation():
    from tps.teacher import quality_weight
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 5, (3, 7, 9), generator=g); lab[0, :2] = 255
    conf = torch.rand(3, 7, 9, generator=g)
    w = quality_weight(lab, conf, 0.6)
    for i in range(3):
        n = sum(1 for y in range(7) for x in range(9) if lab[i, y, x] != 255 and conf[i, y, x] >= 0.6)
        assert w[i].item() == pytest.approx(n / 63)


def test_ema_run_resumes_exactly(smoke_config, tmp_path):
    "The EMA teacher is saved in every checkpoint: a resumed run ends with the weights of an uninterrupted one."
    from tps.train import train, load_training_checkpoint
    full = train(smoke_config('tps', iters=4, save_every=2, teacher='ema', deterministic=True), run_dir=tmp_path/'full')
    part = train(smoke_config('tps', iters=2, save_every=2, teacher='ema', deterministic=True, max_iters=100), run_dir=tmp_path/'part')
    ck = load_training_checkpoint(part)
    assert 'ema_teacher' in ck['extras']
    resumed = train(smoke_config('tps', iters=4, save_every=2, teacher='ema', deterministic=True, resume=str(part)),
                    force=('train.iters',))
    a, b = load_training_checkpoint(full), load_training_checkpoint(resumed)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for k in a['extras']['ema_teacher']: assert torch.equal(a['extras']['ema_teacher'][k], b['extras']['ema_teacher'][k]), k


@pytest.mark.parametrize('name', ['syn2city', 'viper2city', 'syn2city_faithful', 'viper2city_faithful', 'demo'])
def test_paper_presets_keep_the_published_recipe(name):
    t = get_preset(name).train
    assert (t.teacher, t.pl_weighting, t.conf_threshold, t.class_mix) == ('self', 'none', 0.0, False)


def test_plus_presets_only_add_the_switches():
    from tps.config import config_to_dict
    from tps.presets import TPS_PLUS
    flat = lambda c: {f'{s}.{k}': v for s, d in config_to_dict(c).items() if isinstance(d, dict) for k, v in d.items()}
    for plus, base in (('tps_plus', 'demo'), ('syn2city_plus', 'syn2city'), ('viper2city_plus', 'viper2city')):
        a, b = flat(get_preset(plus)), flat(get_preset(base))
        assert {k for k in a if a[k] != b[k]} == {k for k, v in TPS_PLUS.items() if b[k] != v}, plus
        assert all(a[k] == v for k, v in TPS_PLUS.items())

"Tests of tps.tools.benchmark: FLOP counting against analytic counts and the paper's numbers, the baseline and fast steps, the loss-tracking check, and the papermill benchmark notebook at smoke size."
import json, math
import numpy as np
from pathlib import Path
import pytest
import torch
from tps.tools.benchmark import (count_flops, conv_flops, pass_flops, iteration_flops, make_runner, time_steps,
                                 tracking_check, smooth, count_host_syncs, matmul_tflops)
from tps.steps import random_batches
from tps.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def one_thread():
    "One CPU thread: these runs are tiny, and two threads on a busy 2-core machine oversubscribe it badly."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**train):
    cfg = get_preset('demo')
    cfg.data.source_size, cfg.data.target_size = (80, 48), (64, 32)
    for k, v in train.items(): setattr(cfg.train, k, v)
    return cfg


@pytest.mark.parametrize('cin,cout,k,stride,pad,dil,groups,hw', [
    (3, 64, 7, 2, 3, 1, 1, (37, 53)), (64, 32, 3, 1, 6, 6, 1, (20, 30)), (32, 32, 3, 2, 1, 1, 4, (17, 16)),
    (256, 15, 1, 1, 0, 1, 1, (9, 11))])
def test_conv_flops_match_analytic(cin, cout, k, stride, pad, dil, groups, hw):
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=False)
    x = torch.randn(2, cin, *hw)
    y, f, ops = count_flops(conv, x)
    assert f == conv_flops(cin, cout, k, y.shape[-2:], groups, batch=2), ops
    assert set(ops) == {'aten.convolution'}


def test_linear_flops():
    _, f, _ = count_flops(torch.nn.Linear(100, 30), torch.randn(7, 100))
    assert f == 2 * 7 * 100 * 30


def test_r101_flops_at_paper_sizes():
    f512 = pass_flops('resnet101', (1024, 512))
    assert abs(f512 / 0.75e12 - 1) < 0.05, f512
    it = iteration_flops('resnet101', (1280, 720), (1024, 512))
    assert abs(it['pass_source'] / 1.31e12 - 1) < 0.05 and abs(it['total'] / 9.8e12 - 1) < 0.05, it
    # the sum: source fwd+bwd + source kf + 2 teacher passes + student (fwd+bwd + kf) x E[r^2]
    assert it['total'] == sum(it[k] for k in ('source_cf_fwd_bwd', 'source_kf_fwd', 'teacher_fwd',
                                              'student_cf_fwd_bwd', 'student_kf_fwd'))
    assert 2.9 < it['source_cf_fwd_bwd'] / it['source_kf_fwd'] < 3.0  # backward ~ 2x forward, minus conv1's input grad
    assert abs(it['e_r2'] - (1 + 0.4 ** 2 / 12)) < 1e-12


@pytest.mark.parametrize('legacy_aug', [False, True])
def test_steps_run_with_same_finite_terms(legacy_aug):
    cfg = tiny_cfg(legacy_aug=legacy_aug)
    (src, tgt), = random_batches(cfg, 1)
    terms = {k: make_runner(cfg, k, 'cpu')(0, src, tgt) for k in ('baseline', 'fast')}
    assert set(terms['baseline']) == set(terms['fast']) >= {'src', 'tgt', 'src_ce_main', 'tgt_ce_main', 'tgt_valid'}
    assert all(math.isfinite(float(v)) for t in terms.values() for v in t.values())
    # same weights, data and random draws on the CPU: the source loss differs only through histogram matching
    assert abs(float(terms['baseline']['src']) - float(terms['fast']['src'])) < 0.05 * float(terms['baseline']['src'])


def test_baseline_rejects_other_methods():
    with pytest.raises(ValueError, match="method='tps'"):
        make_runner(tiny_cfg(method='source_only'), 'baseline', 'cpu')


def test_tracking_check_and_smooth():
    assert smooth([2, 4, 6], 10).tolist() == [2, 3, 4]
    r = tracking_check([1, 1, 1], [1, 1, 1.3], [2, 2, 2], window=1)
    assert r['within_noise'] and r['ratio'] == pytest.approx(0.1 / 0.9)
    assert not tracking_check([3, 3], [1, 1], [1.1, 1.1], window=1, tol=1.0)['within_noise']


def test_cpu_limits_and_no_sync_count():
    assert 0 < matmul_tflops('cpu', n=128, min_time=0.02) < 100
    assert count_host_syncs(lambda: None, 'cpu') is None


@cuda
def test_fast_step_on_cuda():
    cfg = tiny_cfg()
    cfg.model.channels_last = True
    batches = random_batches(cfg, 2)
    r = make_runner(cfg, 'fast', 'cuda')
    assert r.ctx.amp_dtype == torch.bfloat16 and r.ctx.channels_last
    res = time_steps(r, batches, warmup=2, iters=3)
    assert res['timer'] == 'cuda events' and res['ms_median'] > 0 and res['peak_mem_mb'] > 0
    assert all(math.isfinite(v) for v in res['loss_terms'].values())
    n = count_host_syncs(lambda: r(10, *batches[0]))
    assert isinstance(n, int) and n >= 0


@pytest.mark.slow   # papermill experiment run
def test_benchmark_notebook_smoke(tmp_path):
    pm = pytest.importorskip('papermill')
    out = tmp_path / 'bench'
    pm.execute_notebook(str(REPO / 'nbs/experiments/benchmark.ipynb'), str(tmp_path / 'benchmark.ipynb'),
                        parameters={'PROFILE': 'smoke', 'DEVICE': 'cpu', 'THREADS': 1, 'OUT_DIR': str(out)},
                        cwd=str(REPO), kernel_name='python3', language='python', progress_bar=False)
    r = json.loads((out / 'results.json').read_text())
    assert r['device_type'] == 'cpu' and 'CPU' in r['device'] and r['profile'] == 'smoke'
    sp = r['davsn_speed']                                             # TPS against DA-VSN, both ratios
    assert sp['davsn_over_tps'] == sp['s_per_iter']['davsn'] / sp['s_per_iter']['tps'] > 0
    assert sp['davsn_python_splat_over_tps'] > 0 and 'DA-VSN / TPS' in r['table']
    for k in ('baseline', 'fast'):
        s = r['steps'][k]
        assert s['ms_median'] > 0 and s['peak_mem_mb'] > 0 and 0 < s['mfu'] < 1
        assert r['eval'][k]['frames_per_s'] > 0
    assert abs(r['flops']['paper']['r101_pass_1024x512'] / 0.75e12 - 1) < 0.05
    assert r['loader']['source_samples_per_s'] > 0 and r['warp']['best']
    assert len(r['tracking']['curves']['fast']['total']) == r['params']['TRACK_ITERS']
    assert r['goals']['speedup_vs_baseline']['applies'] is False  # GPU goals do not apply on a CPU
    assert (out / 'benchmark.png').stat().st_size > 0 and 'ms/iter' in r['table']


# ---------------------------------------------------------------- the CPU roofline and the fast CPU path
from tps.tools.cpu_speed import (resnet_pass_flops, conv_flops_hooked, iteration_flops_counted, cpu_peak, mfu,
                                 summarise_accuracy, compare_levers, op_profile, FP32, FAST)
from tps.config import apply_overrides, ConfigError, validate


@pytest.mark.parametrize('arch,width,hw', [('resnet18', 32, (37, 70)), ('resnet18', 64, (64, 128)), ('resnet101', 16, (61, 99))])
def test_closed_form_pass_flops_match_the_counter(arch, width, hw):
    from tps.model import TPSNet
    net = TPSNet(arch, 15, width=width).to('meta')
    x = torch.empty(1, 3, *hw, device='meta')
    want = resnet_pass_flops(arch, hw[::-1], width)
    assert count_flops(net.single, x)[1] == want['total'] == conv_flops_hooked(net.single, x)[1]['forward']
    assert want['total'] == sum(v for k, v in want.items() if k != 'total')
    # conv1 by hand: 2 * 64/2... * 3 * 7 * 7 * Hout * Wout
    assert want['conv1'] == 2 * width * 3 * 49 * ((hw[0] - 1) // 2 + 1) * ((hw[1] - 1) // 2 + 1)


def test_iteration_flops_and_mfu_on_a_small_step():
    "A source-only step: the counter equals the closed form (cf fwd+bwd, kf fwd, fusion); MFU against a measured peak lies in (0, 1)."
    from tps.model import score_size
    cfg = apply_overrides(tiny_cfg(method='source_only'), FP32)
    r = make_runner(cfg, 'fast', 'cpu')
    batches = random_batches(cfg, 2)
    f = iteration_flops_counted(r, *batches[0])
    p = resnet_pass_flops('resnet18', (80, 48), 32)
    h, w = score_size(48, 80)
    sf = 2 * (2 * 15 * 30 * h * w)                      # the 1x1 fusion conv of the main and aux scores
    # forward of cf and kf, input and weight grads of cf (conv1 takes no input grad), the fusion's forward and grads
    assert f['conv_counted'] == f['formula'] == 4 * p['total'] - p['conv1'] + 3 * sf, (f, p)
    res = time_steps(r, batches, warmup=1, iters=3)
    peak = cpu_peak(torch.float32, reps=3)
    u = mfu(f['conv_counted'], res['ms_median'] / 1e3, peak['peak'])
    assert 0 < u < 1, (u, res['ms_median'], peak)
    with pytest.raises(ValueError, match='seconds > 0'):
        mfu(1e9, 0, 1.0)


def test_cpu_amp_reaches_the_step_and_presets():
    demo, smoke = get_preset('demo'), get_preset('smoke')
    assert (demo.train.cpu_amp, demo.model.channels_last) == ('bf16', True)
    assert (smoke.train.cpu_amp, smoke.model.channels_last) == ('fp32', False)
    for name in ('syn2city', 'viper2city', 'syn2city_faithful', 'viper2city_faithful'):
        assert get_preset(name).train.cpu_amp == 'fp32', name
    assert make_runner(tiny_cfg(), 'fast', 'cpu').ctx.amp_dtype == torch.bfloat16
    assert make_runner(apply_overrides(tiny_cfg(), FP32), 'fast', 'cpu').ctx.amp_dtype is None
    bad = get_preset('demo'); bad.train.cpu_amp = 'fp16'
    with pytest.raises(ConfigError, match='cpu_amp'):
        validate(bad)


def test_fast_cpu_step_tracks_fp32():
    "Same weights, batch and draws: the bf16 channels-last step's losses and gradients stay close to the fp32 step's."
    (src, tgt), = random_batches(tiny_cfg(), 1)
    out = {}
    for name, ov in (('fp32', FP32), ('fast', FAST)):
        r = make_runner(apply_overrides(tiny_cfg(), ov), 'fast', 'cpu')
        terms = r.step(r.ctx, src, tgt)
        out[name] = (terms, torch.cat([p.grad.flatten() for p in r.net.parameters() if p.grad is not None]))
    (tf, gf), (tb, gb) = out['fp32'], out['fast']
    for k in ('src', 'tgt'):
        assert abs(float(tb[k]) - float(tf[k])) < 0.03 * abs(float(tf[k])) + 1e-3, (k, float(tb[k]), float(tf[k]))
    assert not torch.equal(gf, gb)                                     # bf16 really ran
    assert torch.nn.functional.cosine_similarity(gf, gb, dim=0) > 0.95          # (pseudo-label argmaxes may flip)


def test_train_honours_cpu_amp(smoke_config):
    "The loop runs bf16 on the CPU when `train.cpu_amp='bf16'`: losses close to, and not equal to, the fp32 run's."
    from tps.train import train
    rec = {}
    for amp in ('fp32', 'bf16'):
        rd = train(smoke_config('source_only', iters=2, save_every=2, cpu_amp=amp))
        rec[amp] = [json.loads(l)['src'] for l in (rd/'metrics.jsonl').read_text().splitlines()]
    assert len(rec['bf16']) == len(rec['fp32']) == 2 and rec['bf16'] != rec['fp32']
    assert np.allclose(rec['bf16'], rec['fp32'], rtol=0.05), rec


def test_compare_levers_and_op_profile():
    cfg = tiny_cfg(method='source_only')
    batches = random_batches(cfg, 2)
    r = compare_levers(cfg, batches, {'today': {'overrides': FP32}, 'fast': {'overrides': FAST}, 'one': {'overrides': FAST, 'threads': 1}},
                       warmup=1, iters=2)
    lv = r['levers']
    assert set(lv) == {'today', 'fast', 'one'} and lv['today']['speedup'] == 1.0
    assert all(v['ms_median'] > 0 and v['speedup'] == lv['today']['ms_median'] / v['ms_median'] for v in lv.values())
    p = op_profile(make_runner(cfg, 'fast', 'cpu'), batches, iters=1, warmup=1)
    assert p['ms_per_iter'] > 0 and 'conv forward' in p['groups'] and 'conv backward' in p['groups']
    assert sum(p['groups'].values()) <= p['ms_per_iter'] * 1.05 * torch.get_num_threads() + 1


def test_summarise_accuracy_pairs_by_seed():
    run = lambda s, v, src, t: {'seed': s, 'miou_val': v, 'miou_source': src, 's_per_iter': t}
    runs = {'fp32': [run(0, 30.0, 60.0, 0.2), run(1, 32.0, 62.0, 0.2), run(2, 31.0, 61.0, 0.3)],
            'fast': [run(1, 31.0, 62.5, 0.1), run(0, 30.5, 60.0, 0.1), run(2, 31.0, 60.0, 0.1)]}
    p = summarise_accuracy(runs, 10)['pairs']['fast']
    assert p['miou_val']['per_seed'] == [-1.0, 0.5, 0.0] and p['miou_val']['mean'] == pytest.approx(-1 / 6)
    assert p['miou_val']['base_seed_std'] == pytest.approx(1.0) and p['miou_val']['within_spread']
    assert p['speedup']['per_seed'] == pytest.approx([2.0, 2.0, 3.0]) and p['speedup']['median'] == pytest.approx(2.0)


def test_recorded_cpu_accuracy():
    "The committed accuracy check of the fast CPU path: 3 seeds each, the demo's warm-up, its summary recomputable from its runs."
    from tps.experiments import DEMO_ITERS
    path = REPO/'results/benchmark/cpu_accuracy.json'
    r = json.loads(path.read_text())
    assert r['iters'] == DEMO_ITERS['warmup'] and sorted(r['runs']) == ['fast', 'fp32']
    assert [x['seed'] for x in r['runs']['fp32']] == [x['seed'] for x in r['runs']['fast']] == [0, 1, 2]
    again = summarise_accuracy(r['runs'], r['iters'])['pairs']
    assert json.loads(json.dumps(again)) == r['pairs']

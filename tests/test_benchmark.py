"Tests of tps.tools.benchmark: FLOP counting against analytic counts and the paper's numbers, the baseline and fast steps, the loss-tracking check, and the papermill benchmark notebook at smoke size."
import json, math
from pathlib import Path
import pytest
import torch
from tps.tools.benchmark import (count_flops, conv_flops, pass_flops, iteration_flops, make_runner, time_steps,
                                 tracking_check, smooth, count_host_syncs, matmul_tflops)
from tps.steps import random_batches
from tps.config import get_preset

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

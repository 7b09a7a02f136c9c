"Training: lr schedule per group (both modes), every method runs, the loop equals a plain loop, checkpoint pruning, NaN stop, exact resume after SIGKILL."
import json, os, random, subprocess, sys, textwrap
import numpy as np
import pytest
import torch

from tps.config import save_config
from tps.presets import get_preset

@pytest.fixture(autouse=True)
def one_thread():
    "One intra-op thread: tiny tensors gain nothing from more, and CI runs tests beside other jobs on 2 cores."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize('legacy', [False, True])
def test_lr_schedule_per_group(legacy):
    from tps.model import TPSNet
    from tps.train import build_optimizer, set_lr, poly_lr
    cfg = get_preset('demo').train
    cfg.lr, cfg.max_iters, cfg.power, cfg.legacy_lr, cfg.warmup_iters = 1e-3, 1000, 0.9, legacy, 0
    opt = build_optimizer(TPSNet('resnet18', 15), cfg)
    assert [g['name'] for g in opt.param_groups] == ['backbone', 'fusion', 'heads']
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2])
    assert opt.defaults['momentum'] == cfg.momentum and opt.defaults['weight_decay'] == cfg.weight_decay
    for it in (0, 1, 250, 999):
        p = 1e-3 * (1 - it / 1000) ** 0.9
        assert poly_lr(1e-3, it, 1000) == pytest.approx(p)
        lrs = set_lr(opt, it, cfg)
        want = [p, 10 * p, 1e-2] if legacy else [p, p, 10 * p]  # legacy: fusion 10x poly, heads constant 10x lr
        assert lrs == pytest.approx(want) and [g['lr'] for g in opt.param_groups] == pytest.approx(want)
    cfg.warmup_iters = 10                                      # a linear ramp over the first 10 iterations, then poly
    for it, ramp in ((0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0)):
        p = 1e-3 * (1 - it / 1000) ** 0.9 * ramp
        assert set_lr(opt, it, cfg)[0] == pytest.approx(p)


@pytest.mark.parametrize('method', ['source_only', 'pixmatch', 'tps', 'oracle'])
def test_method_runs(smoke_config, method):
    from tps.train import train, list_checkpoints, load_training_checkpoint
    cfg = smoke_config(method, iters=3, save_every=1, keep_last=2)
    run = train(cfg)
    assert [p.name for p in list_checkpoints(run)] == ['iter_0000002.pth', 'iter_0000003.pth']  # keep_last=2
    ck = load_training_checkpoint(run)
    assert ck['iter'] == 3 and ck['config']['train']['method'] == method and len(ck['rng']) == 1
    assert set(ck['rng'][0]) >= {'torch', 'numpy', 'python', 'generator', 'data'}
    recs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in recs] == [1, 2, 3]
    keys = {'source_only': ['src'], 'oracle': ['tgt'], 'tps': ['src', 'tgt'], 'pixmatch': ['src', 'tgt']}[method]
    for k in keys: assert all(np.isfinite(r[k]) for r in recs)
    assert set(recs[0]['lr']) == {'backbone', 'fusion', 'heads'} and recs[0]['s_per_iter'] > 0 and recs[0]['peak_mem_mb'] > 0
    assert (run/'done.json').exists() and (run/'config.yaml').exists()


def test_a_new_method_is_a_step_function_and_one_entry(smoke_config, monkeypatch):
    "A toy method (the source loss at half weight) registered with one `METHODS` entry trains through `train`."
    from tps.config import METHODS, Method
    from tps.steps import source_loss
    from tps.train import train, load_training_checkpoint
    def step_half_source(ctx, src, tgt):
        s = source_loss(ctx, src, tgt['d']); (0.5 * s['loss']).backward()
        return {'src': s['loss'].detach().float()}
    monkeypatch.setitem(METHODS, 'half_source', Method('Half source', step_half_source))
    toy, base = train(smoke_config('half_source', iters=2)), train(smoke_config('source_only', iters=2))
    recs = [[json.loads(l) for l in (r/'metrics.jsonl').read_text().splitlines()] for r in (toy, base)]
    assert recs[0][0]['src'] == recs[1][0]['src']                  # same start, same batch: the same first loss
    assert json.loads((toy/'done.json').read_text())['method'] == 'half_source'
    a, b = load_training_checkpoint(toy)['model'], load_training_checkpoint(base)['model']
    assert any(not torch.equal(a[k], b[k]) for k in a)              # but it trained with its own step


def test_nonfinite_loss_stops(smoke_config, tmp_path, monkeypatch):
    import tps.train as T
    from tps.config import Method
    calls = {'n': 0}
    orig = T.method_step('source_only')
    def poisoned(ctx, src, tgt):
        out = orig(ctx, src, tgt); calls['n'] += 1
        if calls['n'] >= 4: out['src'] = out['src'] * float('nan')  # iteration 3 (0-based) goes bad
        return out
    monkeypatch.setitem(T.METHODS, 'source_only', Method('Source-only', poisoned))
    cfg = smoke_config('source_only', iters=6, save_every=2, log_every=3)
    with pytest.raises(T.NonFiniteLossError, match=r"'src' at iteration 3") as e:
        T.train(cfg, run_dir=tmp_path/'run')
    assert 'iter_0000002.pth' in str(e.value)
    assert [p.name for p in T.list_checkpoints(tmp_path/'run')] == ['iter_0000002.pth']  # nothing saved after it
    sd = T.load_training_checkpoint(tmp_path/'run')['model']
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


_CHILD = textwrap.dedent('''
    import os, signal, sys
    import tps.train as T
    from tps.config import load_config
    cfg, run, kill_at = load_config(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    orig = T.save_checkpoint
    def save(path, state):
        out = orig(path, state)
        if state["iter"] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        return out
    T.save_checkpoint = save
    T.train(cfg, run_dir=run)
''')


def _child(cfg, run, kill_at, tmp_path):
    cpath = tmp_path/f'cfg_{run.name}.yaml'; save_config(cfg, cpath)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONHASHSEED': '0'}
    return subprocess.run([sys.executable, '-c', _CHILD, str(cpath), str(run), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow   # a training subprocess killed and resumed
def test_resume_after_sigkill_is_exact(smoke_config, tmp_path):
    "A run SIGKILLed right after its iteration-2 checkpoint and resumed ends with the uninterrupted run's weights."
    from tps.train import load_training_checkpoint
    cfg = smoke_config('tps', iters=5, save_every=2, flip_p=0.5)
    full = _child(cfg, tmp_path/'full', -1, tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _child(cfg, tmp_path/'killed', 2, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path/'killed'/'checkpoints'/'iter_0000004.pth').exists()
    cfg.train.resume = str(tmp_path/'killed')
    resumed = _child(cfg, tmp_path/'killed', -1, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_training_checkpoint(tmp_path/'full'/'checkpoints'/'iter_0000005.pth')
    b = load_training_checkpoint(tmp_path/'killed'/'checkpoints'/'iter_0000005.pth')
    assert a['model'].keys() == b['model'].keys()
    diff = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    recs = [json.loads(l)['iter'] for l in (tmp_path/'killed'/'metrics.jsonl').read_text().splitlines()]
    assert recs == [1, 2, 3, 4, 5]


def test_batched_teacher_pass_equals_two_passes():
    "With eval-mode BN the teacher's two frames share one backbone pass; the result equals the plain forward."
    from tps.model import TPSNet
    from tps.teacher import teacher_forward, _bn_batch_stats
    torch.manual_seed(0)
    net = TPSNet('resnet18', 5, bn='frozen').train()
    assert not _bn_batch_stats(net) and _bn_batch_stats(TPSNet('resnet18', 5).train())
    x1, x2, flow = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64), torch.randn(2, 2, 16, 32)
    a = teacher_forward(net, x1, x2, flow)
    with torch.no_grad(): b = net(x1, x2, flow)
    for u, v in zip(a, b): assert torch.allclose(u, v, atol=1e-4)


def _plain_loop(cfg, iters):
    "The same training written out plainly: data in the sampler's order, SGD with the warm-up and poly schedule, the step's losses."
    from torch.utils.data import DataLoader, DistributedSampler
    from tps.augment import to_input, match_histograms
    from tps.data.build import build_source, build_target
    from tps.losses import seg_loss
    from tps.model import build_model, param_groups
    t = cfg.train
    torch.use_deterministic_algorithms(True)
    random.seed(t.seed); np.random.seed(t.seed); torch.manual_seed(t.seed)
    def batches(ds, seed):
        epoch = 0
        while True:
            s = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True); s.set_epoch(epoch)
            yield from DataLoader(ds, batch_size=1, sampler=s)
            epoch += 1
    src_it = batches(build_source(cfg), t.seed) if t.method != 'oracle' else None
    tgt_it = batches(build_target(cfg, 'train'), t.seed + 1)
    net = build_model(cfg.model).train()
    opt = torch.optim.SGD(param_groups(net, t.lr), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    for it in range(iters):
        ramp = (it + 1) / t.warmup_iters if it < t.warmup_iters else 1.0          # linear warm-up, then poly decay
        for g in opt.param_groups: g['lr'] = t.lr * (1 - it / t.max_iters) ** t.power * ramp * g['lr_mult']
        src = next(src_it) if src_it is not None else None
        tgt = next(tgt_it)
        opt.zero_grad()
        if t.method == 'oracle':
            out = net(to_input(tgt['d']), to_input(tgt['c']), tgt['flow_dc'])
            loss = seg_loss(out.fused_main, out.fused_aux, tgt['label'], t.lambda_aux)['loss']
        else:
            fr = to_input(match_histograms(torch.cat([src['d'], src['c']]), torch.cat([tgt['d'], tgt['d']])))
            out = net(fr[:1], fr[1:], src['flow_dc'])
            loss = seg_loss(out.fused_main, out.fused_aux, src['label'], t.lambda_aux)['loss']
        loss.backward(); opt.step()
    return net.state_dict()


@pytest.mark.parametrize('method', ['source_only', 'oracle'])
def test_train_loop_equals_a_plain_loop(smoke_config, method):
    "Source-only and oracle through `train` (deterministic) end with exactly the weights of a plain loop."
    from tps.train import train, load_training_checkpoint
    cfg = smoke_config(method, iters=4, save_every=4)
    got = load_training_checkpoint(train(cfg))['model']
    want = _plain_loop(cfg, 4)
    assert got.keys() == want.keys()
    diff = [k for k in want if not torch.equal(got[k], want[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


# ---------------------------------------------------------------- the hot path: same numbers, no host syncs, compile
def _random_batches(n, seed=0, Hs=32, Ws=64, Ht=32, Wt=64, C=15):
    "`n` (src, tgt) pairs of random batches (batch 1) on the CPU, from one generator."
    g = torch.Generator().manual_seed(seed)
    img = lambda H, W: torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)
    flow = lambda H, W: torch.randn(1, 2, H, W, generator=g) * 2
    lab = lambda H, W: torch.randint(0, C, (1, H, W), generator=g, dtype=torch.uint8)
    return [({'d': img(Hs, Ws), 'c': img(Hs, Ws), 'flow_dc': flow(Hs, Ws), 'label': lab(Hs, Ws)},
             {**{k: img(Ht, Wt) for k in 'dcba'}, **{k: flow(Ht, Wt) for k in ('flow_dc', 'flow_db', 'flow_ba')},
              'label': lab(Ht, Wt)}) for _ in range(n)]


# Loss terms of three steps on CPU (seed 0 weights, CPU augmentation generator seeded 1234, batches of
# `_random_batches(3)`) recorded with the engine before its hot path was reworked (augmentation draws on the
# device generator, depthwise-convolution blur, torchvision hue, float64 histogram LUTs), and the generator's next
# draw after them (same number of draws consumed).
_RECORDED = {'tps': ([(3.089084, 2.571768), (11.965404, 0.206228), (6.653019, 0.266438)], 0.26340669),
             'pixmatch': ([(3.089084, 2.473315), (8.510943, 0.226532), (7.551837, 0.232168)], 0.01077944)}


@pytest.mark.parametrize('method', ['tps', 'pixmatch'])
def test_step_reproduces_recorded_losses(method):
    from tps.model import TPSNet
    from tps.train import StepContext, method_step, build_optimizer, set_lr, seed_everything
    cfg = get_preset('demo')
    cfg.train.method, cfg.train.flip_p = method, 0.5
    cfg.train.lr, cfg.train.warmup_iters, cfg.train.max_iters = 2.5e-3, 0, 300   # the values the losses were recorded with
    seed_everything(0)
    net = TPSNet('resnet18', 15).train()
    opt = build_optimizer(net, cfg.train)
    ctx = StepContext(net, cfg, torch.Generator().manual_seed(1234), torch.device('cpu'))
    got = []
    for it, (src, tgt) in enumerate(_random_batches(3)):
        set_lr(opt, it, cfg.train); opt.zero_grad(set_to_none=True)
        terms = method_step(method)(ctx, src, tgt); opt.step()
        got.append((float(terms['src']), float(terms['tgt'])))
    want, nxt = _RECORDED[method]
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4), (got, want)
    assert float(torch.rand(1, generator=ctx.generator)) == pytest.approx(nxt, abs=1e-7)  # same draws consumed


def test_augmentation_generator_is_on_the_cpu(smoke_config):
    from tps.train import train, load_training_checkpoint, StepContext
    run = train(smoke_config('tps', iters=1, save_every=1))
    state = load_training_checkpoint(run)['rng'][0]['generator']
    assert state.numel() == torch.Generator().get_state().numel()  # a CPU generator's state
    if torch.cuda.is_available():  # a device generator handed to a StepContext becomes a CPU one with its seed
        ctx = StepContext(None, get_preset('demo'), torch.Generator('cuda').manual_seed(7), torch.device('cuda'))
        assert ctx.generator.device.type == 'cpu' and ctx.generator.initial_seed() == 7


def _sync_sites(fn) -> list:
    "file:line of every host sync CUDA's sync debug mode reports while `fn()` runs."
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: fn()
        finally: torch.cuda.set_sync_debug_mode(0)
    return [f'{x.filename}:{x.lineno}' for x in w if 'synchroniz' in str(x.message).lower()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('method', ['tps', 'pixmatch', 'source_only', 'oracle'])
def test_step_has_no_host_sync_on_cuda(method):
    "Batch copy, one step (bf16) and the optimiser step run without a single host-device synchronisation."
    from tps.model import TPSNet
    from tps.train import StepContext, method_step, build_optimizer, set_lr
    from tps.data.core import to_device
    dev = torch.device('cuda')
    torch.backends.cudnn.benchmark = False  # benchmarking a new input size syncs (the student's size varies)
    cfg = get_preset('demo')
    cfg.train.method, cfg.train.flip_p = method, 0.5
    net = TPSNet('resnet18', 15).to(dev).train()
    opt = build_optimizer(net, cfg.train)
    assert opt.param_groups[0].get('fused')  # fused SGD on a GPU
    ctx = StepContext(net, cfg, torch.Generator().manual_seed(0), dev, torch.bfloat16)
    pinned = [tuple({k: v.pin_memory() for k, v in b.items()} for b in pair)
              for pair in _random_batches(2, 0, 48, 96, 64, 128)]
    terms = {}
    def one(it):
        src, tgt = (to_device(b, dev) for b in pinned[it % 2])
        set_lr(opt, it, cfg.train); opt.zero_grad(set_to_none=True)
        terms.update(method_step(method)(ctx, src, tgt)); opt.step()
    for it in range(3): one(it)  # warm-up: the warp kernel, blur matrices, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for it in range(3, 9): one(it)  # several draws: flipped and unflipped teacher pairs, blur radii
    except RuntimeError as e:
        torch.cuda.set_sync_debug_mode(0)
        sites = _sync_sites(lambda: one(9))
        pytest.fail(f"host sync in the training step ({e}); sync sites: {sites}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v).item() for v in terms.values())


def _inductor_ok() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(2)); return True
    except Exception:
        return False


def _compiled_run(smoke_config, tmp_path, monkeypatch, backend):
    import tps.train as T
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear()
    calls = []
    orig = T.compile_model
    def spy(net, **kw):
        calls.append(net)
        return orig(net, backend=backend, **kw)
    monkeypatch.setattr(T, 'compile_model', spy)
    cfg = smoke_config('tps', iters=2, save_every=2, compile=True, deterministic=False)
    run = T.train(cfg, run_dir=tmp_path/backend)
    assert len(calls) == 1 and 'single' in vars(calls[0])  # the per-frame pass was compiled in place
    graphs = counters['stats']['unique_graphs']
    # graphs per grad mode, not per input size (plus CPU conv-backend guards at these tiny sizes)
    assert 1 <= graphs <= 6 < torch._dynamo.config.recompile_limit, graphs
    recs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in recs] == [1, 2] and all(np.isfinite(r[k]) for r in recs for k in ('src', 'tgt'))
    eager = T.train(smoke_config('tps', iters=1, save_every=1, deterministic=False),
                    run_dir=tmp_path/'eager')
    e = json.loads((eager/'metrics.jsonl').read_text().splitlines()[0])
    assert recs[0]['src'] == pytest.approx(e['src'], rel=1e-3) and recs[0]['tgt'] == pytest.approx(e['tgt'], rel=1e-3)
    torch._dynamo.reset()


@pytest.mark.slow   # torch.compile
def test_compile_runs_two_iterations(smoke_config, tmp_path, monkeypatch):
    "train.compile=True compiles `single` (dynamic shapes) and trains; dynamo's tracing with the aot_eager backend."
    _compiled_run(smoke_config, tmp_path, monkeypatch, 'aot_eager')


@pytest.mark.skipif(os.environ.get('TPS_SLOW_TESTS') != '1', reason='inductor on a CPU compiles for minutes: TPS_SLOW_TESTS=1')
def test_compile_inductor_runs_two_iterations(smoke_config, tmp_path, monkeypatch):
    "The same with inductor, the default backend (about 3 min on 2 CPU cores)."
    if not _inductor_ok(): pytest.skip('torch.compile/inductor does not work here')
    _compiled_run(smoke_config, tmp_path, monkeypatch, 'inductor')

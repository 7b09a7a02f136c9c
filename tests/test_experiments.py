"Papermill runs of the experiment notebooks at smoke size, their outputs, and clear failures on bad parameters."
import json
from pathlib import Path
import pytest

pm = pytest.importorskip('papermill')
from tps.experiments import run_notebook, notebooks_dir
from tps.results import parse_table_miou

NB = notebooks_dir()
TINY = {'data.source_size': [80, 48], 'data.target_size': [64, 32], 'eval.input_size': [64, 32],
        'eval.label_size': [64, 32], 'train.log_every': 1}


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> Path:
    "A tiny synthetic benchmark: 2 train and 2 val snippets (one full snippet each), one source sequence."
    from tps.data.synthetic import make_synthetic
    out = tmp_path_factory.mktemp('syn')/'synthetic'
    make_synthetic(out=str(out), size=(64, 32), source_size=(80, 48), snippets=2, val_snippets=2, source_seqs=1,
                   source_frames=20, full_snippets=1, workers=1, progress=False)
    return out


@pytest.fixture(scope='module')
def adapt_run(tiny_data, tmp_path_factory) -> Path:
    "adapt.ipynb on the tiny data: all four methods, two seeds, a 2-iteration warm-up and 2 iterations each."
    out = tmp_path_factory.mktemp('adapt')
    run_notebook(NB/'adapt.ipynb', out/'adapt.ipynb', stream=False, parameters=dict(
        DATA_ROOT=str(tiny_data), METHODS=['source_only', 'pixmatch', 'tps', 'oracle'], SEEDS=[0, 1], ITERS=2,
        WARMUP_ITERS=2, DEVICE='cpu', OVERRIDES=TINY, OUT_ROOT=str(out), FIG_PREFIX='t_'))
    return out


@pytest.mark.slow   # papermill experiment runs
def test_adapt_outputs(adapt_run):
    out = adapt_run
    for f in ('adapt.ipynb', 'results.json', 'results.md', 'results.csv', 'figures/t_curves.png', 'figures/t_per_class.png'):
        assert (out/f).is_file() and (out/f).stat().st_size > 0, f
    res = json.loads((out/'results.json').read_text())
    ms = res['summary']['methods']
    assert list(ms) == ['source_only', 'pixmatch', 'tps', 'oracle']
    assert all(v['n'] == 2 and v['seeds'] == [0, 1] for v in ms.values())
    # one run folder per method x seed (+ the warm-ups), each with its config, metrics and a checkpoint
    recs = res['records']
    assert len(recs) == 2 * 5 and len({r['run_dir'] for r in recs}) == 10
    for r in recs:
        d = Path(r['run_dir'])
        assert (d/'config.yaml').is_file() and (d/'metrics.jsonl').is_file() and list((d/'checkpoints').glob('iter_*.pth'))
    assert all(r['init'] for r in recs if r['method'] != 'warmup')   # every method starts from the warm-up
    # the table (markdown file, the table in results.json, and the executed notebook's output) = results.json
    want = {v['name']: v['miou']['mean'] for v in ms.values()}
    assert parse_table_miou((out/'results.md').read_text()) == want
    assert parse_table_miou(res['table']) == want
    for m, v in ms.items():   # the mean is the mean of the per-seed mIoUs of the records
        per_seed = [r['result']['miou'] for r in recs if r['method'] == m]
        assert v['miou']['values'] == per_seed and abs(v['miou']['mean'] - sum(per_seed) / 2) < 0.006
    nb = json.loads((out/'adapt.ipynb').read_text())
    md = [o['data']['text/markdown'] for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])
          if 'text/markdown' in o.get('data', {})]
    assert md and parse_table_miou(''.join(md[0]) if isinstance(md[0], list) else md[0]) == want
    assert res['table'].splitlines()[0].endswith('| truck | bus | mIoU |')   # scored classes as columns, mIoU last
    assert 'person' not in res['table'].splitlines()[0]                     # the demo does not score it (DEMO_DROP)
    # the teacher check: TPS from each seed's oracle checkpoint, outside the table
    tc = res['teacher_check']
    assert set(tc['tps_from_oracle']) == {'0', '1'} and not any('from_oracle' in r['run_dir'] for r in recs)
    orc = {str(r['seed']): r['result']['miou'] for r in recs if r['method'] == 'oracle'}
    diffs = [tc['tps_from_oracle'][s] - orc[s] for s in ('0', '1')]
    assert abs(tc['minus_oracle']['mean'] - sum(diffs) / 2) < 0.006
    assert set(tc['pl_accuracy']) == {'tps_from_oracle', 'tps', 'pixmatch'}
    assert all(0 <= v['start']['mean'] <= 100 for v in tc['pl_accuracy'].values())
    assert len(list((out/'runs').glob('tps_from_oracle_s*/*/done.json'))) == 2


@pytest.mark.slow   # papermill experiment runs
def test_qualitative(adapt_run):
    out = adapt_run
    run_notebook(NB/'qualitative.ipynb', out/'qualitative.ipynb', stream=False, parameters=dict(
        RESULTS=str(out/'results.json'), FRAMES=[0, 1], GIF_FRAMES=3, DEVICE='cpu', FIG_PREFIX='t_'))
    figs = json.loads((out/'qualitative.json').read_text())['figures']
    assert set(figs) == {'grid', 'errors', 'snippet'}
    for k in ('grid', 'errors', 'snippet'):
        p = Path(figs[k])
        assert p.is_file() and 1000 < p.stat().st_size < 500_000, (p, p.stat().st_size)
    import imageio.v3 as iio
    assert iio.imread(figs['snippet']).shape[0] == 3          # 3 animated frames


def _fails(tmp_path, **params) -> str:
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook(NB/'adapt.ipynb', tmp_path/'bad.ipynb', stream=False, parameters=dict(OUT_ROOT=str(tmp_path), **params))
    assert (tmp_path/'bad.ipynb').is_file()   # the executed notebook with the traceback is kept
    return str(e.value)


def test_unknown_preset_fails_clearly(tmp_path):
    msg = _fails(tmp_path, PRESET='nope')
    assert 'KeyError' in msg and "unknown preset 'nope'" in msg and 'syn2city' in msg


def test_missing_data_root_fails_clearly(tmp_path):
    missing = tmp_path/'no_such_data'
    msg = _fails(tmp_path, DATA_ROOT=str(missing))
    assert 'DatasetError' in msg and str(missing/'viper') in msg and 'does not exist' in msg


def test_bad_method_fails_clearly(tmp_path, tiny_data):
    msg = _fails(tmp_path, DATA_ROOT=str(tiny_data), METHODS=['tps', 'dann'])
    assert 'ConfigError' in msg and "unknown method(s) ['dann']" in msg


# ---------------------------------------------------------------- finished runs are reused, never retrained
def _quiet(*a, **k): pass


@pytest.mark.slow   # papermill experiment runs
def test_finished_runs_are_reused(tiny_data, tmp_path):
    from tps.presets import experiment_config
    from tps.experiments import run_methods
    cfg = experiment_config('demo', tiny_data, {**TINY, 'data.check': 'off'}, device='cpu')
    its = {'warmup': 2, 'source_only': 2, 'tps': 2}
    a = run_methods(cfg, ['source_only', 'tps'], [0], its, out_root=tmp_path, log=_quiet)
    assert not any(r['reused'] for r in a) and len({r['run_dir'] for r in a}) == 3
    b = run_methods(cfg, ['source_only', 'tps'], [0], its, out_root=tmp_path, log=_quiet)
    assert all(r['reused'] for r in b) and [r['run_dir'] for r in b] == [r['run_dir'] for r in a]
    assert [r['result']['miou'] for r in b] == [r['result']['miou'] for r in a]
    # another config: the same warm-up is not taken for it, nor any row
    cfg2 = experiment_config('demo', tiny_data, {**TINY, 'data.check': 'off', 'train.lr': 1e-3}, device='cpu')
    c = run_methods(cfg2, ['tps'], [0], its, out_root=tmp_path, log=_quiet)
    assert not any(r['reused'] for r in c) and not {r['run_dir'] for r in c} & {r['run_dir'] for r in a}
    # reuse=False retrains; a run without its completion record (killed) is never reused
    d = run_methods(cfg, ['tps'], [0], its, out_root=tmp_path, log=_quiet, reuse=False)
    assert not any(r['reused'] for r in d)
    for r in d: (Path(r['run_dir'])/'done.json').unlink()
    e = run_methods(cfg, ['tps'], [0], its, out_root=tmp_path, log=_quiet)
    assert [r['run_dir'] for r in e] == [a[0]['run_dir'], a[2]['run_dir']]   # the older finished runs


@pytest.mark.slow   # papermill experiment runs
def test_reuse_sees_regenerated_data(tmp_path):
    "Same path, other generator parameters: the data digest differs, so nothing is reused."
    from tps.presets import experiment_config
    from tps.data.synthetic import make_synthetic
    from tps.experiments import run_methods, data_digest
    root = tmp_path/'syn'
    gen = dict(size=(64, 32), source_size=(80, 48), snippets=2, val_snippets=2, source_seqs=1, source_frames=20,
               full_snippets=1, workers=1, progress=False)
    make_synthetic(out=str(root), seed=0, **gen)
    cfg = experiment_config('demo', root, {**TINY, 'data.check': 'off'}, device='cpu')
    d0 = data_digest(cfg)
    a = run_methods(cfg, ['source_only'], [0], 2, out_root=tmp_path/'runs', log=_quiet)
    make_synthetic(out=str(root), seed=1, overwrite=True, **gen)
    assert data_digest(cfg) != d0
    b = run_methods(cfg, ['source_only'], [0], 2, out_root=tmp_path/'runs', log=_quiet)
    assert not b[0]['reused'] and b[0]['run_dir'] != a[0]['run_dir']


# ---------------------------------------------------------------- calibration, gap sweep and ablation notebooks, tiny
TINY_GEN = dict(size=(64, 32), source_size=(80, 48), snippets=3, val_snippets=2, source_seqs=1, source_val_seqs=1,
                source_frames=20, full_snippets=1, workers=1)
TINY_ITERS = {'warmup': 2, 'source_only': 2, 'davsn': 2, 'pixmatch': 2, 'tps': 2, 'oracle': 2}


@pytest.mark.slow   # papermill experiment runs
def test_calibration_notebook(tmp_path):
    setting = lambda name: {'name': name, 'why': 'test', 'data': TINY_GEN, 'overrides': TINY, 'iters': TINY_ITERS}
    run_notebook(NB/'calibration.ipynb', tmp_path/'calibration.ipynb', stream=False, parameters=dict(
        CANDIDATES=[setting('a')], CHOSEN=setting('chosen'), CHOSEN_DATA_ROOT=str(tmp_path/'data'/'chosen'),
        SEEDS=[0, 1], DATA_DIR=str(tmp_path/'data'), DEVICE='cpu', OUT_ROOT=str(tmp_path)))
    res = json.loads((tmp_path/'results.json').read_text())
    assert [s['name'] for s in res['steps']] == ['a'] and res['chosen']['seeds'] == [0, 1]
    c = res['chosen']['check']
    so = [r for r in res['chosen']['records'] if r['method'] == 'source_only']
    assert len(so) == 2 and all('source_result' in r for r in so)
    assert abs(c['source_only_source'] - sum(r['source_result']['miou'] for r in so) / 2) < 0.01
    assert (tmp_path/'figures'/'calibration.png').is_file() and (tmp_path/'calibration.md').read_text().count('\n') == 4


@pytest.mark.slow   # papermill experiment runs
def test_gap_sweep_notebook(tmp_path):
    "The sweep through the harness (smoke protocol, 2 shifts x 2 seeds): per-shift paired differences, PL accuracy, table, figure."
    import numpy as np
    from tps.harness import data_dir, read_records
    from tps.stats import t_interval
    out, res_dir = tmp_path/'out', tmp_path/'results'
    run_notebook(NB/'gap_sweep.ipynb', tmp_path/'gap_sweep.ipynb', stream=False, parameters=dict(
        PROTOCOL='smoke', SHIFTS=[0.0, 1.0], METHODS=['source_only', 'tps'], SEEDS=2, DRAWS=[0], OUT=str(out),
        RESULTS_DIR=str(res_dir), DEVICE='cpu', POLL=0.1))
    res = json.loads((res_dir/'results.json').read_text())
    assert set(res['per_shift']) == {'0', '1'} and res['protocol']['name'] == 'smoke'
    assert len(read_records(out)) == 2 * (1 + 2 * 3)                  # per shift: the draw, per seed a warm-up and two methods
    for sh, v in res['per_shift'].items():
        recs = {(r['method'], r['seed']): r['result']['miou'] for r in res['records'] if r['shift'] == float(sh)}
        d = np.array([recs['tps', s] - recs['source_only', s] for s in (0, 1)])
        p = v['tps_minus_source_only']                                 # paired by seed, t interval computed here again
        assert p['n'] == 2 and abs(p['mean'] - d.mean()) < 0.01
        assert np.allclose(p['ci'], t_interval(d), atol=0.01)
        assert v['miou']['tps']['mean'] == pytest.approx(np.mean([recs['tps', s] for s in (0, 1)]), abs=0.01)
        assert v['tps_pl_accuracy']['end']['mean'] is not None
        assert json.loads((data_dir(out/'data', 'smoke', 0, float(sh))/'synthetic.json').read_text())['shift'] == float(sh)
    assert (res_dir/'gap_sweep.md').read_text() == res['table'] and res['table'].count('\n') == 4
    assert (res_dir/'gap_sweep.png').stat().st_size > 1000 and (res_dir/'forest.png').is_file()


@pytest.mark.slow   # papermill experiment runs
def test_ablation_notebook(tmp_path):
    run_notebook(NB/'ablation.ipynb', tmp_path/'ablation.ipynb', stream=False, parameters=dict(
        VARIANTS={'tps': {}, '+ema': {'train.teacher': 'ema'}}, SELECT_SEEDS=[0, 1], HOLDOUT=1, CHECK_SEEDS=[2],
        CHECK_DATA_SEED=3, DATA=TINY_GEN, DATA_DIR=str(tmp_path/'data'), OVERRIDES=TINY, ITERS=TINY_ITERS,
        DEVICE='cpu', OUT_ROOT=str(tmp_path)))
    res = json.loads((tmp_path/'results.json').read_text())
    assert res['chosen'] in ('tps', '+ema')
    sel = [r for r in res['records'] if 'check' not in r]
    held = {v: sum(r['holdout_result']['miou'] for r in sel if r['variant'] == v) / 2 for v in ('tps', '+ema')}
    assert res['chosen'] == max(held, key=held.get)                   # chosen on the held-out frames
    assert set(res['check']) == {'demo', 'unseen_seeds', 'unseen_data'} and res['check']['unseen_data']['data_seed'] == 3
    assert (tmp_path/'data'/'seed_3'/'synthetic.json').is_file()


@pytest.mark.slow   # papermill experiment runs
def test_run_demo_records_seeds_and_data_seed(tmp_path):
    "`tps demo --seeds 3 --data-seed 7` (through run_demo): the benchmark of seed 7, the rows of seed 3, both in results.json; everything under --out."
    from tps.experiments import run_demo
    r = run_demo(out=tmp_path/'demo', data=tmp_path/'syn', data_seed=7, seeds=(3,), methods=('source_only', 'tps'),
                 iters=TINY_ITERS, overrides=TINY, make_data=TINY_GEN, device='cpu', progress=False)
    res = json.loads(Path(r['results']).read_text())
    assert res['seeds'] == [3] and res['data']['data_seed'] == 7
    assert {x['seed'] for x in res['records'] if x['method'] != 'warmup'} == {3}
    assert json.loads((tmp_path/'syn'/'synthetic.json').read_text())['seed'] == 7
    assert r['figures'] and all(Path(f).is_relative_to(tmp_path/'demo') for f in r['figures'])
    assert Path(r['results']).is_relative_to(tmp_path/'demo')


@pytest.mark.slow   # papermill experiment runs
@pytest.mark.parametrize('protocol', ['demo', 'sound'])
def test_sanity_notebook(tmp_path, protocol):
    "Every lever runs from each seed's oracle checkpoint under the protocol's schedule; the table's differences are the paired held-out differences under the protocol's evaluation."
    from tps.harness import get_protocol
    from tps.train import poly_lr
    levers = {'source_only': ['source_only', {}], 'tps': ['tps', {}], 'tps_lambda0': ['tps', {'train.lambda_t': 0.0}]}
    run_notebook(NB/'sanity.ipynb', tmp_path/'sanity.ipynb', stream=False, parameters=dict(
        PROTOCOL=protocol, SEEDS=[0, 1], HOLDOUT=1, BN_FRAMES=2, LEVERS=levers, DATA=TINY_GEN, DATA_DIR=str(tmp_path/'data'),
        OVERRIDES=TINY, ITERS={'warmup': 2, 'oracle': 2, 'adapt': 2}, DEVICE='cpu', OUT_ROOT=str(tmp_path),
        SHIFT0_SEEDS=[0, 1] if protocol == 'sound' else [],
        ORACLE_OVERRIDES={'train.oracle_source': True} if protocol == 'sound' else {}))
    res = json.loads((tmp_path/'results.json').read_text())
    recs = res['records']
    from tps.results import read_metrics
    from tps.runs import run_config
    for r in recs:                                                 # sound: a joint oracle, trained on the source labels too
        if r['method'] == 'oracle':
            assert run_config(r['run_dir']).train.oracle_source == (protocol == 'sound')
            assert any('src' in m for m in read_metrics(r['run_dir'])) == (protocol == 'sound')
    assert {r['method'] for r in recs} == {'oracle', *levers} and len(recs) == 2 * (1 + len(levers))
    used = 'bn_recomputed' if get_protocol(protocol).overrides.get('eval.bn_recompute') else 'as_trained'
    assert all(r['result']['miou'] == r['result'][used] for r in recs)   # the check uses the protocol's evaluation
    for name in levers:                                            # paired against the oracle of the same seed
        by = lambda m: {r['seed']: r['result']['miou'] for r in recs if r['method'] == m}
        d = [by(name)[s] - by('oracle')[s] for s in (0, 1)]
        assert abs(res['differences'][name]['mean'] - sum(d) / 2) < 0.011
    runs = [r for r in recs if r['method'] != 'oracle']
    oracle_ck = {r['seed']: r['run_dir'] for r in recs if r['method'] == 'oracle'}
    for r in runs:                                                 # each lever started from its seed's oracle
        init = (Path(r['run_dir'])/'config.yaml').read_text()
        assert str(Path(oracle_ck[r['seed']]).name) in init, (r['lever'], r['seed'])
    assert (tmp_path/'sanity.md').read_text().count('\n') == 3 + len(levers) and (tmp_path/'lr.png').stat().st_size > 0
    # check (c): under the continuous protocol every logged lr is the warm-up's schedule (4 iterations, 150-iteration
    # ramp) at its place; under the demo's the adaptation starts a schedule of its own
    power = get_protocol(protocol).overrides.get('train.power', 0.9)
    lr = lambda x: 5e-3 * poly_lr(1.0, x - 1, 4, power) * min(1.0, x / 150)
    pts = res['lr']['warm-up'] + res['lr']['tps']
    assert len(res['lr']['tps']) == 2 and all(abs(v - lr(x)) < 1e-9 for x, v in pts) == (protocol == 'sound'), pts
    if protocol == 'sound':                                        # checks (b) and (d) at shift 0, through the harness
        s0 = res['shift0']
        assert sorted((r['method'], r['seed'], r['shift']) for r in s0['records']) == \
            [('source_only', 0, 0.0), ('source_only', 1, 0.0), ('tps', 0, 0.0), ('tps', 1, 0.0)]
        d = {r['seed']: r['result']['miou'] for r in s0['records'] if r['method'] == 'tps'}
        d = [d[k] - {r['seed']: r['result']['miou'] for r in s0['records'] if r['method'] == 'source_only'}[k] for k in (0, 1)]
        assert abs(s0['tps_minus_source_only']['mean'] - sum(d) / 2) < 0.011 and s0['check_b'] == (abs(sum(d) / 2) <= 1.005)
        assert sorted(s0['pl_acc_curves']) == ['0', '1'] and all(len(c) == 2 for c in s0['pl_acc_curves'].values())
        assert (tmp_path/'pl_shift0.png').stat().st_size > 0
    else: assert res['shift0'] == {}


def test_run_methods_continuous_schedule(smoke_config, tmp_path):
    "continuous=True: the warm-up's poly schedule spans warm-up + adaptation and each method goes on with it (every logged lr is that one schedule's)."
    from tps.config import ConfigError
    from tps.experiments import run_methods
    from tps.results import read_metrics
    from tps.runs import run_config
    from tps.train import poly_lr
    cfg = smoke_config('source_only', log_every=1, warmup_iters=0, power=2.0)
    recs = run_methods(cfg, ['source_only', 'tps'], [0], {'warmup': 3, 'source_only': 2, 'tps': 2}, out_root=tmp_path/'r',
                       log=_quiet, continuous=True)
    by = {r['method']: r for r in recs}
    assert run_config(by['warmup']['run_dir']).train.max_iters == 5
    start = {'warmup': 0, 'source_only': 3, 'tps': 3}
    for m, r in by.items():
        c = run_config(r['run_dir']).train
        assert (c.max_iters, c.schedule_start) == (5, start[m])
        lrs = [(row['iter'], row['lr']['backbone']) for row in read_metrics(r['run_dir']) if 'lr' in row]
        assert len(lrs) == (3 if m == 'warmup' else 2)
        for it, v in lrs: assert v == pytest.approx(poly_lr(cfg.train.lr, start[m] + it - 1, 5, 2.0), rel=1e-9), (m, it)
    assert by['tps']['init'] and by['tps']['init'] == by['source_only']['init']
    with pytest.raises(ConfigError, match='needs warmup_iters'):
        run_methods(cfg, ['tps'], [0], 2, out_root=tmp_path/'r', log=_quiet, continuous=True)


@pytest.mark.slow   # papermill experiment runs
def test_curves_notebook(tmp_path):
    "Held-out curves: one point per kept checkpoint (the warm-up's first), each the held-out score of that checkpoint; the plateau verdict from the last quarter."
    from tps.evaluate import evaluate
    from tps.runs import run_config, resolve_checkpoint
    run_notebook(NB/'curves.ipynb', tmp_path/'curves.ipynb', stream=False, parameters=dict(
        PROTOCOL='sound', METHODS=['source_only', 'tps'], SEEDS=[0], HOLDOUT=1, EVERY=2, DATA=TINY_GEN,
        DATA_DIR=str(tmp_path/'data'), OVERRIDES={**TINY, 'eval.bn_recompute': 2}, ITERS={'warmup': 2, 'adapt': 8},
        DEVICE='cpu', OUT_ROOT=str(tmp_path)))
    res = json.loads((tmp_path/'results.json').read_text())
    w = Path(res['warmup']['run_dir'])                   # the warm-up's score (cached in its folder) is that of its checkpoint
    start = evaluate(run_config(res['records'][0]['run_dir']), resolve_checkpoint(w), split='holdout', progress=False)['miou']
    assert res['warmup']['held_out'] == pytest.approx(start, abs=0.01) and list((w/'eval').glob('cache_holdout_*.json'))
    for r in res['records']:
        assert [i for i, _ in r['curve']] == [0, 2, 4, 6, 8]
        c = run_config(r['run_dir'])
        assert (c.train.max_iters, c.train.schedule_start) == (10, 2)              # the protocol's one schedule
        last = evaluate(c, Path(r['run_dir'])/'checkpoints'/'iter_0000008.pth', split='holdout', progress=False)['miou']
        assert r['curve'][-1][1] == pytest.approx(last, abs=0.01)
        assert r['curve'][0][1] == pytest.approx(res['warmup']['held_out'], abs=1e-9)
        tail = [v for i, v in r['curve'] if i >= 6]                                   # the last quarter of 8: 6 and 8
        dev = max(abs(v - sum(tail) / len(tail)) for v in tail)
        v = res['plateau'][r['method']]
        assert v['max_deviation'] == pytest.approx(dev, abs=0.01) and v['holds'] == (dev <= 1.0)
    assert (tmp_path/'curves.png').stat().st_size > 1000 and (tmp_path/'curves.md').read_text() == res['table']


@pytest.mark.slow   # papermill experiment runs
def test_grid_notebook(tmp_path):
    "The schedule grid: every cell is a curves.ipynb run with the cell's lr, poly power and length on one continuous schedule; the chosen cell is the rule's, recomputed from the cells' own results."
    from tps.runs import run_config
    cells = [[5e-3, 2.0, 8], [1e-2, 0.9, 4]]
    params = dict(PROTOCOL='sound', CELLS=cells, CELL_ROOTS={}, METHODS=['source_only', 'tps'], SELECT_BY=['source_only', 'tps'],
                  SEEDS=[0], HOLDOUT=1, POINTS=4, WARMUP_ITERS=2, DATA=TINY_GEN, DATA_DIR=str(tmp_path/'data'),
                  OVERRIDES={**TINY, 'eval.bn_recompute': 2}, DEVICE='cpu', OUT_ROOT=str(tmp_path),
                  TOLERANCE=100.0, CONFIRM_SEEDS=[1])     # every tiny run "plateaus": a cell is chosen, and confirmed
    run_notebook(NB/'grid.ipynb', tmp_path/'grid.ipynb', stream=False, parameters=params)
    res = json.loads((tmp_path/'results.json').read_text())
    assert [c['name'] for c in res['cells']] == ['lr0.005_pow2_len8', 'lr0.01_pow0.9_len4']
    for (lr, power, n), c in zip(cells, res['cells']):
        cur = json.loads((Path(c['root'])/'results.json').read_text())
        assert cur['iters'] == {'warmup': 2, 'adapt': n} and cur['every'] == n // 4
        for r in cur['records']:
            t = run_config(r['run_dir']).train
            assert (t.lr, t.power, t.max_iters, t.schedule_start, t.iters) == (lr, power, 2 + n, 2, n)
            assert c['end'][r['method']] == pytest.approx(r['curve'][-1][1], abs=1e-9)
        assert c['plateau'] == {m: v['holds'] for m, v in cur['plateau'].items()}
        assert c['select_score'] == pytest.approx((c['end']['source_only'] + c['end']['tps']) / 2, abs=1e-9)
        assert c['adapt_start_lr'] == pytest.approx(lr * (1 - 2 / (2 + n)) ** power, rel=1e-9)
    ok = [c for c in res['cells'] if all(c['plateau'].values())]
    assert res['chosen'] == (max(ok, key=lambda c: c['select_score'])['name'] if ok else None)
    for c in res['cells']: assert c['select_gain'] == pytest.approx(c['select_score'] - c['warmup_held_out'], abs=1e-9)
    if len(ok) == 2: assert res['margin'] == pytest.approx(abs(ok[0]['select_score'] - ok[1]['select_score']), abs=1e-9)
    assert (tmp_path/'grid.md').read_text().startswith(res['table']) and (tmp_path/'grid.png').stat().st_size > 1000
    lines = res['table'].strip().splitlines()
    assert len(lines) == 2 + len(cells) and len({l.count('|') for l in lines}) == 1     # a markdown table: one width
    assert res['chosen'] is not None
    conf, by = res['confirm'], {c['name']: c for c in res['cells']}
    other = next(n for n in by if n != res['chosen'])
    assert conf['against'] == other and conf['warmup_seeds'] == [0, 1]
    assert conf['chosen'][0] == pytest.approx(by[res['chosen']]['select_score']) and conf['other'][0] == pytest.approx(by[other]['select_score'])
    for k, vals in ((res['chosen'], conf['chosen']), (other, conf['other'])):
        cur = json.loads((tmp_path/f'{k}_w1'/'results.json').read_text())
        assert cur['warmup_seed'] == 1 and cur['seeds'] == [1]
        assert vals[1] == pytest.approx(sum(r['curve'][-1][1] for r in cur['records']) / 2, abs=1e-9)
    assert conf['diff'] == pytest.approx([a - b for a, b in zip(conf['chosen'], conf['other'])], abs=1e-9)
    assert conf['holds'] == all(d > 0 for d in conf['diff']) and conf['text'] in (tmp_path/'grid.md').read_text()
    with pytest.raises(Exception, match=r'CELLS: expected \[lr > 0'):
        run_notebook(NB/'grid.ipynb', tmp_path/'bad.ipynb', stream=False, parameters={**params, 'CELLS': [[0.0, 2.0, 8]]})


@pytest.mark.slow   # papermill experiment runs
def test_grid_sanity_notebook(tmp_path):
    "The gated grid: the grid's plateaued cells best first, sanity.ipynb on each with the cell's schedule; the choice is the first cell whose checked methods lose at most LIMIT, recomputed from the runs; finished cells are read back, mismatched ones refused."
    from tps.runs import run_config
    grid = {'protocol': 'sound', 'warmup_iters': 2, 'protocol_cell': 'a', 'methods': ['source_only', 'tps'], 'select_by': ['source_only', 'tps'],
            'seeds': [0], 'points': 2, 'tolerance': 100.0, 'holdout': 1, 'data_seed': 0, 'cells': [
        {'name': 'a', 'lr': 5e-3, 'power': 2.0, 'iters': 2, 'select_score': 40.0, 'warmup_held_out': 39.0, 'plateau': {'tps': True}},
        {'name': 'b', 'lr': 1e-2, 'power': 0.9, 'iters': 4, 'select_score': 45.0, 'warmup_held_out': 44.0, 'plateau': {'tps': True}},
        {'name': 'c', 'lr': 2e-2, 'power': 0.9, 'iters': 2, 'select_score': 50.0, 'warmup_held_out': 49.0, 'plateau': {'tps': False}}]}
    (tmp_path/'grid.json').write_text(json.dumps(grid))
    params = dict(GRID=str(tmp_path/'grid.json'), KNOWN={}, SEEDS=[0, 1], HOLDOUT=1, METHODS=['source_only', 'tps'], CHECKED=['tps'],
                  LIMIT=2.0, STOP_AT_PASS=False, SHIFT0=False, CONFIRM_SEEDS=[], DATA=TINY_GEN, DATA_DIR=str(tmp_path/'data'),
                  OVERRIDES={**TINY, 'eval.bn_recompute': 2}, DEVICE='cpu', OUT_ROOT=str(tmp_path/'runs'), RESULTS_DIR=str(tmp_path/'res'))
    run_notebook(NB/'grid_sanity.ipynb', tmp_path/'gs.ipynb', stream=False, parameters=params)
    res = json.loads((tmp_path/'res'/'results.json').read_text())
    assert res['order'] == ['b', 'a'] and [c['name'] for c in res['cells']] == ['b', 'a']     # c has not plateaued
    first = {}
    for c, g in zip(res['cells'], (grid['cells'][1], grid['cells'][0])):
        doc = json.loads((tmp_path/'res'/c['name']/'results.json').read_text())
        recs = doc['records']
        for r in recs:                                              # every run on the cell's schedule, from its joint oracle
            t = run_config(r['run_dir']).train
            assert (t.lr, t.power, t.iters, t.max_iters, t.schedule_start) == (g['lr'], g['power'], g['iters'], 2 + g['iters'], 2)
            assert t.oracle_source == (r['method'] == 'oracle')
        by = lambda m: {r['seed']: r['result']['miou'] for r in recs if r['method'] == m}
        loss = sum(by('tps')[s] - by('oracle')[s] for s in (0, 1)) / 2
        assert c['minus_oracle']['tps']['mean'] == pytest.approx(loss, abs=0.011) and c['check_a'] == (loss >= -2.005)
        so = sum(by('tps')[s] - by('source_only')[s] for s in (0, 1)) / 2
        assert c['tps_minus_source_only']['mean'] == pytest.approx(so, abs=0.011) and c['ran_here']
        first[c['name']] = sorted(r['run_dir'] for r in recs)
    passing = [c['name'] for c in res['cells'] if c['check_a']]
    assert res['chosen'] == (passing[0] if passing else None)
    lines = res['table'].strip().splitlines()
    assert len(lines) == 4 and len({l.count('|') for l in lines}) == 1
    assert (tmp_path/'res'/'grid_sanity.md').read_text() == res['table'] + '\n' + res['verdict'] + '\n'
    assert (tmp_path/'res'/'grid_sanity.png').stat().st_size > 1000
    # a limit every cell passes: the first in order is chosen and the gate stops there; its shift-0 checks reuse its runs
    run_notebook(NB/'grid_sanity.ipynb', tmp_path/'gs2.ipynb', stream=False,
                 parameters={**params, 'LIMIT': 1000.0, 'STOP_AT_PASS': True, 'SHIFT0': True, 'CONFIRM_SEEDS': [1]})
    res = json.loads((tmp_path/'res'/'results.json').read_text())
    conf = res['confirm']             # the choice (b) beside the protocol's own cell (a) on warm-up seed 1, as the grid ran cells
    assert conf['against'] == 'a' and conf['warmup_seeds'] == [0, 1]
    assert conf['chosen'][0] == 45.0 and conf['other'][0] == 40.0 and conf['warmups'] == {'b': [44.0, conf['warmups']['b'][1]], 'a': [39.0, conf['warmups']['a'][1]]}
    for k, g, vals in (('b', grid['cells'][1], conf['chosen']), ('a', grid['cells'][0], conf['other'])):
        cur = json.loads((tmp_path/'runs'/'confirm'/f'{k}_w1'/'results.json').read_text())
        assert cur['warmup_seed'] == 1 and cur['seeds'] == [1] and cur['iters'] == {'warmup': 2, 'adapt': g['iters']}
        assert vals[1] == pytest.approx(sum(r['curve'][-1][1] for r in cur['records']) / 2, abs=1e-9)
        assert conf['warmups'][k][1] == cur['warmup']['held_out']
        for r in cur['records']: assert (run_config(r['run_dir']).train.lr, run_config(r['run_dir']).train.power) == (g['lr'], g['power'])
    assert conf['diff'] == pytest.approx([a - b for a, b in zip(conf['chosen'], conf['other'])], abs=1e-9)
    assert conf['gain_diff'][0] == pytest.approx(0.0, abs=1e-9) and conf['text'] in (tmp_path/'res'/'grid_sanity.md').read_text()
    assert conf['holds'] == (all(d > 0 for d in conf['diff']) and conf['ci'][0] > 0)
    assert [c['name'] for c in res['cells']] == ['b'] and res['chosen'] == 'b' and not res['cells'][0]['ran_here']
    doc = json.loads((tmp_path/'res'/'b'/'results.json').read_text())
    assert sorted(r['run_dir'] for r in doc['records']) == first['b']
    assert res['shift0']['check_b'] == doc['shift0']['check_b'] and sorted(doc['shift0']['pl_acc_curves']) == ['0', '1']
    assert 'not checked: a' in res['verdict']
    with pytest.raises(Exception, match=r"res/b/results.json: not cell b's check.*seeds is \[0, 1\], expected \[0\]"):
        run_notebook(NB/'grid_sanity.ipynb', tmp_path/'bad.ipynb', stream=False, parameters={**params, 'SEEDS': [0]})
    with pytest.raises(Exception, match='GRID: .*missing.json does not exist'):
        run_notebook(NB/'grid_sanity.ipynb', tmp_path/'bad.ipynb', stream=False, parameters={**params, 'GRID': str(tmp_path/'missing.json')})

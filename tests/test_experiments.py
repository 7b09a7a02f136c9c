"Papermill runs of the experiment notebooks at smoke size, their outputs, and clear failures on bad parameters."
import json, subprocess, sys
from pathlib import Path
import pytest

pm = pytest.importorskip('papermill')
from tps.experiments import parse_table_miou, run_notebook, notebooks_dir, METHOD_NAMES

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
    assert res['table'].splitlines()[0].endswith('| bicycle | mIoU |')   # classes as columns, mIoU last


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

"The `tps` command: help, one-line errors with non-zero exit, train + eval end to end, delegation."
import contextlib, io, subprocess, sys
from pathlib import Path
import pytest

from tps.cli import main


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main(argv)
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_help_lists_presets_and_keys():
    rc, out, _ = _run(['--help'])
    from tps.config import PRESETS
    assert rc == 0 and 'presets: ' + ', '.join(sorted(PRESETS)) in out and 'viper2city_faithful' in out
    rc, out, _ = _run(['train', '--help'])
    assert rc == 0 and 'train.lambda_t = 1.0' in out and 'eval.holdout' in out and 'data.interval' in out


@pytest.mark.parametrize('argv, msg', [
    (['train', '--preset', 'nope'], "unknown preset 'nope'"),
    (['train', 'train.nope=1'], "unknown config key 'train.nope'"),
    (['train', 'train.iters=abc'], 'train.iters: expected int'),
    (['train', 'iters'], "is not of the form section.key=value"),
    (['train', '--config', '/no/such.yaml'], '/no/such.yaml'),
    (['eval', '/no/such/run'], '/no/such/run'),
    (['train', 'data.target_root=/no/data', 'data.source_root=/no/data'], '/no/data'),
    (['bogus'], 'invalid choice'),
])
def test_bad_input_is_one_line(argv, msg, tmp_path):
    argv = [*argv, f'train.out_root={tmp_path}'] if argv[0] == 'train' and '--config' not in argv and 'iters' not in argv else argv
    rc, out, err = _run(argv)
    assert rc != 0 and msg in err, err
    assert err.startswith('tps: error:') and err.count('\n') == 1 and 'Traceback' not in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'tps.cli', 'train', '--preset', 'nope'], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith('tps: error:') and 'Traceback' not in r.stderr


def test_train_then_eval(smoke_data, tmp_path):
    d = smoke_data
    ov = [f'data.source_root={d}/viper', f'data.source_flow_root={d}/viper_flow', f'data.target_root={d}/cityscapes',
          f'data.target_flow_root={d}/cityscapes_flow', 'train.save_every=1', 'train.method=source_only',
          f'train.out_root={tmp_path}']
    rc, out, err = _run(['train', '--preset', 'smoke', *ov])
    assert rc == 0, err
    run = Path(out.strip().splitlines()[-1])
    assert (run/'checkpoints'/'iter_0000002.pth').exists()
    rc, out, err = _run(['eval', str(run)])                     # a run folder: best-snapshot sweep
    assert rc == 0, err
    assert 'best snapshot iter_' in out and '| method |' in out and '| source_only |' in out
    assert (run/'eval'/'results.md').exists() and (run/'eval'/'results.csv').exists()
    rc, out, err = _run(['eval', str(run/'checkpoints'/'iter_0000001.pth'), '--method', 'first', 'eval.save_predictions=1'])
    assert rc == 0, err
    assert '| first |' in out and list((run/'eval'/'predictions').glob('*_color.png'))
    rc, out, err = _run(['eval', str(run), 'eval.nope=1'])
    assert rc == 2 and "unknown config key 'eval.nope'" in err


def test_delegation():
    for cmd, prog in (('flow', 'tps-flow'), ('make-synthetic', 'tps-make-synthetic')):
        rc, out, _ = _run([cmd, '--help'])
        assert rc == 0 and prog in out


def test_demo_function(smoke_data, tmp_path):
    from tps.cli import demo
    ov = {'data.source_size': [64, 32], 'data.target_size': [64, 32], 'eval.input_size': [64, 32],
          'eval.label_size': [64, 32], 'train.device': 'cpu'}
    table = demo(out=tmp_path, data=smoke_data, iters=1, overrides=ov, progress=False)
    lines = table.splitlines()
    assert lines[0].startswith('| method | road |') and lines[0].endswith('| mIoU |')
    assert [l.split('|')[1].strip() for l in lines[2:]] == ['source_only', 'tps']
    assert (tmp_path/'results.md').exists() and (tmp_path/'results.csv').exists()


def test_demo_command_runs_the_papermill_demo(monkeypatch):
    "`tps demo` hands its options to tps.experiments.run_demo (the main job); `--quick` does not."
    import tps.experiments, tps.cli
    seen = {}
    monkeypatch.setattr(tps.experiments, 'run_demo', lambda **kw: seen.update(kw) or {})
    assert tps.cli.main(['demo', '--out', 'o', '--data', 'd', '--seeds', '4', '5', '--device', 'cpu', 'train.log_every=5']) == 0
    assert seen['out'] == 'o' and seen['data'] == 'd' and seen['seeds'] == (4, 5) and seen['device'] == 'cpu'
    assert seen['overrides'] == {'train.log_every': '5'} and seen['iters'] is None
    assert tps.cli.main(['demo', 'train.nope=1']) == 2  # a bad override: one-line error, exit 2

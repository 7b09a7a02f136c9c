"The `tps` command: help, version, config, check-data, one-line errors, train (new, --run-dir, --resume, --force) + eval naming, delegation, demo."
import contextlib, hashlib, io, json, subprocess, sys
from pathlib import Path
import pytest
import yaml

from tps.cli import main
from tps.presets import get_preset

SMOKE_LR = get_preset('smoke').train.lr   # what a run of the smoke preset records


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main(argv)
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _last_error(err: str) -> str:
    "The `tps: error:` line of stderr (progress bars may precede it)."
    lines = [l for l in err.splitlines() if l.startswith('tps: error:')]
    assert len(lines) == 1, err
    return lines[0]


def _data_overrides(d, out_root):
    return [f'data.source_root={d}/viper', f'data.source_flow_root={d}/viper_flow', f'data.target_root={d}/cityscapes',
            f'data.target_flow_root={d}/cityscapes_flow', f'train.out_root={out_root}']


def _hashes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def test_help_lists_presets_and_keys():
    rc, out, _ = _run(['--help'])
    from tps.presets import PRESETS
    assert rc == 0 and 'presets: ' + ', '.join(sorted(PRESETS)) in out and 'viper2city_faithful' in out
    for cmd in ('train', 'eval', 'config', 'check-data', 'flow', 'make-synthetic', 'demo'): assert cmd in out
    rc, out, _ = _run(['train', '--help'])
    assert rc == 0 and 'train.lambda_t = 1.0' in out and 'eval.holdout' in out and 'data.interval' in out
    assert '--resume' in out and '--force' in out and '--run-dir' in out


def test_help_shows_the_chosen_presets_values():
    "`tps train --preset viper2city --help` lists viper2city's values, not the base defaults."
    v, base = get_preset('viper2city'), get_preset('demo')
    assert (v.train.lr, v.train.lambda_t) != (base.train.lr, base.train.lambda_t)      # something to tell them apart
    rc, out, _ = _run(['train', '--preset', 'viper2city', '--help'])
    assert rc == 0 and "values of preset 'viper2city'" in out
    assert f'train.lr = {v.train.lr!r}' in out and f'train.lambda_t = {v.train.lambda_t!r}' in out
    rc, out, _ = _run(['train', '--preset', 'smoke', '--help'])
    assert rc == 0 and 'data.target_size = [64, 32]' in out and f"train.iters = {get_preset('smoke').train.iters}" in out


def test_version():
    from tps import __version__
    rc, out, _ = _run(['--version'])
    assert rc == 0 and out.strip() == f'tps {__version__}'
    r = subprocess.run([sys.executable, '-m', 'tps.cli', '--version'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f'tps {__version__}'


def test_config_prints_the_effective_config(tmp_path):
    from tps.config import config_from_dict, config_to_dict, save_config
    from tps.presets import get_preset
    rc, out, err = _run(['config', 'syn2city', 'train.iters=7', 'data.target_size=512x256'])
    assert rc == 0, err
    d = yaml.safe_load(out)
    assert d['name'] == 'syn2city' and d['train']['iters'] == 7 and d['data']['target_size'] == [512, 256]
    assert d['model']['num_classes'] == 12 and d['eval']['drop'] == ['fence']       # the preset's own values
    assert config_to_dict(config_from_dict(d)) == d                                  # valid YAML config, round trip
    save_config(get_preset('smoke'), tmp_path/'c.yaml')
    rc, out, _ = _run(['config', '--config', str(tmp_path/'c.yaml'), 'train.lr=0.5'])
    assert rc == 0 and yaml.safe_load(out)['train']['lr'] == 0.5 and yaml.safe_load(out)['name'] == 'smoke'
    rc, _, err = _run(['config'])
    assert rc == 2 and 'name a preset' in err and 'smoke' in err
    rc, _, err = _run(['config', 'smoke', 'train.lr=-1'])
    assert rc == 2 and 'train.lr=-1.0: expected a positive number' in err


def test_check_data_lists_every_bad_file(smoke_data, tmp_path):
    import shutil
    d = tmp_path/'syn'; shutil.copytree(smoke_data, d)
    rc, out, err = _run(['check-data', '--preset', 'smoke', *_data_overrides(d, tmp_path/'runs')])
    assert rc == 0, err
    assert 'source: 3 samples' in out and ', 0 unreadable' in out and 'val: 1 samples' in out
    flows = sorted((d/'cityscapes_flow'/'train').glob('*.npy'))
    frames = sorted((d/'viper'/'train'/'img').rglob('*.jpg'))
    flows[0].write_bytes(flows[0].read_bytes()[:100])                                 # two bad files at once
    frames[1].write_bytes(frames[1].read_bytes()[:len(frames[1].read_bytes()) // 2])
    rc, out, err = _run(['check-data', '--preset', 'smoke', *_data_overrides(d, tmp_path/'runs')])
    assert rc == 1 and str(flows[0]) in out and str(frames[1]) in out
    assert 'source: 3 samples, 12 files, 1 unreadable' in out and 'train: 2 samples, 12 files, 1 unreadable' in out
    rc, _, err = _run(['check-data', '--preset', 'smoke', '--splits', 'nope'])
    assert rc == 2 and "'nope'" in err and 'source_val' in err                        # the choices are named


@pytest.mark.parametrize('argv, msg', [
    (['train', '--preset', 'nope'], "unknown preset 'nope'"),
    (['train', 'train.nope=1'], "unknown config key 'train.nope'"),
    (['train', 'train.iters=abc'], 'train.iters: expected int'),
    (['train', 'iters'], "is not of the form section.key=value"),
    (['train', '--config', '/no/such.yaml'], '/no/such.yaml'),
    (['train', '--force', 'train.iters'], '--force only applies with --resume'),
    (['train', '--resume', '/no/such/run'], '/no/such/run: no such checkpoint file or run folder'),
    (['eval', '/no/such/run'], '/no/such/run'),
    (['train', 'data.target_root=/no/data', 'data.source_root=/no/data'], '/no/data'),
    (['bogus'], 'invalid choice'),
])
def test_bad_input_is_one_line(argv, msg, tmp_path):
    argv = [*argv, f'train.out_root={tmp_path}'] if argv[0] == 'train' and '--config' not in argv and 'iters' not in argv and '--resume' not in argv else argv
    rc, out, err = _run(argv)
    assert rc != 0 and msg in err, err
    assert err.startswith('tps: error:') and err.count('\n') == 1 and 'Traceback' not in err
    assert not list(tmp_path.iterdir())                                               # nothing was created


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'tps.cli', 'train', '--preset', 'nope'], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith('tps: error:') and 'Traceback' not in r.stderr


def test_train_then_eval(smoke_data, tmp_path):
    ov = [*_data_overrides(smoke_data, tmp_path), 'train.save_every=1', 'train.method=source_only']
    rc, out, err = _run(['train', '--preset', 'smoke', *ov])
    assert rc == 0, err
    run = Path(out.strip().splitlines()[-1])
    assert (run/'checkpoints'/'iter_0000002.pth').exists() and (run/'done.json').exists()
    assert f'tps train --resume {run.resolve()}' in err                                 # announced when the folder was made
    rc, out, err = _run(['eval', str(run)])                                             # a run folder: best-snapshot sweep
    assert rc == 0, err
    assert 'best snapshot iter_' in out and '| method |' in out and '| source_only |' in out
    assert (run/'eval'/'results_best_val.md').exists() and (run/'eval'/'results_best_val.csv').exists()
    assert f"results: {run/'eval'/'results_best_val.md'}" in out
    rc, out, err = _run(['eval', str(run/'checkpoints'/'iter_0000001.pth'), '--method', 'first', 'eval.save_predictions=1'])
    assert rc == 0, err
    assert '| first |' in out and list((run/'eval'/'predictions').glob('*_color.png'))
    assert (run/'eval'/'results_iter_0000001_val.md').exists()
    rc, out, err = _run(['eval', str(run), 'eval.nope=1'])
    assert rc == 2 and "unknown config key 'eval.nope'" in err


def test_eval_results_are_named_by_checkpoint_and_split(smoke_data, tmp_path):
    "Two checkpoints x two splits and the sweep: five tables side by side; re-evaluating one rewrites only its own."
    rc, out, err = _run(['train', '--preset', 'smoke', *_data_overrides(smoke_data, tmp_path), 'train.save_every=1',
                         'train.method=source_only', '--run-dir', str(tmp_path/'run')])
    assert rc == 0, err
    run = tmp_path/'run'
    for ck in ('iter_0000001.pth', 'iter_0000002.pth'):
        for split in ('val', 'train'):
            rc, out, err = _run(['eval', str(run/'checkpoints'/ck), f'eval.split={split}'])
            assert rc == 0, err
            assert f"results_{ck[:-4]}_{split}.md" in out
    rc, _, err = _run(['eval', str(run)])
    assert rc == 0, err
    names = sorted(p.name for p in (run/'eval').glob('results_*.md'))
    assert names == ['results_best_val.md', 'results_iter_0000001_train.md', 'results_iter_0000001_val.md',
                     'results_iter_0000002_train.md', 'results_iter_0000002_val.md']
    before = _hashes(run/'eval')
    rc, _, err = _run(['eval', str(run/'checkpoints'/'iter_0000001.pth'), '--method', 'again'])
    after = _hashes(run/'eval')
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == ['results_iter_0000001_val.csv', 'results_iter_0000001_val.md'], changed
    # a checkpoint outside a run folder: its results go beside it, not into its grandparent
    loose = tmp_path/'loose'/'w.pth'; loose.parent.mkdir(); loose.write_bytes((run/'checkpoints'/'iter_0000002.pth').read_bytes())
    rc, out, err = _run(['eval', str(loose), '--preset', 'smoke', *[o for o in _data_overrides(smoke_data, tmp_path) if 'out_root' not in o]])
    assert rc == 0, err
    assert (tmp_path/'loose'/'eval'/'results_w_val.md').exists() and not (tmp_path/'eval').exists()


def test_train_run_dir_resume_and_force(smoke_data, tmp_path):
    ov = _data_overrides(smoke_data, tmp_path)
    run = tmp_path/'run'
    rc, out, err = _run(['train', '--preset', 'smoke', *ov, 'train.iters=3', 'train.save_every=1', '--run-dir', str(run)])
    assert rc == 0, err
    assert Path(out.strip().splitlines()[-1]) == run
    before = _hashes(run)
    # --run-dir on an existing run: refused, naming it and the way out
    rc, _, err = _run(['train', '--preset', 'smoke', *ov, '--run-dir', str(run)])
    assert rc == 2 and f'run folder {run} already holds a run' in err and f'tps train --resume {run.resolve()}' in err
    # resume of a finished run: nothing to do, nothing changed
    rc, _, err = _run(['train', '--resume', str(run)])
    assert rc == 2 and 'is finished' in err and 'expected train.iters > 3' in err
    # resume with a differing override: refused unless --force names the key
    rc, _, err = _run(['train', '--resume', str(run), 'train.iters=5', 'train.lr=0.1'])
    assert rc == 2 and 'train.iters: run 3, now 5' in err and f'train.lr: run {SMOKE_LR!r}, now 0.1' in err and '--force' in err
    rc, _, err = _run(['train', '--resume', str(run), 'train.iters=5', 'train.lr=0.1', '--force', 'train.iters'])
    assert rc == 2 and f'train.lr: run {SMOKE_LR!r}, now 0.1' in err and 'train.iters: run' not in err
    rc, _, err = _run(['train', '--resume', str(run), '--preset', 'smoke'])
    assert rc == 2 and 'drop --preset' in err
    assert _hashes(run) == before                                                          # nothing was touched
    # the forced resume continues in place: metrics has each iteration once, the change is recorded
    rc, out, err = _run(['train', '--resume', str(run), 'train.iters=5', '--force', 'train.iters'])
    assert rc == 0, err
    assert [json.loads(l)['iter'] for l in (run/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4, 5]
    info = json.loads((run/'run.json').read_text())
    assert info['resumes'][-1]['from_iter'] == 3 and info['resumes'][-1]['changed'] == {'train.iters': [3, 5]}
    assert yaml.safe_load((run/'config.yaml').read_text())['train']['iters'] == 5
    assert all(before[k] == v for k, v in _hashes(run).items() if k.startswith('checkpoints/iter_000000') and k in before)


def test_delegation():
    for cmd, prog in (('flow', 'tps-flow'), ('make-synthetic', 'tps-make-synthetic')):
        rc, out, _ = _run([cmd, '--help'])
        assert rc == 0 and prog in out


def test_demo_quick_path(smoke_data, tmp_path):
    "`run_demo(quick=True)` (`tps demo --quick`): source-only and TPS from scratch, evaluated, the table written and returned."
    from tps.experiments import run_demo
    ov = {'data.source_size': [64, 32], 'data.target_size': [64, 32], 'eval.input_size': [64, 32],
          'eval.label_size': [64, 32], 'train.device': 'cpu'}
    table = run_demo(out=tmp_path, data=smoke_data, iters=1, seeds=(0,), methods=('source_only', 'tps'), overrides=ov,
                     progress=False, quick=True)['table']
    lines = table.splitlines()
    assert lines[0].startswith('| method | road |') and lines[0].endswith('| mIoU |')
    assert [l.split('|')[1].strip() for l in lines[2:]] == ['source_only', 'tps']
    assert (tmp_path/'results.md').read_text() == table and (tmp_path/'results.csv').exists()
    assert not list(tmp_path.glob('*.ipynb'))                                              # no notebooks on this path


def test_a_method_brings_its_own_model(smoke_data, tmp_path):
    "`train.method=davsn` as an override trains DA-VSN on its own model (splat fusion), unless model.fusion is named too."
    rc, out, _ = _run(['config', 'demo', 'train.method=davsn'])
    assert rc == 0 and yaml.safe_load(out)['model']['fusion'] == 'splat'
    rc, out, _ = _run(['config', 'demo', 'train.method=davsn', 'model.fusion=warp'])       # an ablation, on purpose
    assert rc == 0 and yaml.safe_load(out)['model']['fusion'] == 'warp'
    rc, out, _ = _run(['config', 'demo', 'train.method=tps'])
    assert rc == 0 and yaml.safe_load(out)['model']['fusion'] == 'warp'
    rc, out, err = _run(['train', '--preset', 'smoke', *_data_overrides(smoke_data, tmp_path), 'train.method=davsn'])
    assert rc == 0, err
    run = Path(out.strip().splitlines()[-1])
    assert yaml.safe_load((run/'config.yaml').read_text())['model']['fusion'] == 'splat'
    import torch
    ck = torch.load(run/'checkpoints'/'iter_0000002.pth', map_location='cpu', weights_only=False)
    assert {'d_sta_main', 'd_sa_main'} <= set(ck['extras'])                               # DA-VSN's discriminators trained


def test_config_diff_prints_what_a_preset_changes():
    rc, out, err = _run(['config', 'tps_plus', '--diff'])
    assert rc == 0, err
    assert out.splitlines() == ["tps_plus: changes from preset 'demo'", "  train.conf_threshold: 0.0 -> 0.9"]
    rc, out, _ = _run(['config', 'smoke', '--diff'])
    assert rc == 0 and "  train.iters: 300 -> 2" in out and "  data.target_size: [256, 128] -> [64, 32]" in out
    assert 'train.lr' not in out                                                           # smoke keeps the demo's lr
    rc, out, _ = _run(['config', 'syn2city_davsn', '--diff'])
    assert rc == 0 and "  model.fusion: 'warp' -> 'splat'" in out and "  train.method: 'tps' -> 'davsn'" in out
    rc, out, _ = _run(['config', 'demo', '--diff'])
    assert rc == 0 and out.startswith('demo: changes from the defaults') and "  model.arch: 'resnet101' -> 'resnet18'" in out
    rc, _, err = _run(['config', 'smoke', '--diff', 'train.lr=1'])
    assert rc == 2 and '--diff' in err


@pytest.mark.slow   # papermill demo
def test_demo_command_runs_the_papermill_demo(monkeypatch):
    "`tps demo` hands its options to tps.experiments.run_demo (the main job, through papermill), the protocol's among them."
    import tps.experiments, tps.cli
    from tps.harness import get_protocol
    seen = {}
    monkeypatch.delenv('TPS_SMOKE', raising=False)
    monkeypatch.setattr(tps.experiments, 'run_demo', lambda **kw: seen.update(kw) or {})
    assert tps.cli.main(['demo', '--out', 'o', '--data', 'd', '--seeds', '4', '5', '--device', 'cpu', 'train.log_every=5',
                         '--figures', 'f', '--results', 'r']) == 0
    assert seen['out'] == 'o' and seen['data'] == 'd' and seen['seeds'] == (4, 5) and seen['device'] == 'cpu'
    sound = get_protocol('sound')                        # the default protocol: its iterations, overrides and one lr schedule
    assert seen['overrides'] == {**sound.overrides, 'train.log_every': '5'} and seen['continuous'] is True
    assert seen['iters'] == {'warmup': sound.warmup_iters, **sound.iters}
    assert seen['figures'] == 'f' and seen['results'] == 'r' and seen['make_data'] is None
    assert seen['methods'] == ('source_only', 'davsn', 'pixmatch', 'tps', 'oracle')    # every row by default
    assert tps.cli.main(['demo', '--methods', 'source_only', 'tps', 'oracle']) == 0
    assert seen['methods'] == ('source_only', 'tps', 'oracle')
    assert tps.cli.main(['demo', '--methods', 'dann']) == 2 and seen['methods'] == ('source_only', 'tps', 'oracle')
    assert tps.cli.main(['demo', 'train.nope=1']) == 2  # a bad override: one-line error, exit 2
    assert tps.cli.main(['demo', '--protocol', 'demo']) == 0          # the 60-iteration protocol it replaced
    demo = get_protocol('demo')
    assert seen['continuous'] is False and seen['iters'] == {'warmup': demo.warmup_iters, **demo.iters} and seen['iters']['tps'] == 60
    assert tps.cli.main(['demo', '--protocol', 'smoke']) == 2         # another benchmark's protocol: refused
    assert tps.cli.main(['demo', '--protocol', 'nope']) == 2
    monkeypatch.setenv('TPS_SMOKE', '1')                # smoke size: 64x32, one seed, one iteration, the CPU
    seen.clear()
    assert tps.cli.main(['demo']) == 0
    assert seen['overrides']['data.target_size'] == [64, 32] and seen['seeds'] == (0,) and seen['iters'] == 1
    assert seen['warmup_iters'] == 1 and seen['device'] == 'cpu' and seen['make_data']['size'] == (64, 32)


def test_demo_quick_honours_seeds_and_device(monkeypatch):
    "`tps demo --quick --seeds 5 --device cpu` passes both on (they were ignored once), to the quick path of `run_demo`."
    import tps.cli, tps.experiments
    seen = {}
    monkeypatch.delenv('TPS_SMOKE', raising=False)
    monkeypatch.setattr(tps.experiments, 'run_demo', lambda **kw: seen.update(kw) or {'table': ''})
    assert tps.cli.main(['demo', '--quick', '--seeds', '5', '--device', 'cpu', '--iters', '3', '--out', 'x']) == 0
    assert seen['seeds'] == (5,) and seen['device'] == 'cpu' and seen['iters'] == 3 and seen['out'] == 'x'
    assert seen['quick'] is True and seen['methods'] == ('source_only', 'tps')


def test_benchmark_subcommand_plans_the_units(tmp_path):
    "`tps benchmark --plan` lists every unit of the grid without training anything."
    import subprocess, sys
    r = subprocess.run([sys.executable, '-m', 'tps.cli', 'benchmark', '--protocol', 'smoke', '--methods', 'source_only', 'tps',
                        '--seeds', '2', '--data-seeds', '0', '--out', str(tmp_path/'b'), '--plan'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert 'tps' in out and 'source_only' in out
    assert not (tmp_path/'b'/'records').exists() or not any((tmp_path/'b'/'records').iterdir())

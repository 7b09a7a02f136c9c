"""Fault injection (issue 18): bad values, bad files, refused overwrites, full disks, permissions, kills.

Each fault is one named test (or one parametrized case). Each asserts that the message names the offending file
or value and what was expected, and, where there is finished work around, that it was neither changed nor lost
(hashes of checkpoints, results and figures before and after). Everything is written under `tmp_path`."""
import contextlib, errno, hashlib, io, json, logging, os, random, re, shlex, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch

from tps.cli import main
from tps.presets import get_preset

SMOKE_LR = get_preset('smoke').train.lr   # what a run of the smoke preset records

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONHASHSEED': '0', 'PYTHONUNBUFFERED': '1'}
TIMING = ('s_per_iter', 'samples_per_s', 'peak_mem_mb')     # the only fields of metrics.jsonl allowed to differ


# ---------------------------------------------------------------- helpers
def cli(argv):
    "Run `tps ARGV` in this process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    "The `tps: error:` message of stderr (with the lines that continue it), never a traceback."
    assert 'Traceback' not in err, err
    i = err.find('tps: error:')
    assert i >= 0, err
    return err[i:]


def data_ov(d) -> list:
    return [f'data.source_root={d}/viper', f'data.source_flow_root={d}/viper_flow', f'data.target_root={d}/cityscapes',
            f'data.target_flow_root={d}/cityscapes_flow']


def hashes(folder) -> dict:
    "sha1 of every file under `folder`, by relative path."
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob('*')) if p.is_file()}


def tmp_files(folder) -> list:
    return sorted(p.name for p in Path(folder).rglob('*.tmp'))


def tps_command(line: str) -> list:
    "argv of a `tps ...` command the kit printed: the installed console script (or `python -m tps.cli`)."
    words = shlex.split(line)
    assert words[0] == 'tps', line
    exe = Path(sys.executable).with_name('tps')
    return ([str(exe)] if exe.exists() else [sys.executable, '-m', 'tps.cli']) + words[1:]


@pytest.fixture
def data_copy(smoke_data, tmp_path):
    "A private copy of the smoke benchmark, free to break."
    d = tmp_path/'syn'
    shutil.copytree(smoke_data, d)
    return d


@pytest.fixture(scope='module')
def finished(smoke_data, tmp_path_factory):
    "A finished 3-iteration smoke run (a checkpoint per iteration), made once; tests copy it before changing it."
    root = tmp_path_factory.mktemp('finished')
    rc, out, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), 'train.iters=3', 'train.save_every=1',
                        'train.method=source_only', f'train.out_root={root}', '--run-dir', root/'run'])
    assert rc == 0, err
    return root/'run'


@pytest.fixture
def run_copy(finished, tmp_path):
    d = tmp_path/'run'
    shutil.copytree(finished, d)
    return d


# ---------------------------------------------------------------- 1. bad values: caught when the config is built
BAD_VALUES = [  # (fault, overrides, pieces the one-line message must hold: the key/value and what was expected)
    ('negative_lr', ['train.lr=-1'], ['train.lr=-1.0', 'expected a positive number']),
    ('zero_iters', ['train.iters=0'], ['train.iters=0', 'expected a number >= 1']),
    ('zero_log_every', ['train.log_every=0'], ['train.log_every=0', 'expected a number >= 1']),
    ('zero_save_every', ['train.save_every=0'], ['train.save_every=0', 'expected a number >= 1']),
    ('unknown_drop_class', ['eval.drop=[fense]'], ["['fense']", 'expected class names of the viper setting', "'fence'"]),
    ('interval_25', ['data.interval=25'], ['data.interval=25', 'expected k <= 18', '30-frame snippets']),
    ('size_not_WxH', ['data.target_size=256by128'], ['data.target_size', "'256by128'", 'WxH, e.g. 256x128']),
    ('size_too_small', ['data.target_size=8x4'], ['data.target_size=(8, 4)', 'two whole numbers >= 16']),
    ('momentum_one', ['train.momentum=1'], ['train.momentum=1.0', 'expected a number in [0, 1)']),
    ('flip_probability', ['train.flip_p=1.5'], ['train.flip_p=1.5', 'expected a number in [0, 1]']),
    ('aug_scale_reversed', ['train.aug_scale=[1.2,0.8]'], ['train.aug_scale=(1.2, 0.8)', '0 < min <= max']),
    ('unknown_method', ['train.method=tpss'], ["train.method='tpss'", "expected one of ['source_only'"]),
    ('bad_device', ['train.device=gpu'], ["train.device='gpu'", "'auto', 'cpu', 'cuda' or 'cuda:N'"]),
    ('num_classes_vs_setting', ['model.num_classes=12'], ['model.num_classes=12', "expected 15, the viper setting's classes"]),
    ('unknown_choice', ['data.on_bad_file=ignore'], ["data.on_bad_file='ignore'", "expected one of ['error', 'skip']"]),
    ('unknown_key', ['train.lrr=1'], ["unknown config key 'train.lrr'", "train has keys", "'lr'"]),
    ('wrong_type', ['train.iters=ten'], ['train.iters', 'expected int', "'ten'"]),
    ('missing_init_file', ['model.init=/no/such/init.pth'], ["model.init='/no/such/init.pth'", 'expected an existing weights file']),
    ('batch_larger_than_data', ['data.batch_size=100'], ['data.batch_size=100', 'expected at most 2', 'target train']),
]


@pytest.mark.parametrize('fault, overrides, pieces', BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_named_and_leaves_no_run_folder(fault, overrides, pieces, smoke_data, tmp_path):
    rc, out, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), f'train.out_root={tmp_path/"runs"}', *overrides])
    msg = error_line(err)
    assert rc == 2, (rc, err)
    for p in pieces: assert p in msg, (p, msg)
    assert not (tmp_path/'runs').exists()                                   # a failed start leaves no run folder


def test_config_with_preset_is_refused(smoke_data, tmp_path):
    "`--config` with `--preset` (the preset was once silently ignored), and `tps config NAME --config FILE`."
    from tps.config import save_config
    from tps.presets import get_preset
    save_config(get_preset('smoke'), tmp_path/'c.yaml')
    for argv in (['train', '--preset', 'demo', '--config', tmp_path/'c.yaml', f'train.out_root={tmp_path/"runs"}'],
                 ['config', 'demo', '--config', tmp_path/'c.yaml']):
        rc, _, err = cli(argv)
        msg = error_line(err)
        assert rc == 2 and 'demo' in msg and str(tmp_path/'c.yaml') in msg and 'not both' in msg, msg
    assert not (tmp_path/'runs').exists()


@pytest.mark.parametrize('fault, text, pieces', [
    ('unknown_key_in_yaml', 'train:\n  lrr: 1\n', ["unknown config key 'train.lrr'", 'train has keys']),
    ('invalid_yaml', 'train: [1, 2\n', ['not valid YAML']),
    ('section_not_a_mapping', 'train: 3\n', ["section 'train': expected a mapping, got int"]),
    ('bad_value_in_yaml', 'train:\n  iters: 0\n', ['train.iters=0: expected a number >= 1']),
], ids=['unknown_key_in_yaml', 'invalid_yaml', 'section_not_a_mapping', 'bad_value_in_yaml'])
def test_bad_yaml_config_names_the_file(fault, text, pieces, tmp_path):
    p = tmp_path/'my.yaml'; p.write_text(text)
    rc, _, err = cli(['train', '--config', p, f'train.out_root={tmp_path/"runs"}'])
    msg = error_line(err)
    assert rc == 2, err
    if fault != 'bad_value_in_yaml': assert str(p) in msg, msg                # the file is named
    for piece in pieces: assert piece in msg, (piece, msg)
    assert not (tmp_path/'runs').exists()


# ---------------------------------------------------------------- 2. failed starts, run folders
@pytest.mark.parametrize('fault', ['missing_data_root', 'corrupt_init_file'])
def test_failed_start_leaves_no_run_folder(fault, smoke_data, tmp_path):
    "Before the folder is made (no data) and after (the init weights fail to load): no folder, no empty parents."
    ov = [*data_ov(smoke_data), f'train.out_root={tmp_path/"runs"/"deep"}']
    if fault == 'missing_data_root':
        ov.append(f'data.target_root={tmp_path/"nowhere"}'); want = [str(tmp_path/'nowhere'), 'does not exist']
    else:
        bad = tmp_path/'init.pth'; bad.write_bytes(b'not a weights file')
        ov.append(f'model.init={bad}'); want = [str(bad), 'not a PyTorch weights file']
    rc, _, err = cli(['train', '--preset', 'smoke', *ov])
    msg = error_line(err)
    assert rc != 0 and all(w in msg for w in want), msg
    assert not (tmp_path/'runs').exists(), sorted(map(str, (tmp_path/'runs').rglob('*')))


def test_failed_start_keeps_the_users_empty_run_dir(smoke_data, tmp_path):
    "`--run-dir` naming an empty folder the user made: a failed start empties nothing of theirs and leaves it there."
    (tmp_path/'mine').mkdir()
    bad = tmp_path/'init.pth'; bad.write_bytes(b'junk')
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), f'model.init={bad}', '--run-dir', tmp_path/'mine'])
    assert rc != 0 and str(bad) in error_line(err)
    assert (tmp_path/'mine').is_dir() and not list((tmp_path/'mine').iterdir())


def test_run_dir_on_an_existing_run_is_refused(finished, smoke_data):
    before = hashes(finished)
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), 'train.iters=3', 'train.save_every=1',
                      'train.method=source_only', '--run-dir', finished])
    msg = error_line(err)
    assert rc == 2 and f'run folder {finished} already holds a run' in msg and f'tps train --resume {finished.resolve()}' in msg
    assert hashes(finished) == before                                       # config, checkpoints, done.json untouched


def test_run_dir_that_is_a_file(smoke_data, tmp_path):
    f = tmp_path/'afile'; f.write_text('keep me')
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), '--run-dir', f])
    msg = error_line(err)
    assert rc == 2 and str(f) in msg and 'expected a new or empty folder, found a file' in msg
    assert f.read_text() == 'keep me'


# ---------------------------------------------------------------- 3. resuming
def test_resume_with_a_differing_override_is_refused_unless_forced(run_copy):
    before = hashes(run_copy)
    rc, _, err = cli(['train', '--resume', run_copy, 'train.iters=4', 'train.lr=0.1'])
    msg = error_line(err)
    assert rc == 2 and f'train.lr: run {SMOKE_LR!r}, now 0.1' in msg and 'train.iters: run 3, now 4' in msg and '--force' in msg
    assert hashes(run_copy) == before
    rc, _, err = cli(['train', '--resume', run_copy, 'train.iters=4', '--force', 'train.iters'])
    assert rc == 0, err
    after = hashes(run_copy)
    for k in ('checkpoints/iter_0000001.pth', 'checkpoints/iter_0000002.pth', 'checkpoints/iter_0000003.pth'):
        assert after[k] == before[k], k                                     # finished checkpoints untouched
    assert [json.loads(l)['iter'] for l in (run_copy/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_of_a_finished_run_changes_nothing(run_copy):
    before = hashes(run_copy)
    rc, _, err = cli(['train', '--resume', run_copy])
    msg = error_line(err)
    assert rc == 2 and f'run {run_copy} is finished' in msg and 'iter_0000003.pth' in msg and 'expected train.iters > 3' in msg
    assert hashes(run_copy) == before                                       # done.json, run.json as they were


def test_resume_after_the_init_file_moved(smoke_data, tmp_path):
    "A run started from model.init resumes from its checkpoint even when the init file is gone."
    from tps.model import build_model
    from tps.presets import get_preset
    init = tmp_path/'init.pth'
    torch.save(build_model(get_preset('smoke').model).state_dict(), init)
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(smoke_data), f'model.init={init}', 'train.iters=2',
                      'train.save_every=1', 'train.method=source_only', '--run-dir', tmp_path/'run'])
    assert rc == 0, err
    (tmp_path/'run'/'checkpoints'/'iter_0000002.pth').unlink(); (tmp_path/'run'/'done.json').unlink()  # as if killed after 1
    init.unlink()
    rc, _, err = cli(['train', '--resume', tmp_path/'run'])
    assert rc == 0, err
    assert (tmp_path/'run'/'checkpoints'/'iter_0000002.pth').exists()


def test_corrupt_latest_checkpoint_is_named(run_copy):
    ck = run_copy/'checkpoints'/'iter_0000003.pth'
    ck.write_bytes(ck.read_bytes()[:1000])
    (run_copy/'done.json').unlink()
    before = hashes(run_copy)
    rc, _, err = cli(['train', '--resume', run_copy])
    msg = error_line(err)
    assert rc != 0 and str(ck) in msg and 'not a readable checkpoint' in msg
    assert hashes(run_copy) == before


def test_stale_tmp_of_a_killed_checkpoint_write_is_removed_on_resume(run_copy):
    (run_copy/'checkpoints'/'iter_0000003.pth').unlink(); (run_copy/'done.json').unlink()
    stale = run_copy/'checkpoints'/'.iter_0000003.pth.abc123.tmp'; stale.write_bytes(b'half a checkpoint')
    rc, _, err = cli(['train', '--resume', run_copy])
    assert rc == 0, err
    assert not stale.exists() and (run_copy/'checkpoints'/'iter_0000003.pth').exists()


# ---------------------------------------------------------------- 4. full disks, permissions, umask
def _enospc(tmp):
    Path(tmp).write_bytes(b'x' * 4096)                                        # part written, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def _torch_full(tmp):
    Path(tmp).write_bytes(b'PK' + b'x' * 4096)
    raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4094')

def _quota(tmp):
    Path(tmp).write_bytes(b'x')
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


@pytest.mark.parametrize('fault, writer, reason', [
    ('disk_full', _enospc, 'no space left on the device'),
    ('disk_full_in_torch_save', _torch_full, 'inline_container.cc'),
    ('quota_exceeded', _quota, 'disk quota exceeded'),
])
def test_full_disk_names_the_file_and_removes_the_tmp(fault, writer, reason, tmp_path):
    from tps.utils import atomic_write, WriteError
    target = tmp_path/'out'/'results.json'; target.parent.mkdir(); target.write_text('finished results')
    with pytest.raises(WriteError) as e: atomic_write(target, writer)
    assert str(target) in str(e.value) and reason in str(e.value) and 'could not write' in str(e.value)
    assert target.read_text() == 'finished results'                        # the finished file is intact
    assert tmp_files(tmp_path) == []                                        # no partial .tmp filling the disk


def test_permission_denied_names_the_file_and_removes_the_tmp(tmp_path, monkeypatch):
    "Permission denied at the final rename (the tests may run as root, where a read-only folder does not stop a write)."
    from tps import utils
    target = tmp_path/'results.md'; target.write_text('finished')
    def deny(src, dst): raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
    monkeypatch.setattr(utils.os, 'replace', deny)
    with pytest.raises(utils.WriteError) as e: utils.atomic_write(target, 'new table')
    monkeypatch.undo()
    assert str(target) in str(e.value) and 'permission denied' in str(e.value)
    assert target.read_text() == 'finished' and tmp_files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_folder(tmp_path):
    from tps.utils import atomic_write, WriteError
    d = tmp_path/'ro'; d.mkdir(); d.chmod(0o555)
    try:
        with pytest.raises(WriteError) as e: atomic_write(d/'x.json', '{}')
        assert str(d/'x.json') in str(e.value) and 'permission denied' in str(e.value)
    finally: d.chmod(0o755)


def test_disk_full_while_training_keeps_the_finished_checkpoints(smoke_config, tmp_path, monkeypatch):
    "The disk fills at the second checkpoint: a WriteError naming it; checkpoint 1 and its metrics survive; resume finishes."
    from tps.train import train
    from tps.runs import load_training_checkpoint
    from tps.utils import WriteError
    real_save, seen = torch.save, {}
    def save(obj, f, *a, **k):
        if 'iter_0000002' in str(f):
            Path(f).write_bytes(b'PK' + b'x' * 1000)
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1002 vs 1000')
        real_save(obj, f, *a, **k)
        if 'iter_0000001' in str(f): seen['h1'] = hashlib.sha1(Path(f).read_bytes()).hexdigest()
    monkeypatch.setattr(torch, 'save', save)
    cfg = smoke_config('source_only', iters=3, save_every=1)
    with pytest.raises(WriteError) as e: train(cfg, run_dir=tmp_path/'run')
    monkeypatch.undo()
    ck2 = tmp_path/'run'/'checkpoints'/'iter_0000002.pth'
    assert str(ck2) in str(e.value) and 'inline_container' in str(e.value)
    assert sorted(p.name for p in (tmp_path/'run'/'checkpoints').iterdir()) == ['iter_0000001.pth']   # no .tmp left
    assert hashlib.sha1((tmp_path/'run'/'checkpoints'/'iter_0000001.pth').read_bytes()).hexdigest() == seen['h1']
    assert load_training_checkpoint(tmp_path/'run')['iter'] == 1
    cfg.train.resume = str(tmp_path/'run')
    train(cfg)                                                              # nothing lost: it continues from 1
    assert [json.loads(l)['iter'] for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_files_honour_the_umask(umask, tmp_path):
    "Flows (once always 0600 from mkstemp), checkpoints, configs and plain writes get 0666 & ~umask."
    from tps.utils import atomic_write
    from tps.flow import write_flow
    from tps.runs import save_checkpoint
    from tps.config import save_config
    from tps.presets import get_preset
    old = os.umask(umask)
    try:
        paths = [atomic_write(tmp_path/'a.json', '{}'), write_flow(tmp_path/'f_int16_x10.npy', torch.zeros(2, 4, 6)),
                 write_flow(tmp_path/'f.flo', torch.zeros(2, 4, 6)), save_checkpoint(tmp_path/'c.pth', {'w': torch.ones(1)}),
                 save_config(get_preset('smoke'), tmp_path/'config.yaml')]
    finally: os.umask(old)
    for p in paths: assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~umask), p


# ---------------------------------------------------------------- 5. bad data files
def _cut(p: Path): b = p.read_bytes(); p.write_bytes(b[:len(b) // 2])

CORRUPTIONS = [  # (fault, which file, how, what the message must say was expected)
    ('truncated_jpeg', lambda d: sorted((d/'viper'/'train'/'img').rglob('*.jpg'))[1], _cut, 'end-of-image marker'),
    ('truncated_png_frame', lambda d: sorted((d/'cityscapes'/'leftImg8bit_sequence'/'train').rglob('*.png'))[-1], _cut, 'IEND'),
    ('truncated_png_label', lambda d: sorted((d/'cityscapes'/'gtFine'/'val').rglob('*.png'))[0], _cut, 'IEND'),
    ('corrupt_flow', lambda d: sorted((d/'viper_flow').glob('*.npy'))[0],
     lambda p: p.write_bytes(b'\x93NUMPY garbage' * 10), 'expected int16 H x W x 2'),
    ('float_flow', lambda d: sorted((d/'cityscapes_flow'/'train').glob('*.npy'))[0],
     lambda p: np.save(p, np.load(p).astype(np.float32)), 'expected dtype int16'),
    ('flow_not_HxWx2', lambda d: sorted((d/'cityscapes_flow'/'val').glob('*.npy'))[-1],
     lambda p: np.save(p, np.zeros((32, 64, 3), np.int16)), 'expected a flow array of shape (H, W, 2)'),
]


@pytest.mark.parametrize('fault, pick, damage, expected', CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_check_data_names_the_bad_file(fault, pick, damage, expected, data_copy):
    bad = pick(data_copy); damage(bad)
    rc, out, err = cli(['check-data', '--preset', 'smoke', *data_ov(data_copy)])
    assert rc == 1, (out, err)
    lines = [l for l in out.splitlines() if str(bad) in l]
    assert len(lines) == 1 and expected in lines[0], out
    assert sum(int(m) for m in re.findall(r'(\d+) unreadable', out)) == 1      # that file and no other


def test_transposed_flow_file_is_detected(data_copy, tmp_path):
    p = sorted((data_copy/'cityscapes_flow'/'train').glob('*.npy'))[0]
    np.save(p, np.ascontiguousarray(np.load(p).transpose(1, 0, 2)))           # (W, H, 2) instead of (H, W, 2)
    rc, out, err = cli(['check-data', '--preset', 'smoke', *data_ov(data_copy)])
    assert rc == 1 and str(p) in out and 'expected' in out
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), f'train.out_root={tmp_path/"runs"}'])
    assert rc != 0 and str(p) in err and not (tmp_path/'runs').exists()


def _missing_frame(d) -> Path:
    p = sorted((d/'cityscapes'/'leftImg8bit_sequence'/'train').rglob('*.png'))
    frame = next(f for f in p if f.name.endswith('_000528_leftImg8bit.png'))  # frame c of a labelled frame d (529)
    frame.unlink()
    return frame


def test_missing_frame_with_on_bad_file_error_stops_before_the_run(data_copy, tmp_path):
    gone = _missing_frame(data_copy)
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), f'train.out_root={tmp_path/"runs"}'])
    msg = error_line(err)
    assert rc != 0 and str(gone) in msg and '1 file(s) needed by 1 of 2 samples are missing' in msg
    assert not (tmp_path/'runs').exists()


def test_missing_frame_with_on_bad_file_skip_trains_and_counts(data_copy, tmp_path, caplog):
    gone = _missing_frame(data_copy)
    with caplog.at_level(logging.WARNING, logger='tps.data'):
        rc, out, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), 'data.on_bad_file=skip',
                            f'train.out_root={tmp_path/"runs"}'])
    assert rc == 0, err
    warn = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert any('skipped 1 of 2 samples with missing files' in w and str(gone) in w for w in warn), warn
    assert Path(out.strip().splitlines()[-1], 'done.json').exists()


def test_corrupt_frame_with_on_bad_file_skip_trains_and_counts(data_copy, tmp_path, caplog):
    bad = sorted((data_copy/'viper'/'train'/'img').rglob('*.jpg'))[1]; _cut(bad)
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), f'train.out_root={tmp_path/"runs"}'])
    msg = error_line(err)
    assert rc != 0 and str(bad) in msg and "data.on_bad_file='skip'" in msg and not (tmp_path/'runs').exists()
    with caplog.at_level(logging.WARNING, logger='tps.data'):
        rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), 'data.on_bad_file=skip', f'train.out_root={tmp_path/"runs"}'])
    assert rc == 0, err
    assert any('skipping 1 of 3 samples with unreadable files' in r.getMessage() for r in caplog.records)


def test_missing_file_message_names_the_config_key(data_copy, tmp_path):
    _missing_frame(data_copy)
    rc, _, err = cli(['train', '--preset', 'smoke', *data_ov(data_copy), f'train.out_root={tmp_path/"runs"}'])
    assert rc != 0 and 'data.on_bad_file' in error_line(err)


def test_run_evaluates_from_another_folder(smoke_data, tmp_path, monkeypatch):
    (tmp_path/'a').mkdir(); (tmp_path/'b').mkdir()
    os.symlink(smoke_data, tmp_path/'a'/'syn')
    monkeypatch.chdir(tmp_path/'a')
    rc, out, err = cli(['train', '--preset', 'smoke', *data_ov('syn'), 'train.out_root=runs', 'train.method=source_only'])
    assert rc == 0, err
    run = (tmp_path/'a'/out.strip().splitlines()[-1]).resolve()
    monkeypatch.chdir(tmp_path/'b')
    rc, _, err = cli(['eval', run])
    assert rc == 0, err


# ---------------------------------------------------------------- 6. evaluation: caches and result files
def test_eval_cache_is_not_fooled_by_a_replaced_checkpoint(run_copy):
    "Replace a checkpoint by another of the same name (same size): the sweep re-evaluates it instead of reporting its old score."
    from tps.runs import run_config
    from tps.evaluate import evaluate
    rc, out, err = cli(['eval', run_copy])
    assert rc == 0, err
    cache_file = next((run_copy/'eval').glob('cache_*.json'))
    first = json.loads(cache_file.read_text())
    pairs = [(a, b) for a in sorted(first) for b in sorted(first) if first[a]['miou'] != first[b]['miou']]
    assert pairs, f"all snapshots score the same, the test cannot tell them apart: {first}"
    old, new = pairs[0]
    target = run_copy/'checkpoints'/old
    assert target.stat().st_size == (run_copy/'checkpoints'/new).stat().st_size
    shutil.copy2(run_copy/'checkpoints'/new, target)                         # same name, same size, the other's content
    before = hashes(run_copy/'checkpoints')
    rc, out, err = cli(['eval', run_copy])
    assert rc == 0, err
    second = json.loads(cache_file.read_text())
    truth = evaluate(run_config(run_copy), target, progress=False)['miou']
    assert second[old]['miou'] == truth == first[new]['miou'] != first[old]['miou']
    assert hashes(run_copy/'checkpoints') == before                         # evaluation changes no checkpoint


def test_eval_results_of_two_checkpoints_and_splits_do_not_overwrite(run_copy):
    done = {}
    for ck, split in (('iter_0000001', 'val'), ('iter_0000002', 'val'), ('iter_0000001', 'train')):
        rc, out, err = cli(['eval', run_copy/'checkpoints'/f'{ck}.pth', f'eval.split={split}'])
        assert rc == 0, err
        for k, h in done.items(): assert hashes(run_copy/'eval').get(k) == h, f"{k} was overwritten"
        done = {k: v for k, v in hashes(run_copy/'eval').items() if k.startswith('results_')}
    assert sorted(done) == ['results_iter_0000001_train.csv', 'results_iter_0000001_train.md', 'results_iter_0000001_val.csv',
                            'results_iter_0000001_val.md', 'results_iter_0000002_val.csv', 'results_iter_0000002_val.md']


@pytest.mark.slow   # training subprocesses / the demo
def test_demo_writes_figures_and_results_under_out(data_copy, tmp_path, monkeypatch):
    "run_demo hands the notebooks folders under --out (or --figures / --results), never the repository's figures/."
    import tps.experiments as E
    from tps.presets import SMOKE_SYNTHETIC
    repo_figs = hashes(REPO/'figures')
    seen = []
    def fake_run_notebook(src, dst, parameters=None, **kw):                    # what the notebooks would write, where they are told
        seen.append(parameters)
        if 'FIG_DIR' in parameters:
            Path(parameters['FIG_DIR']).mkdir(parents=True, exist_ok=True)
            (Path(parameters['FIG_DIR'])/'demo_curves.png').write_bytes(b'png')
        if 'RESULTS_DIR' in parameters:
            Path(parameters['RESULTS_DIR']).mkdir(parents=True, exist_ok=True)
            (Path(parameters['RESULTS_DIR'])/'results.json').write_text(json.dumps({'table': '', 'summary': {}}))
        return dst
    monkeypatch.setattr(E, 'run_notebook', fake_run_notebook)
    import inspect
    from tps.data.synthetic import make_synthetic
    defaults = {k: p.default for k, p in inspect.signature(make_synthetic).parameters.items()}
    syn = {**{k: defaults[k] for k in E.DEMO_DATA}, **SMOKE_SYNTHETIC}       # exactly the smoke benchmark: reused as it is
    data = hashes(data_copy)
    r = E.run_demo(out=tmp_path/'out', data=data_copy, make_data=syn, progress=False)
    assert hashes(data_copy) == data                                        # the benchmark of these parameters is reused
    assert all(Path(f).resolve().is_relative_to((tmp_path/'out').resolve()) for f in r['figures']) and r['figures']
    assert [Path(p['FIG_DIR']) for p in seen] == [(tmp_path/'out'/'figures').resolve()] * 2
    seen.clear()
    r = E.run_demo(out=tmp_path/'out2', data=data_copy, make_data=syn, progress=False, figures=tmp_path/'figs', results=tmp_path/'res')
    assert [Path(p['FIG_DIR']) for p in seen] == [(tmp_path/'figs').resolve()] * 2 and (tmp_path/'res'/'results.json').exists()
    assert hashes(REPO/'figures') == repo_figs


@pytest.mark.slow   # training subprocesses / the demo
def test_demo_on_a_foreign_benchmark_names_the_way_out(data_copy, monkeypatch):
    "`tps demo --data D` where D holds a benchmark of other options: no --overwrite to suggest, but --data or deleting D; D untouched."
    monkeypatch.delenv('TPS_SMOKE', raising=False)
    before = hashes(data_copy)
    rc, _, err = cli(['demo', '--data', data_copy, '--out', data_copy.parent/'out', '--device', 'cpu'])
    msg = error_line(err)
    assert rc == 2 and str(data_copy) in msg and "expected the demo's own or none" in msg and '--data NEW_FOLDER' in msg
    assert '--overwrite' not in msg and hashes(data_copy) == before


# ---------------------------------------------------------------- 7. kills: SIGKILL at a random iteration, Ctrl-C
ITERS, SAVE_EVERY = 8, 2


def _train_argv(smoke_data, run_dir) -> list:
    return [sys.executable, '-m', 'tps.cli', 'train', '--preset', 'smoke', *data_ov(smoke_data), f'train.iters={ITERS}',
            f'train.save_every={SAVE_EVERY}', 'train.log_every=1', 'train.method=tps', '--run-dir', str(run_dir)]


@pytest.fixture(scope='module')
def reference_run(smoke_data, tmp_path_factory):
    "The uninterrupted run the interrupted ones must equal."
    d = tmp_path_factory.mktemp('reference')/'run'
    r = subprocess.run(_train_argv(smoke_data, d), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _wait_for(proc, run_dir, n_lines: int, need_checkpoint: bool = True, timeout=300):
    "Wait until `metrics.jsonl` holds `n_lines` lines (and a checkpoint exists, if asked) while the process runs."
    t0 = time.time()
    m = run_dir/'metrics.jsonl'
    while time.time() - t0 < timeout and proc.poll() is None:
        if m.exists() and m.read_text().count('\n') >= n_lines and (not need_checkpoint or list((run_dir/'checkpoints').glob('iter_*.pth'))):
            return
        time.sleep(0.01)
    raise AssertionError(f"{run_dir}: {n_lines} log lines{' and a checkpoint' if need_checkpoint else ''} never appeared (exit {proc.poll()})")


def _same_as_reference(run_dir, ref):
    from tps.runs import load_training_checkpoint
    a = load_training_checkpoint(ref/'checkpoints'/f'iter_{ITERS:07d}.pth')
    b = load_training_checkpoint(run_dir/'checkpoints'/f'iter_{ITERS:07d}.pth')
    assert a['model'].keys() == b['model'].keys()
    diff = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not diff, f"weights differ from the uninterrupted run: {diff[:5]}"
    la, lb = ((p/'metrics.jsonl').read_text().splitlines() for p in (ref, run_dir))
    assert len(la) == len(lb) == ITERS, (len(la), len(lb))
    for x, y in zip(la, lb):
        x, y = json.loads(x), json.loads(y)
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert (run_dir/'done.json').exists() and not tmp_files(run_dir)


@pytest.mark.slow   # training subprocesses / the demo
def test_sigkill_at_a_random_iteration_then_the_printed_resume_command(smoke_data, reference_run, tmp_path):
    kill_after = random.Random(18).randint(SAVE_EVERY + 1, ITERS - 1)      # fixed seed: reproducible, after a checkpoint
    run = tmp_path/'run'
    with open(tmp_path/'stderr.txt', 'w') as errf:
        p = subprocess.Popen(_train_argv(smoke_data, run), env=ENV, stdout=subprocess.DEVNULL, stderr=errf, text=True)
        try:
            _wait_for(p, run, kill_after)
            p.send_signal(signal.SIGKILL)
        finally: p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    err = (tmp_path/'stderr.txt').read_text()
    m = re.search(r'continue with: (tps train --resume .+)$', err, re.M)       # announced when the folder was made
    assert m, err[-2000:]
    assert not (run/'done.json').exists() and list((run/'checkpoints').glob('iter_*.pth'))
    r = subprocess.run(tps_command(m.group(1)), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_as_reference(run, reference_run)
    resumes = json.loads((run/'run.json').read_text())['resumes']
    assert len(resumes) == 1 and resumes[0]['from_iter'] % SAVE_EVERY == 0 and SAVE_EVERY <= resumes[0]['from_iter'] < ITERS


@pytest.mark.slow   # training subprocesses / the demo
def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(smoke_data, reference_run, tmp_path):
    stop_after = random.Random(1818).randint(1, ITERS - 2)
    run = tmp_path/'run'
    p = subprocess.Popen(_train_argv(smoke_data, run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(p, run, stop_after, need_checkpoint=False)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, err[-2000:]
    m = re.search(rf'SIGINT: stopped after iteration (\d+) of {ITERS}; checkpoint (\S+) written\. Continue with: (tps train --resume .+)$', err, re.M)
    assert m, err[-2000:]
    n, ck = int(m.group(1)), Path(m.group(2))
    assert ck == (run/'checkpoints'/f'iter_{n:07d}.pth').resolve() or ck == run/'checkpoints'/f'iter_{n:07d}.pth'
    assert ck.exists() and n < ITERS and not (run/'done.json').exists()
    assert len((run/'metrics.jsonl').read_text().splitlines()) == n
    r = subprocess.run(tps_command(m.group(3)), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_as_reference(run, reference_run)


# ---------------------------------------------------------------- 8. `tps flow` workers die with their parent
def _children() -> dict:
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try: ppid = int(Path(f'/proc/{d}/stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(); out += kids.get(p, []); todo += kids.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError): return False


@pytest.mark.slow   # training subprocesses / the demo
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_flow_workers_die_with_their_parent(smoke_data, tmp_path):
    out = tmp_path/'flows'
    cmd = [sys.executable, '-m', 'tps.cli', 'flow', '--dataset', 'cityscapes', '--root', str(smoke_data/'cityscapes'),
           '--split', 'train', '--out', str(out), '--interval', *map(str, range(1, 18)), '--size', '2048x1024',
           '--workers', '2', '--quiet']
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = []
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and p.poll() is None:
            kids = _descendants(p.pid)
            if len(kids) >= 3 and list(out.rglob('*_int16_x10.npy')): break      # fork server + 2 workers, writing
            time.sleep(0.02)
        kids = _descendants(p.pid)
        assert p.poll() is None and len(kids) >= 3, f"workers never ran (exit {p.poll()}, {kids})"
        p.send_signal(signal.SIGKILL); p.wait(timeout=30)
        t0 = time.time()
        while time.time() - t0 < 10 and any(_alive(k) for k in kids): time.sleep(0.1)
        left = [k for k in kids if _alive(k)]
        assert not left, f"worker processes {left} survived their parent"
    finally:
        for k in kids:
            if _alive(k):
                try: os.kill(k, signal.SIGKILL)
                except ProcessLookupError: pass
        if p.poll() is None: p.kill()


# ---------------------------------------------------------------- 9. launch environment
@pytest.mark.parametrize('fault, env, pieces', [
    ('rank_not_a_number', {'RANK': 'zero', 'WORLD_SIZE': '2'}, ["RANK='zero'", 'expected a whole number']),
    ('slurm_without_rendezvous', {'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_LOCALID': '0'},
     ['MASTER_ADDR', 'MASTER_PORT', 'SLURM_JOB_NODELIST', 'SLURM_JOB_ID', 'expected']),
])
def test_bad_launch_environment_is_named(fault, env, pieces):
    from tps.distributed import distributed_env
    with pytest.raises((ValueError, RuntimeError)) as e: distributed_env(env)
    for p in pieces: assert p in str(e.value), (p, str(e.value))

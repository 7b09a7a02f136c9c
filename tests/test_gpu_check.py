"The GPU check script (tests/gpu_check.py): its dry run on a CPU end to end, argument errors, time budgets and stopping."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'tests'))
import gpu_check as G

SCRIPT = REPO / 'tests' / 'gpu_check.py'
STATUSES = {'ok', 'failed', 'timeout', 'skipped', 'stopped', 'interrupted'}


def _cli(*args, timeout=60):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope='module')
def dry(tmp_path_factory):
    "One dry run through the shell wrapper: its exit status, output and result folder."
    d = tmp_path_factory.mktemp('gpu_check')
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1'}
    t = time.monotonic()
    p = subprocess.run(['bash', str(REPO / 'tests' / 'gpu_check.sh'), '--dry-run', '--out', d / 'out', '--work', d / 'work',
                        '--wheels', d / 'no_wheels'], capture_output=True, text=True, timeout=300, env=env)
    return p, d / 'out', time.monotonic() - t


def test_dry_run_writes_summary_with_every_stage(dry):
    p, out, seconds = dry
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['dry_run'] is True and s['gpu'] is None and s['versions']['torch']
    assert [st['name'] for st in s['stages']] == list(G.STAGES)            # every stage, in order
    for st in s['stages']:
        assert st['status'] in STATUSES and st['seconds'] >= 0
        if st['status'] == 'skipped': assert st['reason'], st      # a skipped stage says why
    by = {st['name']: st for st in s['stages']}
    assert by['cuda_notebooks']['status'] == 'skipped' and 'CUDA' in by['cuda_notebooks']['reason']
    assert by['cuda_tests']['status'] == 'skipped' and 'no CUDA device' in by['cuda_tests']['reason']
    # the CUDA tests were collected: the selection keeps the kernel's tests and drops plain CPU ones
    tests = by['cuda_tests']['tests']
    assert by['cuda_tests']['collected'] == len(tests) > 10
    assert 'tests/test_warp.py::test_cuda_opcheck[False]' in tests and 'tests/test_benchmark.py::test_fast_step_on_cuda' in tests
    assert not any('test_r101_flops_at_paper_sizes' in t or t.startswith('tests/test_docs.py') for t in tests)
    assert by['harness']['status'] in STATUSES - {'failed', 'timeout', 'interrupted'}
    if by['harness']['status'] == 'skipped': assert by['harness']['reason'] == 'tps benchmark not available'
    assert s['seconds'] <= s['budget_s'] and seconds < 240


def test_dry_run_numbers_come_from_the_notebooks(dry):
    _, out, _ = dry
    s = json.loads((out / 'summary.json').read_text())
    by = {st['name']: st['status'] for st in s['stages']}
    if by['benchmark'] == 'skipped': pytest.skip('papermill is not installed here')
    assert by['benchmark'] == by['warp_benchmark'] == 'ok'
    b = json.loads((out / 'benchmark_results.json').read_text())
    w = json.loads((out / 'warp_benchmark.json').read_text())
    m = s['measured']
    assert b['profile'] == 'smoke' and m['benchmark']['profile'] == 'smoke'
    assert m['speedup'] == b['speedup'] and m['fast_ms_per_iter'] == b['steps']['fast']['ms_median'] > 0
    assert m['eval_fps'] == b['eval']['fast']['frames_per_s'] > 0 and m['fast_mfu'] == b['steps']['fast']['mfu']
    assert m['tps_40k_minutes'] == pytest.approx(40000 * b['steps']['fast']['ms_median'] / 60000)
    assert m['copy_gb_s'] == w['copy_gb_s'] and 0 < m['warp_frac_copy'] == max(
        r['frac_copy'] for r in w['rows'] if r['pass_'] == 'fwd' and r['impl'] == m['warp_at'].split()[0])
    assert m['loader']['keeps_up'] == b['loader']['keeps_up']
    assert set(s['goals']) == set(G.GOALS)
    for g in s['goals'].values():
        assert g['applies'] is False                               # smoke sizes on a CPU: no goal applies
        assert g['met'] == (g['value'] >= g['target'] if g['direction'] == 'min' else g['value'] <= g['target'])


def test_dry_run_files_fit_the_device_limits(dry):
    _, out, _ = dry
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and re.fullmatch(r'[A-Za-z0-9._-]+', f.name) for f in files)
    assert {'summary.json', 'gpu_check.png', 'gpu_check.log', 'notebooks.tar.gz'} <= {f.name for f in files}
    png = (out / 'gpu_check.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    s = json.loads((out / 'summary.json').read_text())
    assert set(s['files']) == {f.name for f in files}
    log = (out / 'gpu_check.log').read_text()
    assert '===== env.log' in log and 'cuda_tests_collect.log' in log


@pytest.mark.parametrize('args,message', [
    (['--no-such-option'], 'unrecognized arguments: --no-such-option'),
    (['--stages', 'env,bogus'], '--stages bogus: unknown; expected a comma-separated subset of env,setup'),
    (['--budget', '-5'], '--budget -5: expected a positive number of seconds'),
    (['--bench-param', 'iters'], "'iters': expected NAME=VALUE"),
    (['--budget', 'soon'], "invalid float value: 'soon'"),
])
def test_bad_arguments_exit_nonzero_with_a_clear_message(args, message):
    p = _cli('--dry-run', *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert 'usage: gpu_check.py' in p.stderr and not p.stdout


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / 'file'; f.write_text('x')
    p = _cli('--dry-run', '--out', f)
    assert p.returncode == 2 and f'--out {f}: exists and is not a folder' in p.stderr


def test_help_lists_the_stages():
    p = _cli('--help')
    assert p.returncode == 0 and all(s in p.stdout for s in G.STAGES) and '--dry-run' in p.stdout


def test_bench_param_values_are_json():
    a = G.parse_args(['--dry-run', '--bench-param', 'TRACK_ITERS=100', '--bench-param', 'ARCH=resnet50', '--bench-param', 'SOURCE_SIZE=[640, 360]'])
    assert a.bench_param == {'TRACK_ITERS': 100, 'ARCH': 'resnet50', 'SOURCE_SIZE': [640, 360]}
    assert a.budget == 150 and G.parse_args([]).budget == 480 and a.stages == list(G.STAGES)


def test_no_time_left_skips_every_stage_with_the_reason(tmp_path):
    t = time.monotonic()
    rc = G.main(['--dry-run', '--budget', '5', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work')])
    s = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    assert rc == 0 and [st['name'] for st in s['stages']] == list(G.STAGES) and time.monotonic() - t < 30
    for st in s['stages']:
        assert st['status'] == 'skipped'
        assert ('dry run' in st['reason']) if st['name'] == 'cuda_notebooks' else st['reason'].startswith('no time left')
    assert all(g['value'] is None and g['met'] is None for g in s['goals'].values())
    assert (tmp_path / 'out' / 'gpu_check.png').stat().st_size > 5000


def test_budget_keeps_time_for_later_stages(tmp_path):
    a = G.parse_args(['--out', str(tmp_path / 'o'), '--work', str(tmp_path / 'w')])     # a device run's budgets, 480 s
    c = G.Check(a)
    later = sum(G.BUDGETS[s][2] for s in G.STAGES[G.STAGES.index('setup') + 1:])
    assert c.allowed('setup') == pytest.approx(min(G.BUDGETS['setup'][0], 480 - later), abs=1)
    c.t0 -= 400                                                  # 80 s left
    assert c.allowed('benchmark') == pytest.approx(80, abs=1)     # the last capped stage takes what is left
    assert c.allowed('warp_benchmark') < G.MIN_STAGE_S           # ... and an earlier one yields to it
    assert c.allowed('harness') == pytest.approx(80, abs=1)       # the harness has no cap of its own


def test_run_stops_a_stage_at_its_budget(tmp_path):
    c = G.Check(G.parse_args(['--dry-run', '--out', str(tmp_path / 'o'), '--work', str(tmp_path / 'w')]))
    t = time.monotonic()
    rc, sec, to = c.run('sleepy', [sys.executable, '-c', 'import time; print("started", flush=True); time.sleep(60)'], 1.5, grace=2)
    assert to and rc == -signal.SIGTERM and sec < 10 and time.monotonic() - t < 10
    # a child that ignores SIGTERM is killed after the grace period
    code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print("up", flush=True); time.sleep(60)'
    rc, sec, to = c.run('stubborn', [sys.executable, '-c', code], 1.5, grace=1)
    assert to and rc == -signal.SIGKILL and sec < 10
    log = (c.logs / 'sleepy.log').read_text()
    assert 'started' in log and 'stopped after 2 s' in log
    # a grandchild in a session of its own (as a papermill kernel is) goes too
    code = ('import subprocess, sys, time; k = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], '
            'start_new_session=True); print("kid", k.pid, flush=True); time.sleep(60)')
    rc, sec, to = c.run('family', [sys.executable, '-c', code], 2, grace=1)
    kid = int(re.search(r'kid (\d+)', (c.logs / 'family.log').read_text())[1])
    time.sleep(0.5)
    stat = Path(f'/proc/{kid}/stat')
    assert to and (not stat.exists() or stat.read_text().rsplit(')', 1)[1].split()[0] == 'Z')   # gone or a reaped-to-be zombie
    rc, sec, to = c.run('quick', [sys.executable, '-c', 'raise SystemExit(3)'], 20)
    assert (rc, to) == (3, False)


def test_goal_table_directions():
    m = {'benchmark': {'arch': 'resnet101', 'source_size': [1280, 720], 'target_size': [1024, 512]},
         'speedup': 4.5, 'fast_mfu': 0.3, 'eval_fps': 50.0, 'warp_frac_copy': 0.8, 'warp_at': 'cuda forward at 19x512x1024',
         'tps_40k_minutes': 31.0}
    g = G.goal_table(m, gpu=True)
    assert [g[k]['met'] for k in ('speedup', 'fast_mfu', 'eval_fps', 'warp_frac_copy', 'tps_40k_minutes')] == [True, False, True, True, False]
    assert all(v['applies'] for v in g.values())
    m['warp_at'] = 'grid_sample forward at 19x512x1024'; m['benchmark']['arch'] = 'resnet18'
    g = G.goal_table(m, gpu=True)
    assert not any(v['applies'] for v in g.values())
    assert not any(v['applies'] for v in G.goal_table({**m, 'benchmark': {}}, gpu=False).values())


def test_sigterm_still_writes_the_summary_and_stops_the_stage(tmp_path):
    "Stopped from outside mid-stage (a device run's own time limit): the child is killed, the summary says what ran."
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'MPLBACKEND': 'Agg'}
    p = subprocess.Popen([sys.executable, str(SCRIPT), '--dry-run', '--stages', 'env,benchmark', '--out', tmp_path / 'out',
                          '--work', tmp_path / 'work'], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary, t = tmp_path / 'out' / 'summary.json', time.monotonic()
    while time.monotonic() - t < 60 and not (summary.is_file() and '"env"' in summary.read_text()): time.sleep(0.2)
    time.sleep(2)                                                  # the benchmark notebook is running now
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 128 + signal.SIGTERM, out
    s = json.loads(summary.read_text())
    by = {st['name']: st for st in s['stages']}
    assert list(by) == list(G.STAGES) and by['env']['status'] == 'ok' and by['setup']['reason'] == 'not selected (--stages)'
    assert by['benchmark']['status'] == 'interrupted' and 'finished' in s and (tmp_path / 'out' / 'gpu_check.png').is_file()
    assert '$ ' in (tmp_path / 'work' / 'logs' / 'benchmark.log').read_text()   # the stage had started its notebook


FAKE_HARNESS = """
import json, sys, time
from pathlib import Path
if '--help' in sys.argv: print('usage: tps benchmark [--methods M ...] [--out DIR] [--device DEV]'); sys.exit(0)
out = Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True, exist_ok=True)
(out / 'records.jsonl').write_text(json.dumps({'device': sys.argv[sys.argv.index('--device') + 1], 'args': sys.argv[1:]}) + '\\n')
(out / 'big.bin').write_bytes(b'x' * (5 << 20))               # too large to come back
time.sleep(120)
"""


def test_harness_is_stopped_at_the_deadline_and_keeps_its_records(tmp_path):
    import tarfile
    fake = tmp_path / 'fake_harness.py'; fake.write_text(FAKE_HARNESS)
    t = time.monotonic()
    rc = G.main(['--dry-run', '--stages', 'harness', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work'),
                 '--harness-cmd', f'{sys.executable} {fake}', '--harness-args', '--methods tps oracle'])
    s = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    h = {st['name']: st for st in s['stages']}['harness']
    assert rc == 0 and h['status'] == 'stopped' and 'stopped at the deadline' in h['reason'] and time.monotonic() - t < 60
    assert h['command'].endswith('--device cpu --methods tps oracle') and h['files'] == 2
    with tarfile.open(tmp_path / 'out' / 'harness.tar.gz') as tf:
        assert tf.getnames() == ['records.jsonl']
        rec = json.loads(tf.extractfile('records.jsonl').read())
    assert rec['device'] == 'cpu' and rec['args'][-3:] == ['--methods', 'tps', 'oracle']

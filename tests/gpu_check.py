#!/usr/bin/env python3
"""One timed pass over everything that needs a CUDA GPU, for a single H100/H200 lent for a few minutes.

Stages, in order, each under its own wall-clock budget inside a total one (default 480 s):
  env             GPU name, torch / CUDA / driver / nvcc versions
  setup           Python packages the machine lacks, installed from a folder of wheels (`--wheels`), and the
                  CUDA warp extension compiled once (the tests and notebooks then load it from the cache)
  cuda_tests      the pytest tests that need CUDA (selected by this file acting as a pytest plugin)
  cuda_notebooks  the notebooks' `#| cuda` cells (`nbdev_test --flags cuda --path ...`)
  warp_benchmark  nbs/experiments/warp_benchmark.ipynb through papermill: the warp kernel's GB/s against copy
  benchmark       nbs/experiments/benchmark.ipynb through papermill at the paper's sizes (R101, 1280x720 / 1024x512)
  harness         `tps benchmark --device cuda` for whatever time is left, stopped at the deadline
Everything goes to `--out` (at most 8 flat files: summary.json, gpu_check.png, gpu_check.log, benchmark_results.json,
benchmark.png, warp_benchmark.json, notebooks.tar.gz, harness.tar.gz); scratch (generated data, caches) to `--work`.
`--dry-run` runs the same path on a CPU at smoke sizes, with the CUDA parts skipped and listed with the reason.
`--fetch-wheels DIR` downloads the wheels the device lacks (run it where pip reaches a registry).
"""
import argparse, json, os, re, shlex, shutil, signal, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ('env', 'setup', 'cuda_tests', 'cuda_notebooks', 'warp_benchmark', 'benchmark', 'harness')
# stage -> (cap in seconds on a GPU, cap in a dry run, seconds kept back for it while earlier stages run)
# The benchmark notebook's numbers are the check's main product: 200 s stay reserved for it whatever ran before.
BUDGETS = {'env': (40, 40, 0), 'setup': (150, 30, 0), 'cuda_tests': (100, 60, 45), 'cuda_notebooks': (60, 0, 20),
           'warp_benchmark': (40, 40, 20), 'benchmark': (240, 90, 200), 'harness': (None, 10, 0)}
MIN_STAGE_S = 10          # a stage given less than this is skipped for lack of time
# Benchmark notebook parameters: the paper's sizes, fewer timed / tracked iterations so that it fits the budget.
BENCH_GPU = {'PROFILE': 'paper', 'DEVICE': 'cuda', 'SPEED_PRESET': 'paper', 'WARMUP': 5, 'ITERS': 20,
             'EVAL_ITERS': 20, 'TRACK_ITERS': 40, 'TRACK_WINDOW': 10, 'LOADER_SAMPLES': 32}
BENCH_DRY = {'PROFILE': 'smoke', 'DEVICE': 'cpu', 'THREADS': 1}
WARP_GPU = {'DEVICE': 'cuda', 'MIN_TIME': 0.2}
WARP_DRY = {'DEVICE': 'cpu', 'SIZES': [[3, 16, 32]], 'IMPLS': ['torch', 'grid_sample'], 'MIN_TIME': 0.01, 'BACKWARD': False}
NEEDED_MODULES = ('papermill', 'nbdev', 'execnb', 'ipykernel', 'nbformat', 'cityscapesscripts')
# Wheels the device image lacks (its package list: the device notes), pinned to the versions the kit is tested with.
# `typing` (a stdlib back-port) and cityscapesscripts' own requirements are left out: the kit imports only its label table.
WHEELS = ('asttokens==3.0.2 astunparse==1.6.3 cityscapesscripts==2.3.0 comm==0.2.3 debugpy==1.8.22 entrypoints==0.4.2 '
          'execnb==0.1.18 executing==2.3.0 fastcore==1.14.5 fastgit==0.1.4 fastjsonschema==2.22.3 fastspec==0.1.0 '
          'ghapi==2.0.3 ipykernel==7.4.0 ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0 '
          'jsonschema-specifications==2025.9.1 jupyter-client==8.10.0 jupyter-core==5.9.1 matplotlib-inline==0.2.2 '
          'nbclient==0.11.0 nbdev==2.4.14 nbformat==5.11.1 nest-asyncio2==1.7.4 papermill==2.7.0 parso==0.8.7 '
          'pexpect==4.9.0 platformdirs==4.14.9 prompt-toolkit==3.0.53 ptyprocess==0.7.0 pure-eval==0.2.4 pyzmq==27.3.0 '
          'referencing==0.37.0 rpds-py==2026.9.1 stack-data==0.6.3 tenacity==9.2.1 tornado==6.6.1 traitlets==5.16.1 '
          'watchdog==7.1.0 wcwidth==0.9.4').split()
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux1_x86_64')
# The goals: key -> (label, target, 'min' (value >= target) or 'max' (value <= target), unit)
GOALS = {'speedup': ('fast step / baseline', 4.0, 'min', 'x'), 'fast_mfu': ('fast step MFU', 0.35, 'min', ''),
         'eval_fps': ('evaluation 1024x512 -> 2048x1024', 50.0, 'min', 'frames/s'),
         'warp_frac_copy': ('warp kernel / copy bandwidth', 0.70, 'min', ''),
         'tps_40k_minutes': ('40k-iteration TPS run', 30.0, 'max', 'min')}


# ---------------------------------------------------------------- pytest plugin: keep the tests that need CUDA
_CUDA_SRC = re.compile(r"torch\.cuda\.|\.cuda\(|device=['\"]cuda|['\"]cuda['\"]")

def needs_cuda(item) -> bool:
    "A test needs CUDA when a skipif names a GPU / CUDA, its name (with parameters) says cuda, or its code uses CUDA."
    for m in item.iter_markers('skipif'):
        if re.search(r'gpu|cuda', str(m.kwargs.get('reason', '')), re.I): return True
    if 'cuda' in item.name.lower(): return True
    fn = getattr(item, 'function', None)
    try:
        import inspect
        return bool(fn and _CUDA_SRC.search(inspect.getsource(fn)))
    except (OSError, TypeError): return False

def pytest_collection_modifyitems(config, items):
    if os.environ.get('TPS_GPU_CHECK_SELECT') != '1': return
    keep = [i for i in items if needs_cuda(i)]
    drop = [i for i in items if not needs_cuda(i)]
    if drop: config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ---------------------------------------------------------------- running one stage
class Check:
    "The run: budgets, the environment of the child processes, the summary written after every stage."
    def __init__(self, a):
        self.a, self.t0 = a, time.monotonic()
        self.out, self.work = Path(a.out), Path(a.work)
        self.logs = self.work / 'logs'
        for d in (self.out, self.logs): d.mkdir(parents=True, exist_ok=True)
        self.py = a.python or sys.executable
        self.site = self.work / 'site'
        self.cuda, self.missing = False, []
        self.env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MPLBACKEND': 'Agg',
                    'PYTHONPATH': os.pathsep.join([str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])])}
        if a.dry_run: self.env.setdefault('OMP_NUM_THREADS', '1')
        self.summary = {'dry_run': a.dry_run, 'budget_s': a.budget, 'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                        'argv': sys.argv[1:], 'gpu': None, 'versions': {}, 'stages': [], 'measured': {}, 'goals': {}, 'files': []}

    def left(self) -> float: return self.a.budget - (time.monotonic() - self.t0)

    def allowed(self, stage: str) -> float:
        "Seconds this stage may take: its cap, less what the later stages are guaranteed."
        cap = BUDGETS[stage][1 if self.a.dry_run else 0]
        later = STAGES[STAGES.index(stage) + 1:]
        keep = sum(BUDGETS[s][2] for s in later if s in self.a.stages and not self.a.dry_run)
        room = self.left() - keep
        return room if cap is None else min(cap, room)

    def record(self, name, status, seconds=0.0, rc=None, reason='', budget=None, **details):
        self.summary['stages'].append({'name': name, 'status': status, 'rc': rc, 'seconds': round(seconds, 1),
                                       'budget_s': None if budget is None else round(budget, 1), 'reason': reason, **details})
        print(f"== {name}: {status}" + (f" rc={rc}" if rc is not None else '') + f" {seconds:.1f} s" + (f" ({reason})" if reason else ''), flush=True)
        self.write_summary()

    def run(self, name, cmd, budget, log_name=None, grace=15, cwd=REPO):
        "Run `cmd` in its own process group; SIGTERM at the budget, SIGKILL `grace` s later. Returns (rc, seconds, timed_out)."
        log = self.logs / f"{log_name or name}.log"
        t = time.monotonic()
        with open(log, 'ab') as f:
            f.write(f"$ {shlex.join(map(str, cmd))}\n".encode()); f.flush()
            p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try: return p.wait(timeout=max(1.0, budget)), time.monotonic() - t, False
            except BaseException as e:
                tree = _descendants(p.pid)     # a papermill kernel runs in a session of its own: found by parentage
                if not isinstance(e, subprocess.TimeoutExpired):     # interrupted: leave nothing behind
                    _kill(p.pid, tree, signal.SIGKILL); raise
                _kill(p.pid, tree, signal.SIGTERM)
                try: p.wait(timeout=grace)
                except subprocess.TimeoutExpired: pass
                _kill(p.pid, tree | _descendants(p.pid), signal.SIGKILL)
                p.wait(timeout=10)
                f.write(f"\n[gpu_check] stopped after {budget:.0f} s\n".encode())
                return p.returncode, time.monotonic() - t, True

    def write_summary(self):
        s = self.summary
        s['seconds'] = round(time.monotonic() - self.t0, 1)
        p = self.out / 'summary.json'; tmp = p.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(s, indent=1, default=str)); os.replace(tmp, p)


def _descendants(pid: int) -> set:
    "Pids of every process below `pid`, read from /proc (empty where there is none)."
    parent = {}
    for d in Path('/proc').glob('[0-9]*'):
        try: parent[int(d.name)] = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError): continue
    out, todo = set(), [pid]
    while todo:
        top = todo.pop()
        kids = [k for k, v in parent.items() if v == top and k not in out]
        out.update(kids); todo += kids
    return out

def _kill(pid: int, tree: set, sig):
    "Signal the process group of `pid` and every process in `tree` (those that still exist)."
    for f, x in [(os.killpg, pid), *((os.kill, k) for k in tree)]:
        try: f(x, sig)
        except (ProcessLookupError, PermissionError): pass

def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # the summary, plot and logs are still written on the way out


def _py_json(c: Check, code: str, name: str, budget: float):
    "Run a Python snippet that prints one JSON line last; its value or None."
    rc, _, _ = c.run(name, [c.py, '-c', code], budget)
    lines = (c.logs / f'{name}.log').read_text(errors='replace').strip().splitlines()
    try: return json.loads(lines[-1]) if rc == 0 and lines else None
    except json.JSONDecodeError: return None


def stage_env(c: Check, budget: float):
    code = ("import json, platform, torch; ok = torch.cuda.is_available(); p = torch.cuda.get_device_properties(0) if ok else None\n"
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(),"
            "'cudnn': torch.backends.cudnn.version(), 'cuda_available': ok, 'name': torch.cuda.get_device_name(0) if ok else None,"
            "'capability': list(torch.cuda.get_device_capability(0)) if ok else None,"
            "'memory_gib': round(p.total_memory / 2**30, 1) if ok else None, 'sms': p.multi_processor_count if ok else None}))")
    t = time.monotonic()
    info = _py_json(c, code, 'env', budget)
    if info is None: return c.record('env', 'failed', time.monotonic() - t, 1, 'torch did not report (see gpu_check.log)', budget)
    c.summary['versions'] = {k: info[k] for k in ('torch', 'cuda', 'cudnn', 'python')}
    c.cuda = bool(info['cuda_available']) and not c.a.dry_run
    if info['cuda_available']: c.summary['gpu'] = {k: info[k] for k in ('name', 'capability', 'memory_gib', 'sms')}
    for key, cmd, pat in (('nvcc', ['nvcc', '--version'], r'release ([\d.]+)'),
                          ('driver', ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], r'([\d.]+)')):
        try:
            m = re.search(pat, subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout)
            c.summary['versions'][key] = m[1] if m else None
        except (OSError, subprocess.TimeoutExpired): c.summary['versions'][key] = None
    why = '' if c.cuda else ('dry run: the CUDA parts are skipped' if c.a.dry_run else 'no CUDA device: the CUDA parts are skipped')
    c.record('env', 'ok', time.monotonic() - t, 0, why, budget)


def stage_setup(c: Check, budget: float):
    t, steps = time.monotonic(), {}
    check = f"import importlib.util, json; print(json.dumps([m for m in {list(NEEDED_MODULES)!r} if importlib.util.find_spec(m) is None]))"
    missing = _py_json(c, check, 'setup', budget)
    missing = list(NEEDED_MODULES) if missing is None else missing
    wheels = sorted(Path(c.a.wheels).glob('*.whl')) if c.a.wheels else []
    if missing and wheels:
        t1 = time.monotonic()
        rc, _, _ = c.run('setup', [c.py, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir',
                                   '--upgrade', '--target', c.site, *wheels], budget - (t1 - t))
        steps['install_wheels'] = {'rc': rc, 'wheels': len(wheels), 'seconds': round(time.monotonic() - t1, 1), 'target': str(c.site)}
        c.env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(c.site), *filter(None, [os.environ.get('PYTHONPATH')])])
        c.env['PATH'] = os.pathsep.join([str(c.site / 'bin'), c.env.get('PATH', '')])
        missing = _py_json(c, check, 'setup', 30)
        missing = list(NEEDED_MODULES) if missing is None else missing
    c.missing = missing
    if c.cuda:
        t1 = time.monotonic()
        rc, sec, to = c.run('setup', [c.py, '-c', 'import tps.warp as W; W.build_cuda_extension(verbose=True); print("built")'],
                            budget - (t1 - t))
        steps['build_cuda_extension'] = {'rc': rc, 'seconds': round(sec, 1), 'timed_out': to}
    else: steps['build_cuda_extension'] = {'skipped': 'no CUDA device'}
    bad = [k for k, v in steps.items() if v.get('rc') not in (0, None)]
    reason = (f"missing modules: {', '.join(missing)}" + ('' if wheels else f" (no wheels in {c.a.wheels!r})")) if missing else ''
    if bad: reason = '; '.join(filter(None, [reason, 'failed: ' + ', '.join(bad)]))
    c.record('setup', 'failed' if bad or missing else 'ok', time.monotonic() - t, 1 if bad or missing else 0, reason, budget,
             steps=steps, missing=missing)


def _cuda_test_files():
    return sorted(str(p.relative_to(REPO)) for p in (REPO / 'tests').glob('test_*.py') if re.search('cuda', p.read_text(), re.I))

def stage_cuda_tests(c: Check, budget: float):
    files, t = _cuda_test_files(), time.monotonic()
    c.env['TPS_GPU_CHECK_SELECT'] = '1'
    c.env['PYTHONPATH'] = os.pathsep.join([c.env['PYTHONPATH'], str(REPO / 'tests')])
    base = [c.py, '-m', 'pytest', *files, '-p', 'gpu_check', '-p', 'no:cacheprovider', '-q', '--continue-on-collection-errors']
    rc, _, _ = c.run('cuda_tests_collect', [*base, '--collect-only'], min(budget, 60))
    log = (c.logs / 'cuda_tests_collect.log').read_text(errors='replace')
    ids = [ln.strip() for ln in log.splitlines() if '::' in ln and not ln.startswith('$')]
    if not c.cuda:
        return c.record('cuda_tests', 'skipped', time.monotonic() - t, rc, 'no CUDA device: tests collected, not run', budget,
                        collected=len(ids), tests=ids)
    junit = c.logs / 'cuda_tests.xml'
    rc, _, to = c.run('cuda_tests', [*base, '-rfEs', f'--junitxml={junit}', '--timeout', '300'], budget - (time.monotonic() - t))
    counts = {}
    if junit.is_file():
        m = re.search(r'<testsuite [^>]*', junit.read_text(errors='replace'))
        counts = {k: int(v) for k, v in re.findall(r'(tests|errors|failures|skipped)="(\d+)"', m[0] if m else '')}
    fails = re.findall(r'^(?:FAILED|ERROR) (\S+)', (c.logs / 'cuda_tests.log').read_text(errors='replace'), re.M)
    c.record('cuda_tests', 'timeout' if to else ('ok' if rc == 0 else 'failed'), time.monotonic() - t, rc,
             f'stopped after {budget:.0f} s' if to else '', budget, collected=len(ids), counts=counts, failed_tests=fails)


def stage_cuda_notebooks(c: Check, budget: float):
    nbs = sorted(str(p.relative_to(REPO)) for p in (REPO / 'nbs').rglob('*.ipynb') if '#| cuda' in p.read_text())
    if not c.cuda: return c.record('cuda_notebooks', 'skipped', 0, None, 'no CUDA device', budget, notebooks=nbs)
    if 'nbdev' in c.missing: return c.record('cuda_notebooks', 'skipped', 0, None, 'nbdev not importable', budget, notebooks=nbs)
    t, res = time.monotonic(), {}
    for nb in nbs:
        left = budget - (time.monotonic() - t)
        if left < MIN_STAGE_S: res[nb] = 'skipped: no time left'; continue
        nbdev_test = shutil.which('nbdev_test', path=c.env['PATH']) or 'nbdev_test'
        rc, _, to = c.run('cuda_notebooks', [nbdev_test, '--flags', 'cuda', '--do_print', '--path', nb], left)
        res[nb] = 'timeout' if to else ('ok' if rc == 0 else f'failed (rc {rc})')
    bad = [k for k, v in res.items() if v != 'ok']
    c.record('cuda_notebooks', 'ok' if not bad else ('timeout' if any('timeout' in res[k] for k in bad) else 'failed'),
             time.monotonic() - t, 0 if not bad else 1, '; '.join(f'{k}: {res[k]}' for k in bad), budget, notebooks=res)


def _papermill(c: Check, name: str, nb: str, params: dict, budget: float):
    if 'papermill' in c.missing: return c.record(name, 'skipped', 0, None, 'papermill not importable', budget)
    out_dir = c.work / name; out_dir.mkdir(parents=True, exist_ok=True)
    params = {**params, 'OUT_DIR': str(out_dir)}
    code = ('import json, sys, papermill as pm; pm.execute_notebook(sys.argv[1], sys.argv[2], parameters=json.loads(sys.argv[3]), '
            'progress_bar=False, log_output=True, cwd=sys.argv[4])')
    rc, sec, to = c.run(name, [c.py, '-c', code, REPO / nb, c.logs / Path(nb).name, json.dumps(params), REPO], budget)
    c.record(name, 'timeout' if to else ('ok' if rc == 0 else 'failed'), sec, rc, f'stopped after {budget:.0f} s' if to else '',
             budget, notebook=nb, parameters=params)
    return out_dir

def stage_warp_benchmark(c: Check, budget: float):
    d = _papermill(c, 'warp_benchmark', 'nbs/experiments/warp_benchmark.ipynb', WARP_GPU if c.cuda else WARP_DRY, budget)
    if d and (d / 'warp_benchmark.json').is_file(): shutil.copy(d / 'warp_benchmark.json', c.out / 'warp_benchmark.json')

def stage_benchmark(c: Check, budget: float):
    params = {**(BENCH_GPU if c.cuda else BENCH_DRY), **c.a.bench_param}
    d = _papermill(c, 'benchmark', 'nbs/experiments/benchmark.ipynb', params, budget)
    for src, dst in (('results.json', 'benchmark_results.json'), ('benchmark.png', 'benchmark.png')):
        if d and (d / src).is_file(): shutil.copy(d / src, c.out / dst)


def stage_harness(c: Check, budget: float):
    t = time.monotonic()
    base = shlex.split(c.a.harness_cmd) if c.a.harness_cmd else [c.py, '-m', 'tps.cli', 'benchmark']
    rc, _, _ = c.run('harness_help', [*base, '--help'], min(budget, 30))
    help_text = (c.logs / 'harness_help.log').read_text(errors='replace')
    if rc != 0: return c.record('harness', 'skipped', time.monotonic() - t, rc, 'tps benchmark not available', budget)
    d = c.work / 'harness'
    cmd = list(base)
    if '--out' in help_text: cmd += ['--out', d]
    if '--device' in help_text: cmd += ['--device', 'cuda' if c.cuda else 'cpu']
    cmd += shlex.split(c.a.harness_args)
    rc, _, to = c.run('harness', cmd, budget - (time.monotonic() - t))
    files = sorted(str(p.relative_to(d)) for p in d.rglob('*') if p.is_file()) if d.is_dir() else []
    _tar(c.out / 'harness.tar.gz', d, max_file=4 << 20)
    c.record('harness', 'stopped' if to else ('ok' if rc == 0 else 'failed'), time.monotonic() - t, rc,
             f'stopped at the deadline ({budget:.0f} s); finished records kept' if to else '', budget,
             command=shlex.join(map(str, cmd)), files=len(files), file_names=files[:50])


def _tar(path: Path, folder: Path, max_file=8 << 20, total=14 << 20, suffixes=None):
    "A .tar.gz of the small files under `folder` (each <= max_file, together <= total before compression)."
    if not folder.is_dir(): return
    n, tmp = 0, path.with_suffix('.tmp')
    with tarfile.open(tmp, 'w:gz') as tf:
        for p in sorted(folder.rglob('*')):
            if not p.is_file() or (suffixes and p.suffix not in suffixes) or p.stat().st_size > max_file: continue
            if n + p.stat().st_size > total: break
            tf.add(p, arcname=str(p.relative_to(folder))); n += p.stat().st_size
    os.replace(tmp, path)


# ---------------------------------------------------------------- the numbers, the goals, the plot
def _load(p: Path):
    try: return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError): return None

def measured_numbers(out: Path) -> dict:
    "The numbers of the notebooks' result files in `out`, flattened; absent ones are left out."
    m, b, w = {}, _load(out / 'benchmark_results.json'), _load(out / 'warp_benchmark.json')
    if b:
        st, ev, ld, sp, P = b.get('steps', {}), b.get('eval', {}), b.get('loader', {}), b.get('davsn_speed', {}), b.get('params', {})
        m['benchmark'] = {'device': b.get('device'), 'profile': b.get('profile'), 'arch': P.get('ARCH'),
                          'source_size': P.get('SOURCE_SIZE'), 'target_size': P.get('TARGET_SIZE'),
                          'eval_sizes': [P.get('EVAL_INPUT_SIZE'), P.get('EVAL_LABEL_SIZE')], 'iters': P.get('ITERS')}
        for k in ('baseline', 'fast'):
            if k in st: m.update({f'{k}_ms_per_iter': st[k]['ms_median'], f'{k}_mfu': st[k]['mfu'], f'{k}_peak_mem_mb': st[k]['peak_mem_mb']})
            if k in ev: m[f'eval_{k}_fps'] = ev[k]['frames_per_s']
        m['speedup'], m['fast_mfu'], m['eval_fps'] = b.get('speedup'), m.get('fast_mfu'), m.get('eval_fast_fps')
        if 'fast_ms_per_iter' in m: m['tps_40k_minutes'] = 40000 * m['fast_ms_per_iter'] / 60000
        if ld: m['loader'] = {**ld, 'supply_over_need': min(ld['source_samples_per_s'], ld['target_samples_per_s']) / ld['needed_samples_per_s']}
        if sp: m['davsn_vs_tps'] = {**sp.get('s_per_iter', {}), 'davsn_over_tps': sp.get('davsn_over_tps'), 'sizes': sp.get('sizes')}
        m['host_syncs_per_fast_iter'] = b.get('host_syncs_per_fast_iter')
        m['limits'] = b.get('limits')
        if b.get('tracking'): m['tracking'] = {k: v for k, v in b['tracking'].items() if k != 'curves'}
    if w and w.get('rows'):
        m['copy_gb_s'] = w.get('copy_gb_s')
        m['warp'] = {f"{r['C']}x{r['H']}x{r['W']} {r['pass_']} {r['impl']}": {'ms': r['ms'], 'gb_s': r['gb_s'], 'frac_copy': r['frac_copy']}
                     for r in w['rows']}
        fwd = [r for r in w['rows'] if r['pass_'] == 'fwd']
        pick = [r for r in fwd if r['impl'] == 'cuda'] or fwd
        big = max(r['B'] * r['C'] * r['H'] * r['W'] for r in pick)
        r = max((r for r in pick if r['B'] * r['C'] * r['H'] * r['W'] == big), key=lambda r: r['gb_s'])
        m['warp_frac_copy'], m['warp_gb_s'] = r['frac_copy'], r['gb_s']
        m['warp_at'] = f"{r['impl']} forward at {r['C']}x{r['H']}x{r['W']}"
    return m

def goal_table(m: dict, gpu: bool) -> dict:
    "Each goal of the issue: value, target, met; `applies` only for a GPU run at the paper's sizes (the kernel for the warp)."
    b = m.get('benchmark', {})
    paper = b.get('arch') == 'resnet101' and b.get('source_size') == [1280, 720] and b.get('target_size') == [1024, 512]
    res = {}
    for k, (label, target, way, unit) in GOALS.items():
        v = m.get(k)
        applies = gpu and (m.get('warp_at', '').startswith('cuda') if k == 'warp_frac_copy' else paper)
        met = None if v is None else (v >= target if way == 'min' else v <= target)
        res[k] = {'label': label, 'value': v, 'target': target, 'direction': way, 'unit': unit, 'met': met, 'applies': bool(applies)}
    return res

def plot_goals(goals: dict, title: str, path: Path):
    "Bars of each measured number as a share of its goal (1 = goal reached), the values written on them."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ks = list(goals)
    fig, ax = plt.subplots(figsize=(11, 0.7 * len(ks) + 1.8))
    for i, k in enumerate(ks):
        g = goals[k]; v = g['value']
        share = 0 if v is None else (v / g['target'] if g['direction'] == 'min' else g['target'] / max(v, 1e-9))
        colour = 'lightgrey' if v is None else ('tab:green' if g['met'] else 'tab:red')
        ax.barh(i, min(share, 3.0), color=colour, alpha=1.0 if g['applies'] else 0.45)
        want = ('>= ' if g['direction'] == 'min' else '<= ') + f"{g['target']:g} {g['unit']}".strip()
        txt = 'not measured' if v is None else f"{v:.3g} {g['unit']}".strip()
        ax.text(min(share, 3.0) + 0.03, i, f"{txt} (goal {want})" + ('' if g['applies'] else ', not at the goal\'s setting'), va='center', fontsize=8)
    ax.axvline(1.0, color='k', lw=1, ls='--')
    ax.set(yticks=range(len(ks)), yticklabels=[goals[k]['label'] for k in ks], xlim=(0, 4.2),
           xlabel='measured / goal (lower-is-better goals inverted); 1 = goal reached')
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis(); fig.tight_layout()
    tmp = path.with_suffix('.tmp.png'); fig.savefig(tmp, dpi=100); plt.close(fig); os.replace(tmp, path)

def print_table(s: dict):
    print(f"\nGPU check: {(s['gpu'] or {}).get('name') or 'no GPU'} | torch {s['versions'].get('torch')} | CUDA {s['versions'].get('cuda')}"
          f" | {'DRY RUN' if s['dry_run'] else 'device run'} | {s['seconds']} s of {s['budget_s']:.0f}")
    for st in s['stages']:
        print(f"  {st['name']:<15}{st['status']:<9}{st['seconds']:>7.1f} s  {st['reason']}")
    for g in s['goals'].values():
        v = 'n/a' if g['value'] is None else f"{g['value']:.3g}"
        print(f"  goal {g['label']:<34}{v:>9} {g['unit']:<9} target {g['target']:g} -> "
              + ('not measured' if g['met'] is None else ('met' if g['met'] else 'NOT met')) + ('' if g['applies'] else ' (not at its setting)'))


# ---------------------------------------------------------------- command line
def fetch_wheels(dest: str, py: str) -> int:
    "Download the pinned wheels for the device's Python 3.12 on x86-64 into `dest`."
    plats = [a for p in PLATFORMS for a in ('--platform', p)]
    cmd = [py, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--python-version', '3.12', '--implementation', 'cp',
           *plats, '-d', dest, *WHEELS]
    print('$', shlex.join(cmd), flush=True)
    return subprocess.call(cmd)

def _param(s: str):
    k, sep, v = s.partition('=')
    if not sep or not re.fullmatch(r'[A-Z_][A-Z0-9_]*', k):
        raise argparse.ArgumentTypeError(f"{s!r}: expected NAME=VALUE with an upper-case notebook parameter name, e.g. TRACK_ITERS=100")
    try: return k, json.loads(v)
    except json.JSONDecodeError: return k, v

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='gpu_check.py', description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Stages: ' + ', '.join(STAGES))
    p.add_argument('--out', default=None, help="result folder (default $OUT/gpu_check where $OUT is set, else runs/gpu_check)")
    p.add_argument('--work', default=None, help='scratch folder for data, executed notebooks and logs (default: a temp folder)')
    p.add_argument('--budget', type=float, default=None, help='total wall-clock seconds (default 480; 150 in a dry run)')
    p.add_argument('--dry-run', action='store_true', help='CPU, smoke sizes, CUDA parts skipped (for CI)')
    p.add_argument('--stages', default=','.join(STAGES), help='comma-separated stages to run (default: all)')
    p.add_argument('--wheels', default=str(REPO / '.whl'), help='folder of wheels to install what the machine lacks (default .whl)')
    p.add_argument('--python', default=None, help='Python of the child processes (default: this one)')
    p.add_argument('--bench-param', type=_param, action='append', default=[], metavar='NAME=VALUE',
                   help='override a benchmark.ipynb parameter (JSON value), repeatable')
    p.add_argument('--harness-args', default='', help="extra arguments of `tps benchmark`, one string (e.g. \"--methods tps --seeds 0\")")
    p.add_argument('--harness-cmd', default='', help='the harness command (default: this Python -m tps.cli benchmark)')
    p.add_argument('--fetch-wheels', metavar='DIR', default=None, help='only download the wheels the device lacks into DIR, then exit')
    a = p.parse_args(argv)
    if a.budget is not None and not a.budget > 0: p.error(f"--budget {a.budget:g}: expected a positive number of seconds")
    a.budget = a.budget or (150.0 if a.dry_run else 480.0)
    a.stages = [s.strip() for s in a.stages.split(',') if s.strip()]
    bad = [s for s in a.stages if s not in STAGES]
    if bad or not a.stages: p.error(f"--stages {','.join(bad) or '(empty)'}: unknown; expected a comma-separated subset of {','.join(STAGES)}")
    a.out = a.out or (str(Path(os.environ['OUT']) / 'gpu_check') if os.environ.get('OUT') else str(REPO / 'runs' / 'gpu_check'))
    if Path(a.out).exists() and not Path(a.out).is_dir(): p.error(f"--out {a.out}: exists and is not a folder")
    a.work = a.work or str(Path(tempfile.gettempdir()) / 'tps_gpu_check')
    a.bench_param = dict(a.bench_param)
    return a

def main(argv=None) -> int:
    a = parse_args(argv)
    if a.fetch_wheels: return fetch_wheels(a.fetch_wheels, a.python or sys.executable)
    c = Check(a)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    fns = {'env': stage_env, 'setup': stage_setup, 'cuda_tests': stage_cuda_tests, 'cuda_notebooks': stage_cuda_notebooks,
           'warp_benchmark': stage_warp_benchmark, 'benchmark': stage_benchmark, 'harness': stage_harness}
    try:
        for s in STAGES:
            if s not in a.stages: c.record(s, 'skipped', reason='not selected (--stages)'); continue
            budget = c.allowed(s)
            if budget < MIN_STAGE_S and BUDGETS[s][1 if a.dry_run else 0] != 0:
                c.record(s, 'skipped', reason=f'no time left ({max(c.left(), 0):.0f} s of the {a.budget:.0f} s budget remained)', budget=budget)
                continue
            if BUDGETS[s][1 if a.dry_run else 0] == 0 and a.dry_run:
                c.record(s, 'skipped', reason='dry run: needs a CUDA device', budget=0); continue
            try: fns[s](c, budget)
            except Exception as e:  # one broken stage must not lose the others' results
                c.record(s, 'failed', reason=f'{type(e).__name__}: {e}', budget=budget)
    finally:
        s = c.summary
        done = {st['name'] for st in s['stages']}
        for name in STAGES:
            if name not in done: c.record(name, 'interrupted', reason='the check was stopped before this stage finished')
        s['measured'] = measured_numbers(c.out)
        s['goals'] = goal_table(s['measured'], c.cuda and not a.dry_run)
        name = (s['gpu'] or {}).get('name') or 'CPU, no GPU'
        b = s['measured'].get('benchmark', {})
        sizes = (f"{b.get('arch')}, source {'x'.join(map(str, b.get('source_size') or []))}, target "
                 f"{'x'.join(map(str, b.get('target_size') or []))}; " if b else '')
        title = (f"TPS kit GPU check on {name}" + (' (DRY RUN: smoke sizes, not GPU numbers)' if a.dry_run else '')
                 + f"\n{sizes}torch {s['versions'].get('torch')}, CUDA {s['versions'].get('cuda')}")
        try: plot_goals(s['goals'], title, c.out / 'gpu_check.png')
        except Exception as e: s['plot_error'] = f'{type(e).__name__}: {e}'
        _tar(c.out / 'notebooks.tar.gz', c.logs)
        with open(c.out / 'gpu_check.log', 'w') as f:
            for p in sorted(c.logs.glob('*.log'), key=lambda p: p.stat().st_mtime):
                text = p.read_text(errors='replace')
                f.write(f"\n===== {p.name} ({len(text)} chars{', last 200000' if len(text) > 200000 else ''})\n{text[-200000:]}")
        s['finished'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
        s['files'] = sorted([p.name for p in c.out.iterdir() if p.is_file()] + ['summary.json'])
        s['files'] = sorted(set(s['files']))
        c.write_summary()
        signal.signal(signal.SIGTERM, previous)
        print_table(s)
    return 1 if any(st['status'] in ('failed', 'timeout', 'interrupted') for st in c.summary['stages']) else 0


if __name__ == '__main__':
    sys.exit(main())

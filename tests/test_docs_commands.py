"""Every shell command of README.md and data/README.md, run at smoke size, so a documented command cannot be wrong.

The commands are taken from the fenced ```sh / ```bash blocks (continued lines joined, `&&` chains split into steps)
and run with bash in a scratch folder that plays the user's checkout: `nbs/` is the kit's, `data/` holds the
datasets at smoke size. Each step is run as written, except for these rules (and only these):

- environment steps (`python3 -m venv .venv`, `. .venv/bin/activate`, `pip install -e .` / `".[dev]"`) are what
  the interpreter running this test already is: checked (a virtual environment with the kit installed from this
  checkout, and its console scripts), not repeated;
- `bash tests/run.sh` is the suite this test belongs to: checked with `bash -n` and for its pytest call, not run
  from inside itself;
- the environment has `TPS_SMOKE=1` (`tps demo` at smoke size, see `nbs/19_cli.ipynb`) and one thread per process;
- `tps make-synthetic` / `tps-make-synthetic` get the smoke generator's options appended (`SMOKE_SYNTHETIC`);
- `/datasets/...` is the scratch folder's `data/...` (the smoke data; its VIPER frames are 16:9, as the real ones);
- a paper preset (`--preset syn2city`, `-p PRESET viper2city`) needs the real datasets, ImageNet weights and a GPU:
  the command is first checked as written (`tps config` on its preset and overrides, and `check_init`), then run
  with the `smoke` preset plus that preset's name, data folders and class setting (`PAPER_AT_SMOKE_SIZE`), the
  documented overrides last; `data/DeepLab_resnet_pretrained_imagenet.pth` is a smoke-size file of that format;
- `runs/<name>/<timestamp>` is the newest run folder there; `...` in a command stands for the overrides of the
  block's previous `tps train`; `--nproc_per_node 4` becomes 2 (this machine's cores), and torchrun's default
  port is replaced by a free one (`PET_MASTER_PORT`).

The commands run one after the other, in the order of the files (data/README.md first: its flows are what the
README's runs read), except `tps demo`, which only reads `data/synthetic` and writes `runs/demo`: it runs in the
background while the commands after it run.

A block or step that no rule covers fails `test_every_documented_command_is_known`.
"""
import json, os, re, shlex, subprocess, sys, time
from pathlib import Path
import pytest
import yaml

pytestmark = pytest.mark.slow   # runs every README command

REPO = Path(__file__).resolve().parents[1]
DOCS = ('data/README.md', 'README.md')         # data first: its commands write the flows the README's runs read
SHELL = ('sh', 'bash')
OTHER = ('text', 'python', '')                 # not commands ('' only for README tables of other kinds: none today)
PAPER_AT_SMOKE_SIZE = {
    'syn2city': {'name': 'syn2city', 'data.source': 'synthia', 'data.source_root': 'data/synthia/SEQS-04-DAWN',
                 'data.source_flow_root': 'data/synthia_flow', 'data.target_root': 'data/cityscapes',
                 'data.target_flow_root': 'data/cityscapes_flow', 'model.num_classes': 12, 'eval.drop': ['fence']},
    'viper2city': {'name': 'viper2city', 'data.source_root': 'data/viper', 'data.source_flow_root': 'data/viper_flow',
                   'data.target_root': 'data/cityscapes', 'data.target_flow_root': 'data/cityscapes_flow'},
}
PAPER_AT_SMOKE_SIZE.update({f'{k}_faithful': v for k, v in list(PAPER_AT_SMOKE_SIZE.items())})
RUNNERS = ('tps', 'tps-flow', 'tps-make-synthetic', 'papermill', 'torchrun')


# ---------------------------------------------------------------- extraction
_FENCE = re.compile(r'^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$')


def fenced_blocks(path: Path) -> list:
    "`(lang, line number, text)` of every fenced block of a markdown file (dedented by its fence's indent)."
    out, cur = [], None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if cur is None and m: cur = (m['lang'], i, m['indent'], [])
        elif cur is not None and m and line.strip() == '```':
            out.append((cur[0], cur[1], '\n'.join(cur[3]))); cur = None
        elif cur is not None: cur[3].append(line[len(cur[2]):] if line.startswith(cur[2]) else line)
    assert cur is None, f"{path}: the block opened at line {cur[1]} is never closed"
    return out


def commands(text: str) -> list:
    "The commands of a shell block: continued lines joined, blank and comment-only lines dropped."
    out, buf = [], ''
    for line in text.splitlines():
        buf += line.rstrip()
        if buf.endswith('\\'): buf = buf[:-1] + ' '; continue
        if buf.strip() and not buf.lstrip().startswith('#'): out.append(buf.strip())
        buf = ''
    assert not buf, f"a command ends with a line continuation: {buf!r}"
    return out


def steps(command: str) -> list:
    "The `&&`-chained steps of a command, each as its shell words (comments dropped)."
    return [shlex.split(s, comments=True) for s in re.split(r'\s&&\s', command)]


def kind(words: list) -> str:
    "Which rule covers a step: 'venv', 'activate', 'install', 'suite' or 'run'; 'unknown' otherwise."
    w = ' '.join(words)
    if re.fullmatch(r'python3? -m venv \.venv', w): return 'venv'
    if re.fullmatch(r'(\.|source) \.venv/bin/activate', w): return 'activate'
    if re.fullmatch(r'pip install -e (\.|\.\[dev\])', w): return 'install'
    if w == 'bash tests/run.sh': return 'suite'
    if words and words[0] in RUNNERS: return 'run'
    return 'unknown'


def documented() -> list:
    "`(file, line, command)` of every command of the shell blocks, in the order they are run."
    out = []
    for doc in DOCS:
        for lang, line, text in fenced_blocks(REPO/doc):
            if lang in SHELL: out += [(doc, line, c) for c in commands(text)]
    return out


def test_every_documented_command_is_known():
    "Every block is labelled, every shell step is covered by a rule above; an unknown one fails here."
    for doc in DOCS:
        blocks = fenced_blocks(REPO/doc)
        unlabelled = [line for lang, line, _ in blocks if lang == '']
        assert not unlabelled, f"{doc}: unlabelled code blocks at lines {unlabelled}: mark them ```sh (commands) or ```text"
        unknown_lang = [(line, lang) for lang, line, _ in blocks if lang not in SHELL + OTHER]
        assert not unknown_lang, f"{doc}: code blocks this test cannot classify: {unknown_lang}"
    cmds = documented()
    assert len([c for c in cmds if c[0] == 'README.md']) >= 7 and len([c for c in cmds if c[0] == 'data/README.md']) >= 8
    unknown = [(doc, line, c) for doc, line, c in cmds for s in steps(c) if kind(s) == 'unknown']
    assert not unknown, f"documented commands no rule of tests/test_docs_commands.py knows how to run: {unknown}"


# ---------------------------------------------------------------- the scratch checkout
def _write_init(path: Path):
    "A DeepLab ImageNet-init file ('Scale.' keys, backbone only) for the smoke preset's ResNet-18."
    import torch
    from tps.presets import get_preset
    from tps.model import build_model
    sd = build_model(get_preset('smoke').model).state_dict()
    keep = ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4')
    torch.save({f'Scale.{k}': v for k, v in sd.items() if k.split('.')[0] in keep}, path)


def _scratch(root: Path, smoke_data: Path) -> Path:
    "The user's checkout at smoke size: nbs/ (the kit's), data/{viper,cityscapes,synthia/SEQS-04-DAWN} (no flows), the init file."
    import shutil
    from tps.data.synthetic import make_synthia_tree
    work = root/'checkout'; (work/'data').mkdir(parents=True)
    os.symlink(REPO/'nbs', work/'nbs')
    shutil.copytree(smoke_data/'cityscapes', work/'data'/'cityscapes')
    # VIPER frames are 16:9 like the real ones (1920x1080), so the flows data/README's tps-flow writes at VIPER's
    # published flow size (1024x576) have the frames' aspect ratio
    from tps.presets import SMOKE_SYNTHETIC
    from tps.data.synthetic import make_synthetic
    make_synthetic(out=str(root/'viper16x9'), progress=False, **{**SMOKE_SYNTHETIC, 'source_size': (64, 36)})
    shutil.copytree(root/'viper16x9'/'viper', work/'data'/'viper')
    make_synthia_tree(work/'data'/'synthia', size=(64, 38), frames=6)
    shutil.rmtree(work/'data'/'synthia'/'synthia_flow')        # data/README's tps-flow command computes data/synthia_flow
    _write_init(work/'data'/'DeepLab_resnet_pretrained_imagenet.pth')
    return work


def _smoke_make_synthetic() -> list:
    from tps.presets import SMOKE_SYNTHETIC as S
    return ['--size', 'x'.join(map(str, S['size'])), '--source-size', 'x'.join(map(str, S['source_size'])),
            '--snippets', str(S['snippets']), '--val-snippets', '2', '--source-seqs', str(S['source_seqs']),
            '--source-frames', str(S['source_frames']), '--workers', str(S['workers']), '--no-progress']


def _words(ov: dict) -> list:
    return [f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else v}" for k, v in ov.items()]


def _papermill_params(words: list) -> dict:
    "The parameters papermill builds from `-y` then `-p` (its own order)."
    ys, ps = [], []
    for i, w in enumerate(words):
        if w in ('-y', '--parameters_yaml'): ys.append(words[i + 1])
        if w in ('-p', '--parameters'): ps.append((words[i + 1], words[i + 2]))
    out = {}
    for y in ys: out.update(yaml.safe_load(y) or {})
    for k, v in ps: out[k] = v
    return out


def _check_documented_config(preset: str, overrides: dict, data_root, work: Path):
    "The documented values as written: `tps config` accepts them and they name an existing init file (what `tps train` checks first)."
    import contextlib, io
    from tps.cli import main
    from tps.presets import experiment_config
    from tps.train import check_init
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(['config', preset, *_words(overrides)])
        assert rc == 0, f"`tps config {preset} {' '.join(_words(overrides))}`: {err.getvalue()}"
        check_init(experiment_config(preset, data_root, overrides))
    finally: os.chdir(cwd)


def _substitute(words: list, work: Path, prev_train: list) -> list:
    "The rules of the module docstring, applied to one step's words."
    words = [w.replace('/datasets/', f'{work}/data/') for w in words]
    out = []
    for w in words:
        m = re.fullmatch(r'(.*)/<timestamp>', w)
        if m:
            runs = sorted(p for p in (work/m[1]).iterdir() if p.is_dir())
            assert runs, f"no run folder under {work/m[1]} for {w}"
            w = str(runs[-1].relative_to(work))
        if w == '...': out += prev_train; continue
        out.append(w)
    words = out
    if words[0] == 'torchrun' and '--nproc_per_node' in words: words[words.index('--nproc_per_node') + 1] = '2'
    if words[:2] == ['tps', 'make-synthetic'] or words[0] == 'tps-make-synthetic': words = words + _smoke_make_synthetic()
    if '--preset' in words and words[words.index('--preset') + 1] in PAPER_AT_SMOKE_SIZE:
        i = words.index('--preset'); preset = words[i + 1]
        _check_documented_config(preset, dict(w.split('=', 1) for w in words[i + 2:] if '=' in w and not w.startswith('-')), None, work)
        words = words[:i] + ['--preset', 'smoke', *_words(PAPER_AT_SMOKE_SIZE[preset])] + words[i + 2:]
    if words[0] == 'papermill':
        params = _papermill_params(words)
        preset = params.get('PRESET')
        if preset in PAPER_AT_SMOKE_SIZE:
            doc = params.get('OVERRIDES', {})
            doc_ov = dict(w.split('=', 1) for w in doc.split()) if isinstance(doc, str) else dict(doc)
            _check_documented_config(preset, doc_ov, params.get('DATA_ROOT') or None, work)
            smoke = ' '.join(_words(PAPER_AT_SMOKE_SIZE[preset]))
            doc_words = doc if isinstance(doc, str) else ' '.join(_words(doc_ov))
            words = words + ['-p', 'PRESET', 'smoke', '-p', 'OVERRIDES', f'{smoke} {doc_words}'.strip()]
    return words


def _env(work: Path) -> dict:
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    return {**os.environ, 'TPS_SMOKE': '1', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'MPLBACKEND': 'Agg',
            'PATH': f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            'PET_MASTER_PORT': str(port)}                      # torchrun's --master-port, free on this machine


def _check_environment_step(k: str):
    "The environment steps: this interpreter is a virtual environment with the kit installed from this checkout."
    import importlib.metadata as md, tps
    assert sys.prefix != sys.base_prefix, "the tests do not run in a virtual environment"
    assert Path(tps.__file__).resolve().is_relative_to(REPO), f"tps is imported from {tps.__file__}, not this checkout"
    if k == 'install':
        dist = md.distribution('tps')
        scripts = {e.name for e in dist.entry_points if e.group == 'console_scripts'}
        assert {'tps', 'tps-flow', 'tps-make-synthetic'} <= scripts, scripts
        for s in scripts: assert (Path(sys.executable).parent/s).exists(), s


def _check_suite_step():
    r = subprocess.run(['bash', '-n', 'tests/run.sh'], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'python -m pytest tests/' in (REPO/'tests'/'run.sh').read_text()


class _Step:
    "One step running in the background: `tps demo` only reads data/synthetic and writes runs/demo, so the commands after it run meanwhile."
    def __init__(self, words, work, env):
        self.words, self.t0 = words, time.time()
        self.out, self.err = (open(work/f'.demo.{n}', 'w+') for n in ('out', 'err'))
        self.p = subprocess.Popen(['bash', '-c', shlex.join(words)], cwd=work, env=env, stdout=self.out, stderr=self.err, text=True)
    def result(self):
        try: rc = self.p.wait(timeout=600)
        finally:
            if self.p.poll() is None: self.p.kill()
        self.out.seek(0); self.err.seek(0)
        return rc, self.out.read()[-1500:] + '\n' + self.err.read()[-2500:] + f'\n({time.time() - self.t0:.0f} s, in the background)'


def _run_command(doc, line, cmd, work, env, prev_train, background):
    "Run the steps of one documented command: (exit code, the words run, output tail)."
    rc, run, tail = 0, [], ''
    for words in steps(cmd):
        k = kind(words)
        if k in ('venv', 'activate', 'install'): _check_environment_step(k); continue
        if k == 'suite': _check_suite_step(); continue
        assert k == 'run', (doc, line, cmd)
        words = _substitute(words, work, prev_train)
        run.append(words)
        if words[:2] == ['tps', 'demo']:                     # the last step of its command
            background[(doc, line, cmd)] = _Step(words, work, env); return None
        t0 = time.time()
        r = subprocess.run(['bash', '-c', shlex.join(words)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        rc, tail = r.returncode, (r.stdout[-1500:] + '\n' + r.stderr[-2500:] + f'\n({time.time() - t0:.0f} s)')
        if rc: break
    return rc, run, tail


@pytest.fixture(scope='module')
def ran(smoke_data, tmp_path_factory):
    "Run every documented command once, in order: {(file, line, command): (exit code, the words run, output tail)}."
    work = _scratch(tmp_path_factory.mktemp('docs'), smoke_data)
    env, prev_train, results, background = _env(work), [], {}, {}
    figures = _hashes(REPO/'figures')
    try:
        for doc, line, cmd in documented():
            r = _run_command(doc, line, cmd, work, env, prev_train, background)
            if r is not None: results[(doc, line, cmd)] = r
            if steps(cmd)[0][:2] == ['tps', 'train']:
                ws = steps(cmd)[0]
                prev_train = [w for w in ws[ws.index('--preset') + 2:] if '=' in w] if '--preset' in ws else []
    finally:
        for key, step in background.items():
            rc, tail = step.result(); results[key] = (rc, [step.words], tail)
    results['repository figures unchanged'] = figures == _hashes(REPO/'figures')
    return work, results


def _hashes(folder: Path) -> dict:
    import hashlib
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob('*')) if p.is_file()}


def _ok(results, doc, skip=()):
    bad = {c: (rc, tail) for (d, _, c), (rc, _, tail) in (kv for kv in results.items() if isinstance(kv[0], tuple))
           if d == doc and rc != 0 and not any(s in c for s in skip)}
    assert not bad, '\n\n'.join(f"{c}\n-> exit {rc}\n{tail}" for c, (rc, tail) in bad.items())


def test_data_readme_commands_run(ran):
    work, results = ran
    _ok(results, 'data/README.md')
    assert (work/'data'/'synthetic_small'/'synthetic.json').exists()
    for f in ('cityscapes_flow/train', 'cityscapes_flow/val', 'viper_flow', 'synthia_flow'):
        assert list((work/'data'/f).glob('*_int16_x10.npy')), f                 # every flow folder was computed
    runs = sorted((work/'runs').glob('*/*/done.json'))
    names = {p.parent.parent.name for p in runs}
    assert {'viper2city', 'syn2city'} <= names, names
    adapt = work/'runs'/'viper2city'
    res = json.loads((adapt/'results.json').read_text())
    assert (adapt/'adapt.ipynb').exists() and res['table']
    from tps.presets import get_preset
    dones = list(adapt.glob('runs/*/*/done.json'))
    assert dones
    for done in dones:                                                           # no ITERS: the preset's train.iters
        assert json.loads(done.read_text())['iters'] == get_preset('smoke').train.iters, done


def test_readme_commands_run(ran):
    "All README commands, except the qualitative step whose RESULTS path the adapt step does not write (see below)."
    work, results = ran
    _ok(results, 'README.md', skip=('qualitative.ipynb',))
    assert (work/'runs'/'demo'/'results.json').exists() and list((work/'runs'/'demo'/'figures').glob('demo_*.png'))
    assert list((work/'runs'/'syn2city').glob('*/eval/results_best_val.md'))     # tps eval of the trained run
    ddp = [c for c in results if isinstance(c, tuple) and c[2].startswith('torchrun')]
    assert ddp and all(results[c][0] == 0 for c in ddp)


def test_demo_leaves_the_repository_figures_alone(ran):
    "`tps demo` writes its figures under its --out (runs/demo/figures), not into the checkout's figures/."
    work, results = ran
    assert not (work/'figures').exists() and results['repository figures unchanged']
    demo = [c for c in results if isinstance(c, tuple) and c[0] == 'README.md' and c[2].endswith('tps demo')]
    assert demo and results[demo[0]][0] == 0


def test_readme_paper_qualitative_finds_the_adapt_results(ran):
    work, results = ran
    q = [(c, r) for c, r in results.items() if isinstance(c, tuple) and c[0] == 'README.md' and 'qualitative.ipynb' in c[2]]
    assert q and all(r[0] == 0 for _, r in q), q[0][1][2] if q else 'no qualitative command'

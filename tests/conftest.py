"Shared pytest setup: headless plotting, repository paths, and a session-wide smoke-sized synthetic benchmark."
import hashlib, os, subprocess, sys
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def repo() -> Path:
    "The repository root."
    return REPO


@pytest.fixture(scope='session')
def smoke_data(tmp_path_factory) -> Path:
    "The synthetic benchmark at the `smoke` preset's size (64x32), written once per test session."
    from tps.presets import SMOKE_SYNTHETIC
    from tps.data.synthetic import make_synthetic
    root = tmp_path_factory.mktemp('smoke')/'syn'
    make_synthetic(out=root, progress=False, **SMOKE_SYNTHETIC)
    return root


@pytest.fixture
def smoke_config(smoke_data, tmp_path):
    "`smoke_config(method, **train)`: the `smoke` preset on `smoke_data`, runs under `tmp_path`, train keys overridden."
    from tps.presets import experiment_config
    def make(method='tps', **train):
        ov = {'train.method': method, 'train.out_root': str(tmp_path/'runs'), **{f'train.{k}': v for k, v in train.items()}}
        return experiment_config('smoke', smoke_data, ov)
    return make


# ---------------------------------------------------------------- a test run leaves the repository as it found it
def _tree_state():
    "`git status --porcelain` and a hash of `git diff` (None outside a git checkout)."
    try:
        st = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True, timeout=60)
        if st.returncode != 0: return None
        diff = subprocess.run(['git', 'diff', '--binary'], cwd=REPO, capture_output=True, timeout=60).stdout
        return st.stdout, hashlib.sha1(diff).hexdigest()
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_sessionstart(session):
    session.config._tps_tree = _tree_state()


def pytest_sessionfinish(session, exitstatus):
    before, after = getattr(session.config, '_tps_tree', None), _tree_state()
    if before is not None and after is not None and before != after:
        changed = sorted(set(after[0].splitlines()) ^ set(before[0].splitlines())) or ['(contents of modified files)']
        print('\nFAIL: the test run changed the repository:\n  ' + '\n  '.join(changed), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

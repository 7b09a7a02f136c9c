"Shared pytest setup: headless plotting, repository paths, and a session-wide synthetic benchmark."
import os, sys
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='session')
def repo() -> Path:
    "The repository root."
    return REPO

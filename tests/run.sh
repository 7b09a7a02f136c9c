#!/usr/bin/env bash
# The whole test suite, in order: export in sync, notebooks clean, notebook tests, pytest.
# README command (2) and .ci/run call exactly this after installing the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# Every temporary file of the run (notebook tests' scratch folders, pytest's tmp_path) lives in one folder
# that is removed at the end, pass or fail: repeated runs do not fill the disk.
TPS_TEST_TMP="$(mktemp -d "${TMPDIR:-/tmp}/tps-tests-XXXXXX")"
chmod 755 "$TPS_TEST_TMP"     # the docs tests' link checker drops root privileges to nobody, who must reach the site under it
trap 'rm -rf "$TPS_TEST_TMP"' EXIT
export TMPDIR="$TPS_TEST_TMP"

# System packages the browser tests need (Debian's chromium; Playwright's own download does not work offline).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "WARNING: could not install chromium; browser tests will fail"
  fi
fi

echo "== nbdev_export (the package must equal the notebooks)"
nbdev_export
if ! git diff --quiet -- tps/ || [ -n "$(git ls-files --others --exclude-standard -- tps/)" ]; then
  echo "FAIL: nbdev_export changed tps/: the notebooks and the package are out of sync"; git status --short -- tps/; exit 1
fi

echo "== nbdev_clean (notebooks must be committed clean)"
nbdev_clean
if ! git diff --quiet -- nbs/; then
  echo "FAIL: nbdev_clean changed notebooks:"; git diff --stat -- nbs/; exit 1
fi

echo "== no unused imports (ruff F401)"
ruff check --select F401 tps tests

echo "== README in sync with nbs/index.ipynb"
python -m tps.tools.docs readme --check

tree_state() { git status --porcelain; git diff --binary | sha1sum; }
before="$(tree_state)"

echo "== nbdev_test"
# two notebooks at a time on two cores: one thread each avoids oversubscription
OMP_NUM_THREADS=1 nbdev_test --n_workers 2

echo "== pytest"
python -m pytest tests/ -ra

echo "== the tests left the repository as they found it"
if [ "$(tree_state)" != "$before" ]; then
  echo "FAIL: the test run changed tracked or untracked files (figures go to a temporary folder unless TPS_WRITE_FIGURES=1):"
  git status --short; exit 1
fi

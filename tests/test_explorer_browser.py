"""The pseudo-label explorer in a real browser: JupyterLab on a free localhost port with a temporary token, headless
Chromium driven by Playwright runs the notebook, moves the threshold and the sample slider, checks that the rendered
panels change, and saves a screenshot (figures/explorer.png with TPS_WRITE_FIGURES=1, else a temporary file). The server is always shut down.

The committed screenshot shows a trained network on the demo's benchmark: set TPS_EXPLORER_CHECKPOINT to a demo
checkpoint (a run folder or .pth) and TPS_EXPLORER_DATA to the benchmark's root (the folder holding cityscapes/ and
cityscapes_flow/, e.g. data/synthetic); without them the test builds a tiny benchmark and an untrained network."""
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--no-first-run', '--disable-sync', '--disable-dev-shm-usage']
SIZE = (128, 64)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]   # slow: JupyterLab and headless Chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _children() -> dict:
    "pid -> parent pid of every process (from /proc)."
    out = {}
    for p in Path('/proc').iterdir():
        if p.name.isdigit():
            try: out[int(p.name)] = int((p/'stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError): pass
    return out


def _descendants(pid: int) -> list:
    "Every process below `pid` (kernels run in their own session, so killing the group misses them)."
    ppid, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in ppid.items() if pp == p]
        out += kids; todo += kids
    return out


def _api(port, token, path, method='GET', timeout=5.0):
    req = urllib.request.Request(f'http://127.0.0.1:{port}{path}', method=method,
                                 headers={'Authorization': f'token {token}'}, data=b'' if method == 'POST' else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b'null')


def _stop(proc, port, token):
    "Shut the server down: API shutdown, then SIGTERM / SIGKILL of its process group and of every descendant."
    kids = _descendants(proc.pid)
    try: _api(port, token, '/api/shutdown', 'POST')
    except Exception: pass
    try: proc.wait(15)
    except subprocess.TimeoutExpired: pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: pass
            try: proc.wait(5)
            except subprocess.TimeoutExpired: pass
        for k in kids:
            try: os.kill(k, sig)
            except ProcessLookupError: pass
        if sig == signal.SIGTERM: time.sleep(0.5)


TRAINED = os.environ.get('TPS_EXPLORER_CHECKPOINT'), os.environ.get('TPS_EXPLORER_DATA')


def notebook_cells(size, intervals) -> list:
    return ["import torch\ntorch.set_num_threads(2)\nfrom tps.data import CityscapesSeq\nfrom tps.explorer import PseudoLabelExplorer",
            f"ds = CityscapesSeq('data/cityscapes', 'data/cityscapes_flow/train', size={tuple(size)}, interval=1)\n"
            f"ex = PseudoLabelExplorer('r18.pth', ds, intervals={tuple(intervals)}, device='cpu', panel_width=192)\nex"]


def _notebook(cells) -> dict:
    return {'nbformat': 4, 'nbformat_minor': 5,
            'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3 (ipykernel)', 'language': 'python'},
                         'language_info': {'name': 'python'}},
            'cells': [{'cell_type': 'code', 'id': f'c{i}', 'metadata': {}, 'execution_count': None, 'outputs': [],
                       'source': src} for i, src in enumerate(cells)]}


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a free port with a random token, serving a notebook that builds the explorer."
    if not Path(CHROMIUM).exists(): pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium (tests/run.sh does)")
    import torch
    from tps.data.synthetic import make_synthetic
    from tps.model import TPSNet
    root = tmp_path/'root'
    if all(TRAINED):                                    # a trained demo checkpoint on the demo's benchmark
        from tps.runs import load_model, resolve_checkpoint
        root.mkdir(parents=True); (root/'data').symlink_to(Path(TRAINED[1]).resolve(), target_is_directory=True)
        net, _ = load_model(resolve_checkpoint(TRAINED[0]), 'cpu')
        torch.save(net.state_dict(), root/'r18.pth')
        cells = notebook_cells((256, 128), (1,))
    else:
        make_synthetic(root/'data', size=SIZE, source_size=SIZE, snippets=2, val_snippets=0, source_seqs=1,
                       source_frames=10, intervals=(1, 3), full_snippets=0, workers=1, progress=False)
        torch.manual_seed(0)
        torch.save(TPSNet('resnet18', 15).state_dict(), root/'r18.pth')
        cells = notebook_cells(SIZE, (1, 3))
    (root/'explorer.ipynb').write_text(json.dumps(_notebook(cells)))
    settings = tmp_path/'settings'/'@jupyterlab'/'apputils-extension'
    settings.mkdir(parents=True)
    (settings/'notification.jupyterlab-settings').write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'), 'JUPYTER_DATA_DIR': str(tmp_path/'data'),
           'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'IPYTHONDIR': str(tmp_path/'ipython'),
           'MPLBACKEND': 'Agg', 'PYTHONPATH': str(REPO)}
    log = open(tmp_path/'lab.log', 'w')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', f'--ServerApp.port={port}', '--ServerApp.port_retries=0',
         f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--ServerApp.ip=127.0.0.1',
         f'--LabApp.user_settings_dir={tmp_path/"settings"}', f'--LabApp.workspaces_dir={tmp_path/"workspaces"}',
         '--LabApp.expose_app_in_browser=True'] + (['--allow-root'] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None: pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path/'lab.log').read_text()[-3000:]}")
            try:
                _api(port, token, '/api/status', timeout=2)
                break
            except Exception:
                if time.time() - t0 > 90: pytest.fail(f"jupyter lab did not answer in 90 s:\n{(tmp_path/'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield dict(url=f'http://127.0.0.1:{port}', token=token, root=root, log=tmp_path/'lab.log', proc=proc)
    finally:
        _stop(proc, port, token)
        log.close()


def _img_src(page, panel):
    return page.locator(f'.tps-panel-{panel}').first.get_attribute('src')


def _wait_src_change(page, panel, old, timeout=60_000):
    page.wait_for_function(
        "([sel, old]) => { const e = document.querySelector(sel); return e && e.getAttribute('src') && e.getAttribute('src') !== old; }",
        arg=[f'.tps-panel-{panel}', old], timeout=timeout)


def _status(page) -> str:
    return page.locator('.tps-status').first.inner_text()


def _save_png(png: bytes, path: Path):
    "Write a screenshot compactly (palette PNG) and atomically."
    import io
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('RGB').quantize(colors=128)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    im.save(tmp, format='PNG', optimize=True)
    os.replace(tmp, path)


def test_explorer_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1300})
            page.goto(f"{lab['url']}/lab/tree/explorer.ipynb?token={lab['token']}", timeout=60_000)
            page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=60_000)
            page.wait_for_function(  # the kernel is up
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=60_000)
            page.locator('.jp-Notebook').first.click()
            page.locator('.lm-MenuBar-item', has_text='Run').first.click()                 # Run > Run All Cells
            page.locator('.lm-Menu-item', has_text='Run All Cells').first.click()
            page.wait_for_selector('.tps-explorer', timeout=90_000)
            page.wait_for_function("() => { const e = document.querySelector('.tps-status');"
                                   " return e && e.innerText.includes('ready'); }", timeout=90_000)
            assert 'teacher 1, student 1' in _status(page)
            panel = page.locator('.tps-panel-pseudo_label').first
            panel.scroll_into_view_if_needed()
            src0, shot0 = _img_src(page, 'pseudo_label'), panel.screenshot()
            d0 = _img_src(page, 'd')

            # threshold: keyboard on the slider handle, to the maximum (every pixel below it is dropped)
            handle = page.locator('.tps-threshold .noUi-handle').first
            handle.focus()
            handle.press('End')
            for _ in range(3):
                if '1.00' in page.locator('.tps-threshold .widget-readout').first.inner_text(): break
                for _ in range(20): handle.press('ArrowRight')
            _wait_src_change(page, 'pseudo_label', src0)
            page.wait_for_timeout(300)
            shot1 = panel.screenshot()
            assert shot1 != shot0, 'the pseudo-label panel did not change with the threshold'
            assert 'teacher 1, student 1' in _status(page), 'the threshold must not rerun the network'
            assert _img_src(page, 'd') == d0

            # sample: keyboard on the slider handle, one step right
            src1 = _img_src(page, 'd')
            shot_d = page.locator('.tps-panel-d').first.screenshot()
            handle = page.locator('.tps-sample .noUi-handle').first
            handle.focus()
            handle.press('ArrowRight')
            _wait_src_change(page, 'd', src1)
            page.wait_for_function("() => document.querySelector('.tps-status').innerText.includes('teacher 2, student 2')",
                                   timeout=60_000)
            page.wait_for_timeout(300)
            assert page.locator('.tps-panel-d').first.screenshot() != shot_d, 'frame d did not change with the sample'
            name = page.locator('.tps-name select').first.evaluate('e => e.options[e.selectedIndex].text')
            assert name.replace('\xa0', ' ').startswith('1: '), f'the dropdown did not follow the slider: {name!r}'

            src2 = _img_src(page, 'pseudo_label')                                  # threshold back to 0 for the figure
            handle = page.locator('.tps-threshold .noUi-handle').first
            handle.focus()
            handle.press('Home')
            _wait_src_change(page, 'pseudo_label', src2)
            page.wait_for_function("() => document.querySelector('.tps-status').innerText.includes('from cache')",
                                   timeout=30_000)

            from tps.utils import figure_dir
            out = figure_dir()/'explorer.png'
            _save_png(page.locator('.tps-explorer').first.screenshot(), out)
            assert out.stat().st_size > 10_000
        except BaseException:
            try:  # leave evidence next to the server log
                page.screenshot(path=str(lab['log'].with_name('failure.png')))
                print(f"screenshot: {lab['log'].with_name('failure.png')}\nserver log tail:\n{lab['log'].read_text()[-2000:]}")
            except Exception: pass
            raise
        finally:
            browser.close()
    assert lab['proc'].poll() is None, 'the server died during the test'

"The docs site: built by `python -m tps.tools.docs build`, every internal link (and anchor) checked by LinkChecker, pages loaded in headless Chromium."
import functools, http.server, json, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow   # builds the docs site, checks links, loads pages in Chromium

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--no-first-run', '--disable-sync']


@pytest.fixture(scope='module')
def site(repo):
    "The site built into a fresh folder (world-readable: LinkChecker drops root privileges to 'nobody')."
    out = Path(tempfile.mkdtemp(prefix='tps-docs-test-'))
    os.chmod(out, 0o755)
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'tps.tools.docs', 'build', '--out', str(out / 'site')], cwd=repo,
                       capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f'docs build: {elapsed:.1f} s')
    assert elapsed < 300
    yield out / 'site'
    shutil.rmtree(out, ignore_errors=True)


def test_pages_exist(site, repo):
    assert (site / 'index.html').is_file() and (site / 'data.html').is_file()
    import tps.config
    from tps.tools.pages import module_notebook
    cfg_page = module_notebook(tps.config)[:-len('.ipynb')] + '.html'      # nbs/NN_config.html
    assert (site / cfg_page).is_file() and (site / 'nbs' / '02_warp.html').is_file()
    api = (site / 'api' / 'tps.config.html').read_text()
    assert 'id="validate"' in api and cfg_page in api                      # every export, linked to its notebook
    assert 'id="get_preset"' in (site / 'api' / 'tps.presets.html').read_text()
    assert 'id="flow_warp"' in (site / 'api' / 'tps.warp.html').read_text()
    index = (site / 'index.html').read_text()
    assert 'notebook-first' in index and '#| hide' not in index
    cfg = (site / cfg_page).read_text()
    assert '#| export' not in cfg and '#|' not in cfg and 'default_exp' not in cfg   # directives stripped


def _linkchecker(url, anchors=False):
    "LinkChecker on `url`; with `anchors`, its AnchorCheck plugin is on and warnings (a missing anchor is one) fail."
    exe = shutil.which('linkchecker') or str(Path(sys.executable).parent / 'linkchecker')
    args = ['--no-status', '--threads', '4']
    if anchors:
        cfg = Path(tempfile.mkdtemp(prefix='tps-linkchecker-')) / 'linkcheckerrc'
        cfg.write_text('[AnchorCheck]\n')
        args += ['-f', str(cfg)]
    else: args.append('--no-warnings')
    return subprocess.run([exe, *args, url], capture_output=True, text=True, timeout=240)


def test_internal_links_resolve(site):
    r = _linkchecker((site / 'index.html').as_uri())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert '0 errors found' in r.stdout
    n = int(r.stdout.split(' links in ')[0].rsplit('\n', 1)[-1].split()[-1]) if ' links in ' in r.stdout else 0
    assert n > 30, r.stdout[-1000:]                                         # it really crawled the site


def test_linkchecker_catches_a_broken_link():
    d = Path(tempfile.mkdtemp(prefix='tps-docs-broken-'))
    try:
        os.chmod(d, 0o755)
        (d / 'a.html').write_text('<html><body><a href="missing.html">x</a><img src="nope.png"></body></html>')
        (d / 'b.html').write_text('<html><body><a href="c.html#there">ok</a><a href="c.html#nowhere">bad</a></body></html>')
        (d / 'c.html').write_text('<html><body><h2 id="there">T</h2></body></html>')
        for f in d.iterdir(): os.chmod(f, 0o644)
        r = _linkchecker((d / 'a.html').as_uri())
        assert r.returncode != 0 and 'missing.html' in r.stdout
        r = _linkchecker((d / 'b.html').as_uri(), anchors=True)               # the anchor check is real
        assert r.returncode != 0 and 'nowhere' in r.stdout and "Anchor `there'" not in r.stdout, r.stdout[-2000:]
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _notebook(path: Path, *markdown_cells):
    "A minimal notebook of markdown cells (nbformat 4 JSON)."
    cells = [{'cell_type': 'markdown', 'metadata': {}, 'source': m} for m in markdown_cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))


def test_notebook_anchor_links(repo):
    "`X.ipynb#anchor` links between notebooks point at the ids MkDocs gives the headings; LinkChecker checks the anchors."
    d = Path(tempfile.mkdtemp(prefix='tps-docs-anchors-'))
    try:
        os.chmod(d, 0o755)
        proj, pkg = d / 'proj', 'tps_docs_anchor_fixture'
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / '__init__.py').write_text('"An empty package."\n')
        (proj / 'settings.ini').write_text(f'[DEFAULT]\nlib_name = {pkg}\nreadme_nb = index.ipynb\ndoc_path = _docs\n')
        _notebook(proj / 'nbs' / 'index.ipynb', '# Anchor fixture\n> Links into another notebook.',
                  'See [the warp](method.ipynb#flow-warping), [the kernel](method.ipynb#The-CUDA-kernel) (Jupyter form), '
                  '[the command](method.ipynb#precomputing-flows-tps-flow), [the second](method.ipynb#flow-warping_1) '
                  'and [a stale one](method.ipynb#no-such-heading).')
        _notebook(proj / 'nbs' / 'method.ipynb', '# Method\n> The headings linked to.', '## Flow warping\nText.',
                  '## The CUDA kernel\nBack to [the warp](#flow-warping).', '## Precomputing flows: `tps-flow`\nText.',
                  '## Flow warping\nThe same title again.')
        r = subprocess.run([sys.executable, '-m', 'tps.tools.docs', 'build', '--out', str(d / 'site')], cwd=proj,
                           capture_output=True, text=True, timeout=300, env={**os.environ, 'PYTHONPATH': str(proj)})
        assert r.returncode == 0, r.stdout + r.stderr
        assert 'broken anchor dropped: #no-such-heading' in r.stderr, r.stderr
        index, method = (d / 'site' / 'index.html').read_text(), (d / 'site' / 'nbs' / 'method.html').read_text()
        for a in ('flow-warping', 'the-cuda-kernel', 'precomputing-flows-tps-flow', 'flow-warping_1'):
            assert f'href="nbs/method.html#{a}"' in index and f'id="{a}"' in method, a
        assert 'href="nbs/method.html">a stale one' in index                 # the page, without the dead anchor
        assert 'href="#flow-warping"' in method
        r = _linkchecker((d / 'site' / 'index.html').as_uri(), anchors=True)
        assert r.returncode == 0 and '0 errors found' in r.stdout and 'Anchor' not in r.stdout, r.stdout[-3000:]
    finally:
        shutil.rmtree(d, ignore_errors=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture()
def server(site):
    "The site served over http on 127.0.0.1 (search needs http), shut down afterwards."
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(site)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}'
    finally:
        httpd.shutdown(); httpd.server_close(); th.join(10)


@pytest.fixture()
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium not found at {CHROMIUM}: apt-get install chromium (tests/run.sh does)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


def _small_png(png: bytes, path: Path):
    "Save a screenshot as a palette PNG, atomically."
    import io
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('RGB').quantize(colors=128)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    im.save(tmp, format='PNG', optimize=True)
    os.replace(tmp, path)


def test_browser_index_api_and_search(server, browser, repo, tmp_path):
    from tps.tools.pages import notebook_title
    title = notebook_title(repo / 'nbs' / 'index.ipynb')
    page = browser.new_page(viewport={'width': 1280, 'height': 800})
    errors, external = [], []
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.on('request', lambda r: None if r.url.startswith((server, 'data:', 'blob:', 'about:')) else external.append(r.url))
    page.goto(server + '/index.html', wait_until='load')
    assert page.title() == title                                               # site name = index title
    imgs = page.eval_on_selector_all('article img', 'els => els.map(e => [e.getAttribute("src"), e.complete ? e.naturalWidth : -1])')
    assert imgs, 'no figure on the index page'
    assert all(w > 0 for _, w in imgs), imgs                                   # every figure loaded
    shot = (repo / 'figures' if os.environ.get('TPS_WRITE_FIGURES') == '1' else tmp_path) / 'docs_index.png'
    _small_png(page.screenshot(), shot)                                      # the repository's figure only on request
    assert shot.stat().st_size > 1000

    page.goto(server + '/api/tps.warp.html', wait_until='load')
    assert page.title().startswith('tps.warp') and page.title().endswith(title)
    assert page.locator('#flow_warp').count() == 1

    page.locator('input.md-search__input').click()
    page.keyboard.type('flow_warp')
    page.locator('.md-search-result__item').first.wait_for(state='visible', timeout=30_000)
    results = page.locator('.md-search-result').inner_text()
    assert 'flow_warp' in results and 'tps.warp' in results, results[:500]
    assert not errors, errors
    assert not external, external                                              # nothing fetched from the web
    page.close()

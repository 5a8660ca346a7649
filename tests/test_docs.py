"""The documentation site (`make docs`, tools/build_docs.py): bad input fails the build naming the file and leaves the
previous site alone; README.md is what nbs/index.ipynb gives; and the built `_docs/`, served on localhost and loaded
in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download), works: every page loads with no
console errors and no failed requests, the sidebar links resolve, a plot is displayed, search finds `weight_matching`
and leads to its page, maths is typeset. Screenshots go to `_docs_artifacts/`.

The browser tests need a built site (`make docs`; `make test` and `make test-docs` build it first), Playwright and
Chromium (`.ci/run` installs it with apt-get). Without them they skip, saying what is missing; under CI (`$CI` set)
they fail instead, so that a green CI cannot hide a browser test that did not run."""
import functools, http.server, json, os, re, shutil, sys, threading
from pathlib import Path
from urllib.parse import urlsplit
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT/'tools'))
import build_docs as bd

SITE, ARTIFACTS = ROOT/'_docs', ROOT/'_docs_artifacts'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
# Debian's chromium on a machine with no outside network: no first-run, sync, component updates, QUIC or GPU
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']


# ------------------------------------------------------------------ bad input: the build fails, naming the file

def _nb(*cells) -> str:
    "A notebook of (cell_type, source) pairs."
    def cell(i, t, s):
        return {'cell_type': t, 'metadata': {}, 'source': s, 'id': f'c{i}',
                **({'outputs': [], 'execution_count': None} if t == 'code' else {})}
    kernel = {'name': 'python3', 'language': 'python', 'display_name': 'Python 3'}
    return json.dumps({'nbformat': 4, 'nbformat_minor': 5, 'metadata': {'kernelspec': kernel},
                       'cells': [cell(i, t, s) for i, (t, s) in enumerate(cells)]})


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A tiny nbdev project (settings.ini, _quarto.yml, two notebooks) with a previous site in _docs/, to build."
    (tmp_path/'settings.ini').write_text((ROOT/'settings.ini').read_text())
    (tmp_path/'_quarto.yml').write_text('project:\n  type: website\nwebsite:\n  title: t\n  sidebar:\n    contents:\n'
                                        '      - index.ipynb\n      - "[0-9]*.ipynb"\n')
    nbs = tmp_path/'nbs'
    nbs.mkdir()
    (nbs/'index.ipynb').write_text(_nb(('markdown', '# t\n\n> a test site'),
                                       ('markdown', 'See [core](00_core.ipynb) and $x^2$.')))
    (nbs/'00_core.ipynb').write_text(_nb(('markdown', '# core\n\n> one page'), ('code', 'print(1 + 1)')))
    (tmp_path/'modelfusion').mkdir()
    (tmp_path/'_docs').mkdir()
    (tmp_path/'_docs'/'index.html').write_text('the previous site')
    monkeypatch.setattr(bd, 'ROOT', tmp_path)
    monkeypatch.setattr(bd, 'NBS', nbs)
    monkeypatch.setattr(bd, 'RESULTS', tmp_path/'results')
    monkeypatch.setattr(bd, 'CACHE', tmp_path/'.cache'/'docs')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(project, *words):
    "The build fails with a message holding every word; the previous site is untouched and no build folder is left."
    with pytest.raises(bd.DocsError) as e: bd.build(jobs=1, budget=0, out=project/'_docs')
    for w in words: assert w in str(e.value), (w, str(e.value))
    assert (project/'_docs'/'index.html').read_text() == 'the previous site'
    assert not list(project.glob('_docs.building-*'))
    return str(e.value)


def test_good_project_builds(project):
    "The tiny project builds: the notebook ran (its output is on the page), and its page has nbdev's name."
    bd.build(jobs=1, budget=0, out=project/'_docs')
    page = (project/'_docs'/'core.html').read_text()
    assert '<pre><code>2</code></pre>' in page and 'href="core.html"' in (project/'_docs'/'index.html').read_text()
    assert (project/'_docs'/'site_libs'/'mathjax'/bd.MATHJAX_JS).exists() and not list(project.glob('_docs.building-*'))
    assert f'site_libs/mathjax/{bd.MATHJAX_JS}' in (project/'_docs'/'index.html').read_text()  # for its $x^2$


def test_time_budget_keeps_the_api(project):
    "A notebook still to run when the budget is spent gets its API entries (exported cells and show_doc), not its "
    "examples, and a note saying so; the build still succeeds."
    (project/'nbs'/'01_slow.ipynb').write_text(_nb(
        ('markdown', '# slow'), ('code', '#| export\ndef double(x):\n    "Twice `x`."\n    return 2 * x'),
        ('code', 'import time\ntime.sleep(5)'), ('code', 'print("an example output")')))
    bd.build(jobs=1, budget=0.01, out=project/'_docs')
    page = (project/'_docs'/'slow.html').read_text()
    assert 'id="double"' in page and 'Twice' in page and bd.CUT_NOTE.split(':')[0] in page
    assert 'print(&quot;an example output&quot;)' in page or 'an example output' in page  # the code is shown
    assert '<pre><code>an example output</code></pre>' not in page  # but not run


def test_broken_notebook_fails(project):
    (project/'nbs'/'01_broken.ipynb').write_text('{"cells": [')
    _fails(project, 'nbs/01_broken.ipynb', 'not a readable notebook')


def test_cell_error_fails(project):
    (project/'nbs'/'01_err.ipynb').write_text(_nb(('markdown', '# err'), ('code', 'x = 1'),
                                                  ('code', 'raise ValueError("boom")')))
    _fails(project, 'nbs/01_err.ipynb', 'cell 2', 'ValueError', 'boom')


def test_missing_sidebar_page_fails(project):
    q = project/'_quarto.yml'
    q.write_text(q.read_text() + '      - 02_gone.ipynb\n')
    _fails(project, '_quarto.yml', 'nbs/02_gone.ipynb', 'does not exist')


def test_notebook_outside_the_sidebar_fails(project):
    (project/'nbs'/'extra.ipynb').write_text(_nb(('markdown', '# extra')))
    _fails(project, 'nbs/extra.ipynb', 'not in the sidebar')


def test_dead_link_fails(project):
    (project/'nbs'/'01_links.ipynb').write_text(_nb(('markdown', '# links'),
                                                    ('markdown', 'See [the spec](04_nothere.ipynb).')))
    _fails(project, '01_links', '04_nothere')


def test_text_in_the_title_cell_fails(project):
    "nbdev turns the first markdown cell into the title and description and drops anything else in it."
    (project/'nbs'/'01_title.ipynb').write_text(_nb(('markdown', '# title\n\n> what it is\n\nThis would vanish.')))
    _fails(project, 'nbs/01_title.ipynb', 'title cell')


def test_include_is_expanded_and_a_missing_one_fails(project):
    "Quarto's {{< include >}} (the README's headline table) is expanded on the page; a missing file fails the build."
    (project/'results').mkdir()
    (project/'results'/'t.md').write_text('| a | b |\n| --- | --- |\n| included-cell | 2 |\n')
    (project/'nbs'/'01_inc.ipynb').write_text(_nb(('markdown', '# inc'), ('markdown', '{{< include ../results/t.md >}}')))
    bd.build(jobs=1, budget=0, out=project/'_docs')
    assert '<td>included-cell</td>' in (project/'_docs'/'inc.html').read_text()
    (project/'nbs'/'01_inc.ipynb').write_text(_nb(('markdown', '# inc'), ('markdown', '{{< include ../results/no.md >}}')))
    (project/'_docs'/'index.html').write_text('the previous site')
    _fails(project, 'nbs', 'include ../results/no.md', 'results/no.md')


# ------------------------------------------------------------------ README.md and nbs/index.ipynb: one source

def test_readme_is_generated_from_index():
    "nbs/index.ipynb is the source of README.md (settings.ini: readme_nb); `make readme` writes it."
    assert (ROOT/'README.md').read_text() == bd.readme_text(), \
        'README.md differs from what nbs/index.ipynb gives: edit nbs/index.ipynb, then run `make readme`'


# ------------------------------------------------------------------ the built site in a browser

def _need(what: str):
    "Skip, saying what is missing; under CI fail instead."
    (pytest.fail if os.environ.get('CI') else pytest.skip)(f'browser test cannot run: {what}')


@pytest.fixture(scope='module')
def served():
    "The built _docs/ on a localhost port; yields (base URL, list of (status, path) of every request served)."
    if not (SITE/'.docs-complete').exists(): _need('no built site in _docs/ (run `make docs`)')
    log = []
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
        def log_request(self, code='-', size='-'): log.append((int(code) if str(code).isdigit() else 0, self.path))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(SITE)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/', log
    srv.shutdown()


@pytest.fixture(scope='module')
def browser():
    try: from playwright.sync_api import sync_playwright
    except ImportError: _need('the Python package playwright is not installed (make env installs it)')
    if not CHROMIUM: _need('no chromium executable (apt-get install chromium; .ci/run does this)')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    "A page in a fresh browser context that records console errors, page errors and failed or refused requests."
    def __init__(self, browser, base):
        self.ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        self.page, self.base, self.problems = self.ctx.new_page(), base, []
        self.page.on('console', lambda m: m.type == 'error' and self.problems.append(f'console: {m.text}'))
        self.page.on('pageerror', lambda e: self.problems.append(f'page error: {e}'))
        self.page.on('requestfailed', lambda r: self.problems.append(f'failed: {r.url} {r.failure}'))
        self.page.on('response', lambda r: r.status >= 400 and self.problems.append(f'HTTP {r.status}: {r.url}'))
        # anything not from the local server is a request the site should not make
        self.page.route(lambda u: not u.startswith(base), self._refuse)

    def _refuse(self, route):
        self.problems.append(f'outside: {route.request.url}')
        route.abort()

    def open(self, path):
        self.problems.clear()
        self.page.goto(self.base + path, wait_until='load')
        self.page.wait_for_load_state('networkidle')
        self.page.evaluate('() => window.MathJax && MathJax.startup && MathJax.startup.promise ? '
                           'MathJax.startup.promise.then(() => 1) : 0')  # maths typeset
        return self.page


def pages() -> list[str]:
    return sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob('*.html') if 'site_libs' not in p.parts)


def expected_pages() -> dict[str, str]:
    "The page each notebook under nbs/ must have: {notebook: page}."
    rels = [nb.relative_to(bd.NBS) for nb in bd.notebooks()]
    return {str(r): bd.out_name(r).with_suffix('.html').as_posix() for r in rels}


def test_every_notebook_has_a_page():
    if not (SITE/'.docs-complete').exists(): _need('no built site in _docs/ (run `make docs`)')
    missing = {nb: p for nb, p in expected_pages().items() if not (SITE/p).exists()}
    assert not missing, f'notebooks without a page (run `make docs` again?): {missing}'


def test_every_exported_name_has_an_api_entry():
    "Each public function and class in modelfusion/_modidx.py (nbdev's index of exports) has its anchor on its page."
    if not (SITE/'.docs-complete').exists(): _need('no built site in _docs/ (run `make docs`)')
    ns = {}
    exec((ROOT/'modelfusion'/'_modidx.py').read_text(), ns)
    ids, missing, n = {}, [], 0
    for mod, syms in ns['d']['syms'].items():
        for full, (url, _) in syms.items():
            short = full[len(mod) + 1:]
            if '.' in short or short.startswith('_'): continue  # methods and private helpers have no entry of their own
            page, _, anchor = url.partition('#')
            if page not in ids:
                ids[page] = set(re.findall(r'\sid="([^"]+)"', (SITE/page).read_text())) if (SITE/page).exists() else None
            n += 1
            if ids[page] is None or anchor not in ids[page]: missing.append(full)
    assert n > 50 and not missing, f'{len(missing)} of {n} exported names have no API entry in _docs/: {missing[:20]}'


def test_every_page_loads_cleanly(served, browser):
    "Each page loads with no console error, no page error, no failed request and no request leaving localhost."
    base, log = served
    tab, bad = Tab(browser, base), {}
    for p in pages():
        tab.open(p)
        if tab.problems: bad[p] = list(tab.problems)
    assert not bad, json.dumps(bad, indent=1)
    assert not [l for l in log if l[0] >= 400], [l for l in log if l[0] >= 400]
    tab.ctx.close()


def test_sidebar_links_resolve(served, browser):
    "Every sidebar link of the index resolves to a page of the site, and every notebook's page is in the sidebar."
    base, _ = served
    tab = Tab(browser, base)
    page = tab.open('index.html')
    hrefs = page.eval_on_selector_all('#quarto-sidebar a[href]', 'els => els.map(e => e.href)')
    assert hrefs, 'no sidebar links on index.html'
    linked = set()
    for h in hrefs:
        assert h.startswith(base), h
        path = urlsplit(h).path.lstrip('/')
        assert (SITE/path).is_file(), f'sidebar link {h} has no page'
        resp = tab.page.request.get(h)
        assert resp.status == 200, (h, resp.status)
        linked.add(path)
    missing = sorted(set(expected_pages().values()) - linked)
    assert not missing, f'pages not in the sidebar: {missing}'
    tab.ctx.close()


def test_a_plot_is_displayed(served, browser):
    "Plots are displayed with a non-zero size: a library notebook's own plot, and an experiment's recorded figure."
    base, _ = served
    tab, shown = Tab(browser, base), {}
    for p in pages():
        if '<img' not in (SITE/p).read_text(): continue
        page = tab.open(p)
        sizes = page.eval_on_selector_all('main img, #quarto-document-content img',
                                          'els => els.map(e => [e.naturalWidth, e.getBoundingClientRect().width, '
                                          'e.getBoundingClientRect().height])')
        if any(nw > 0 and w > 0 and h > 0 for nw, w, h in sizes): shown[p] = sizes
    assert shown, 'no page displays an image with a non-zero size'
    assert any(p.startswith('experiments/') for p in shown), f'no experiment page shows its figures: {sorted(shown)}'
    cut = [p for p in pages() if 'did not fit in the docs' in (SITE/p).read_text()]
    assert cut or any(not p.startswith('experiments/') for p in shown), \
        f'every notebook ran, yet no library page shows a plot (07_evaluation draws curves): {sorted(shown)}'
    ARTIFACTS.mkdir(exist_ok=True)
    lib = next((p for p in shown if not p.startswith('experiments/')), next(iter(shown)))
    page = tab.open(lib)
    page.locator('main img, #quarto-document-content img').first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS/'plot.png'))
    tab.ctx.close()


def test_search_finds_weight_matching(served, browser):
    "Typing `weight_matching` into the search box lists its page; following the result opens its API entry."
    base, _ = served
    tab = Tab(browser, base)
    page = tab.open('index.html')
    box = page.locator('#quarto-search input, .smalldocs-search input').first
    box.fill('weight_matching')
    results = page.locator('.search-result')
    results.first.wait_for(timeout=10_000)
    hrefs = results.evaluate_all('els => els.map(e => e.href)')
    hit = next((i for i, h in enumerate(hrefs) if urlsplit(h).path.endswith('methods/weight_matching.html')), None)
    assert hit is not None, f'search results for weight_matching: {hrefs}'
    results.nth(hit).click()
    page.wait_for_load_state('load')
    assert urlsplit(page.url).path.endswith('methods/weight_matching.html'), page.url
    assert page.locator('[id="weight_matching"]').count() >= 1, 'no API entry weight_matching on its page'
    assert not tab.problems, tab.problems
    tab.ctx.close()


# text nodes outside code that still hold TeX delimiters \\( or \\[ : maths that MathJax did not typeset
RAW_TEX = '''() => { const w = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  let n, out = []; while ((n = w.nextNode())) { if (n.parentElement.closest('pre, code, script')) continue;
    if (/\\\\\\(|\\\\\\[/.test(n.textContent)) out.push(n.textContent.slice(0, 80)); } return out; }'''


def test_math_is_typeset(served, browser):
    "Every page with TeX in it has it typeset by MathJax (served from the site), with no TeX left as raw text."
    base, _ = served
    tab, with_math = Tab(browser, base), []
    for p in pages():
        s = (SITE/p).read_text()
        if not re.search(r'\\\(|\\\[', re.sub(r'<(pre|code|script)\b.*?</\1>', '', s, flags=re.S)): continue
        page = tab.open(p)
        n = page.locator('mjx-container svg').count()
        raw = page.evaluate(RAW_TEX)
        errors = page.locator('mjx-container [data-mjx-error], mjx-merror').count()
        assert n > 0 and not raw and not errors, (p, n, raw, errors)
        with_math.append(p)
    assert with_math, 'no page has maths; the notebooks do (e.g. the methods\' objectives)'
    tab.ctx.close()


def test_screenshots(served, browser):
    "The index and a method page, with its navigation and an API entry, saved to _docs_artifacts/ to be looked at."
    base, _ = served
    ARTIFACTS.mkdir(exist_ok=True)
    tab = Tab(browser, base)
    tab.open('index.html').screenshot(path=str(ARTIFACTS/'index.png'))
    page = tab.open('methods/weight_matching.html')
    page.screenshot(path=str(ARTIFACTS/'method.png'))
    page.locator('[id="weight_matching"]').first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS/'method_api.png'))
    for f in ('index.png', 'method.png', 'method_api.png'): assert (ARTIFACTS/f).stat().st_size > 10_000, f
    tab.ctx.close()

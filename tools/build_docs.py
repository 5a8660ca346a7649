"""The documentation site, built without Quarto: `make docs` runs `python tools/build_docs.py build`.

    python tools/build_docs.py build [--jobs N] [--budget S] [--no-cache]   # nbs/ + _quarto.yml -> _docs/
    python tools/build_docs.py readme [--check]                             # README.md from nbs/index.ipynb

How the site is made (a user with Quarto gets the same pages from `nbdev_docs`):

1. **Check the inputs** before anything is written: every notebook under `nbs/` (paths starting with `_` or `.` are
   skipped, as nbdev does) is a readable notebook whose title cell nbdev will not truncate; every page that
   `_quarto.yml` names in its sidebar or navbar exists, and a glob there matches a notebook; every notebook is in the
   sidebar. Each failure names the file.
2. **Process the notebooks with nbdev's own processors** (`nbdev.processors.FilterDefaults`: front matter from the
   title cell, `show_doc` API entries after every exported function and class, `#| hide`/`#| export` honoured, links
   to symbols), with one change: where nbdev runs only the cells `show_doc` needs, this runs *every* cell that
   `nbdev_test` runs (not in a folder holding `.notest`, not flagged with settings.ini's `tst_flags`, not
   `#| eval: false`), so the examples have their outputs and the plots are drawn. Quarto's `{{< include PATH >}}`
   in markdown cells is expanded here and in the README (a missing file fails the build). Notebooks run in a copy of `nbs/`,
   in parallel (one torch thread per worker), with `$HOME`, `$MODELFUSION_CACHE` and `$TMPDIR` in the build folder and
   matplotlib's and IPython's folders in `.cache/docs/`: nothing outside the project is written.
   **Time budget** (`DOCS_BUDGET`, default 50 s; 0: none): the quickest notebooks run first (the last build's times);
   once it is spent (checked between cells), the notebooks not finished get their API entries only, in the same warm
   worker (exports, imports and show_doc cells run, as nbdev does), with a note on the page. A notebook cut after
   running half the budget is not tried again under the same budget until it changes. A processed notebook is cached
   in `.cache/docs/` under a hash of the notebook, the package's source, settings.ini, nbdev's version and
   `PROC_VERSION`: an unchanged one is not run again, so a second `make docs` completes what the first could not.
3. **Experiment notebooks** (the `.notest` folders: papermill templates that train for minutes to hours) are shown
   as code, not run; their recorded results under `results/` (tables from `metrics.json`, the figures, the command
   and machine from `results/README.md`) are added at the end of their page.
4. **Render** with smalldocs (a pure-Python renderer of `_quarto.yml` projects) from `_quarto.yml` with its
   `metadata-files` merged and its globs expanded. Pages get nbdev's names (`00_core.ipynb` -> `core.html`, as
   `_modidx.py`'s doc links expect); links to the published site (`doc_host`) become relative links.
5. **Make it work offline**: the CDN KaTeX that smalldocs emits is replaced by MathJax 3 served from the site (one
   file from the `django-static-mathjax` package), the Bootswatch theme's Google-fonts import is dropped, and the build
   fails if a page or stylesheet still loads anything from outside the site, or links to a page, file or anchor of
   the site that does not exist.
6. **Publish atomically**: everything is built in `_docs.building-*/` and moved into `_docs/` only when all of the
   above passed; on failure the previous `_docs/` is left as it was and the half-built folder is deleted.
"""
from __future__ import annotations

import argparse, csv, hashlib, html, json, multiprocessing as mp, os, posixpath, re, shutil
import sys, tempfile, time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS, RESULTS, CACHE = ROOT/'nbs', ROOT/'results', ROOT/'.cache'/'docs'
CELL_TIMEOUT = int(os.environ.get('DOCS_CELL_TIMEOUT', '600'))  # seconds one cell may run before the build fails
PROC_VERSION = 'proc-2'  # change it when `_process1` changes what it writes: cached notebooks are then made again
CUT_NOTE = ('The examples on this page are shown without their outputs: running this notebook did not fit in the docs '
            "build's time budget (`DOCS_BUDGET`). `make docs DOCS_BUDGET=0` runs every notebook.")


class DocsError(Exception):
    "A problem in the inputs or the output of the docs build; the message names the file."


def set_root(root: Path | str):
    "Build another project than the one this file is in (the tests build small ones)."
    global ROOT, NBS, RESULTS, CACHE
    ROOT = Path(root)
    NBS, RESULTS, CACHE = ROOT/'nbs', ROOT/'results', ROOT/'.cache'/'docs'


# ------------------------------------------------------------------ inputs

def notebooks() -> list[Path]:
    "Every notebook under nbs/, as nbdev globs them: no path part starting with `_` or `.`."
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(s[0] in '_.' for s in p.relative_to(NBS).parts))


def runs(nb: Path) -> bool:
    "Whether `nbdev_test` runs this notebook (no `.notest` beside it or above it, up to nbs/)."
    return not any((d/'.notest').exists() for d in [nb.parent, *nb.parent.parents] if d == NBS or NBS in d.parents)


def read_notebook(nb: Path) -> dict:
    "The notebook as JSON; a file that is not a notebook, or whose title cell nbdev would cut, fails the build."
    import nbformat
    rel = nb.relative_to(ROOT)
    try: d = json.loads(nb.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e: raise DocsError(f'{rel}: not a readable notebook: {e}') from None
    try: nbformat.validate(nbformat.from_dict(d))
    except Exception as e: raise DocsError(f'{rel}: not a valid notebook: {str(e).splitlines()[0]}') from None
    title = next((c for c in d['cells'] if c['cell_type'] == 'markdown'), None)
    src = _source(title) if title else ''
    if re.search(r'^#\s', src, re.M):  # nbdev makes this cell the page's title and description, and drops the rest
        extra = [l for l in src.splitlines() if l.strip() and not re.match(r'^(#\s|>\s|-\s+\S.*:)', l)]
        if extra: raise DocsError(f'{rel}: the title cell (# title, > description) also holds text that nbdev drops '
                                  f'from the page: {extra[0][:60]!r}...; move it into a cell of its own')
    return d


def _source(cell: dict) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


INCLUDE = re.compile(r'\{\{<\s*include\s+(\S+?)\s*>\}\}')


def includes(text: str, here: Path) -> list[Path]:
    "The files that Quarto's `{{< include PATH >}}` shortcodes in `text` name (PATH relative to the folder `here`)."
    return [(here/m.group(1).strip('"\'')).resolve() for m in INCLUDE.finditer(text)]


def expand_includes(text: str, here: Path) -> str:
    "Quarto's `{{< include PATH >}}` replaced by the file's text, as Quarto does (so README.md and every renderer get "
    "the same page); a missing file fails the build, naming it."
    def sub(m):
        p = (here/m.group(1).strip('"\'')).resolve()
        if not p.is_file():
            raise DocsError(f'{here.relative_to(ROOT)}: {{{{< include {m.group(1)} >}}}}: no file {p.relative_to(ROOT)}')
        return p.read_text(encoding='utf-8').strip()
    return INCLUDE.sub(sub, text)


def out_name(rel: PurePosixPath) -> PurePosixPath:
    "The page a notebook becomes, as nbdev names it: `00_core.ipynb` -> `core.ipynb` (-> `core.html`)."
    return rel.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.name.lower()))


def is_glob(s: str) -> bool: return any(c in s for c in '*?[')


def page_refs(ref: str, rels: list, where: str, seen: set, single=False) -> list[PurePosixPath]:
    "The notebooks one sidebar or navbar entry names: a path, or a glob as Quarto reads it; none fails the build."
    from smalldocs.config import glob_match
    ref = ref.lstrip('/')
    if is_glob(ref):
        if single: raise DocsError(f'_quarto.yml: {where}: {ref} is a glob where one page is expected')
        found = sorted(r for r in rels if glob_match(str(r), ref))
        if not found: raise DocsError(f'_quarto.yml: {where}: {ref} matches no notebook under nbs/')
    else:
        found = [PurePosixPath(ref)]
        if found[0] not in rels:
            why = 'is not a notebook under nbs/' if (NBS/ref).exists() else 'does not exist under nbs/'
            raise DocsError(f'_quarto.yml: {where} names nbs/{ref}, which {why}')
    seen.update(found)
    return found


def expand_contents(contents, rels: list, names: dict, where: str, seen: set) -> list:
    "`contents` with each page renamed to its nbdev name and each glob expanded."
    out = []
    for c in contents if isinstance(contents, list) else [contents]:
        if isinstance(c, str) and not c.strip().startswith('---') and not re.match(r'^[a-z]+:', c) and c != 'auto':
            out += [str(names[r]) for r in page_refs(c, rels, where, seen)]
        elif isinstance(c, dict):
            c = dict(c)
            for k in ('href', 'file'):
                if isinstance(c.get(k), str) and not re.match(r'^[a-z]+:', c[k]):
                    (r,) = page_refs(c[k], rels, where, seen, single=True)
                    c[k] = str(names[r])
            if 'contents' in c: c['contents'] = expand_contents(c['contents'], rels, names, where, seen)
            out.append(c)
        else: out.append(c)
    return out


def site_config(rels: list, names: dict) -> dict:
    "The smalldocs config: `_quarto.yml` with its metadata-files merged, pages renamed, globs expanded, output moved."
    def merge(a, b):
        return {**a, **{k: merge(a[k], v) if isinstance(a.get(k), dict) and isinstance(v, dict) else v
                        for k, v in b.items()}}
    q = NBS/'_quarto.yml' if (NBS/'_quarto.yml').exists() else ROOT/'_quarto.yml'  # nbs/_quarto.yml links to ../
    try: cfg = yaml.safe_load(q.read_text()) or {}
    except yaml.YAMLError as e: raise DocsError(f'_quarto.yml: {e}') from None
    for f in cfg.pop('metadata-files', []) or []:
        if not (NBS/f).exists(): raise DocsError(f'_quarto.yml: metadata-files names nbs/{f}, which does not exist')
        cfg = merge(cfg, yaml.safe_load((NBS/f).read_text()) or {})
    web, seen = cfg.setdefault('website', {}), set()
    sidebar = web.get('sidebar')
    for sb in (sidebar if isinstance(sidebar, list) else [sidebar] if sidebar else []):
        sb['contents'] = expand_contents(sb.get('contents', []), rels, names, 'sidebar', seen)
    in_sidebar = set(seen)
    for side in ('left', 'right'):
        if side in web.get('navbar', {}):
            web['navbar'][side] = expand_contents(web['navbar'][side], rels, names, f'navbar.{side}', seen)
    missing = [r for r in rels if r not in in_sidebar]
    if missing: raise DocsError(f'{", ".join(f"nbs/{r}" for r in missing)}: not in the sidebar of _quarto.yml '
                                '(add the page, or a glob that matches it, to website.sidebar.contents)')
    cfg.setdefault('project', {})['output-dir'] = '../site'
    return cfg


# ------------------------------------------------------------------ running and processing one notebook (in a worker)

def _process(job: dict) -> dict:
    "In a worker: process (and run) one notebook, write it, and return what happened, with `error` set on failure."
    set_root(job['root'])
    try: return {**job, **_process1(**{k: v for k, v in job.items() if k != 'root'}), 'error': ''}
    except DocsError as e: return {**job, 'error': str(e)}
    except Exception as e: return {**job, 'error': f'nbs/{job["rel"]}: nbdev could not process it: {type(e).__name__}: {e}'}


class _OutOfTime(Exception): pass


def _process1(src, dst, rel, mode, key, deadline=0.0) -> dict:
    "mode `run`: every cell nbdev_test runs, until `deadline` (epoch seconds; 0: none); then, or in mode `api`, only "
    "what show_doc needs (nothing, in an experiment notebook). Returns the mode used, seconds, `cached`, `cut_after`."
    src, dst, t0, cut_after, note = Path(src), Path(dst), time.time(), None, ''
    if mode == 'run' and deadline and t0 >= deadline:  # the budget was spent before this one started
        mode, cut_after = 'api', 0.0
    while True:
        if mode == 'api' and cut_after is not None: note, key = CUT_NOTE, key and cache_key(NBS/rel, 'api', CUT_NOTE)
        cached = CACHE/f'{key}.ipynb'
        if key and cached.exists():
            shutil.copyfile(cached, dst)
            return dict(mode=mode, seconds=0.0, cached=True, cut_after=cut_after)
        try:
            nb, skipped = _run_procs(src, rel, mode, deadline)
            break
        except _OutOfTime:  # keep its API entries, in this warm worker
            mode, cut_after = 'api', time.time() - t0
    from execnb.nbio import write_nb, mk_cell
    if note: nb.cells.insert(1, mk_cell(f'::: {{.callout-note}}\n{note}\n:::', 'markdown'))
    write_nb(nb, dst)
    if key:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE/f'.{key}.{os.getpid()}.tmp'
        shutil.copyfile(dst, tmp)
        os.replace(tmp, cached)
    return dict(mode=mode, seconds=time.time() - t0, cached=False, cut_after=cut_after, skipped=skipped)


def _run_procs(src: Path, rel: str, mode: str, deadline: float):
    "Read the notebook and apply nbdev's processors to it, with `exec_show_docs` replaced as `_process1` says."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.processors import FilterDefaults, exec_show_docs
    flags, skipped = set(get_config().get('tst_flags', '').split()), []

    class exec_all(exec_show_docs):
        "nbdev's `exec_show_docs`, but running every code cell that `nbdev_test` runs, so examples keep their outputs."
        def begin(self):
            self.k = CaptureShell(mpl_format='retina', timeout=CELL_TIMEOUT)
            self.k.run_cell('from nbdev.showdoc import show_doc')

        def __call__(self, cell):
            if cell.cell_type != 'code' or not cell.get('source') or 'nbdev_export' + '(' in cell.source: return
            d = cell.directives_
            if d.get('eval:', [''])[0].lower() == 'false': return
            if mode == 'api':  # what show_doc needs: exported cells, cells of imports only, show_doc cells
                wanted = d.keys() & {'export', 'exports', 'exporti', 'exec_doc'} or _only_imports(cell.source) \
                         or re.match(r'(\s*#\|.*\n)*\s*show_doc\(', cell.source)
                if not (self.nb.has_docs_ and wanted): return
            elif flags & d.keys(): return
            # the budget is checked between cells: stopping one (SIGALRM) could leave a module half imported
            if mode == 'run' and deadline and time.time() >= deadline: raise _OutOfTime()
            self.k.cell(cell)
            if not self.k.exc: return
            e, where = self.k.exc, getattr(cell, 'orig_idx_', None)
            where = f'cell {where}' if where is not None else f'the cell nbdev added, {cell.source.splitlines()[-1]}'
            if mode == 'api':  # a notebook that did not fit in the budget: show what can be shown
                skipped.append(f'{where}: {type(e).__name__}: {e}')
                cell.outputs = []
                return
            raise DocsError(f'nbs/{rel}: {where} raised {type(e).__name__}: {e}\n'
                            f'--- the cell ---\n{cell.source}') from None

    class Procs(FilterDefaults):
        def base_procs(self): return [exec_all if p is exec_show_docs else p for p in super().base_procs()]

    os.chdir(src.parent)
    env = dict(os.environ)  # a notebook that changes the environment (or deletes $MODELFUSION_CACHE) affects only itself
    os.environ['IN_TEST'] = '1'
    nb = read_nb(src)
    for i, c in enumerate(nb.cells):
        c.orig_idx_ = i
        if c.cell_type == 'markdown': c.source = expand_includes(c.source, (NBS/rel).parent)
    try: Procs()(nb)
    finally: os.environ.clear(); os.environ.update(env)
    return nb, skipped


def _only_imports(code: str) -> bool:
    "Whether code is imports and nothing else (nbdev's docs also run cells that mix them with other code)."
    import ast
    try: tree = ast.parse(code)
    except SyntaxError: return False
    return bool(tree.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def cache_key(nb: Path, mode: str, note: str = '') -> str:
    "A hash of what a processed notebook depends on: the notebook, the package's source, settings.ini, nbdev, ..."
    import nbdev
    h = hashlib.sha256()
    inc = [p for c in json.loads(nb.read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'markdown'
           for p in includes(_source(c), nb.parent) if p.is_file()]
    for f in [nb, *inc, ROOT/'settings.ini', *sorted((ROOT/'modelfusion').rglob('*.py')),
              *sorted((ROOT/'modelfusion'/'config').rglob('*.yaml'))]:
        h.update(f.name.encode() + b'\0' + f.read_bytes() + b'\0')
    data = os.environ.get('MODELFUSION_DATA', '')
    h.update(f'{PROC_VERSION} MODELFUSION_DATA={data} nbdev {nbdev.__version__} {mode} {note}'.encode())
    return h.hexdigest()[:24]


def run_jobs(jobs: list[dict], n: int) -> dict:
    "Run the jobs on `n` workers, in order; return {notebook: result}. The first error fails the build."
    import build_docs  # the workers import this file by name: IPython replaces a worker's `__main__`
    done, pool, ok = {}, mp.get_context('spawn').Pool(n), False
    try:
        for res in pool.imap_unordered(build_docs._process, jobs):
            if res['error']: raise DocsError(res['error'])
            rel = res['rel']
            done[rel] = res
            took = 'cached' if res['cached'] else f"{res['seconds']:.1f}s"
            why = '' if res['cut_after'] is None else ' (API only: the time budget was spent)'
            print(f'  {rel}: {took}{why}', flush=True)
            for w in res.get('skipped') or []: print(f'    API only: skipped {w}', flush=True)
        ok = True
        return done
    finally:
        if ok: pool.close()
        else: pool.terminate()  # a notebook failed: stop the others now
        pool.join()


def _state(new: dict | None = None) -> dict:
    "What the last builds learnt: seconds each notebook took (to start the quickest first), and which did not fit in "
    "the budget: {notebook: [its cache key, the budget]}."
    f = CACHE/'state.json'
    old = json.loads(f.read_text()) if f.exists() else {}
    old = {'seconds': old.get('seconds', {}), 'cut': old.get('cut', {})}
    if new:
        cut = {k: v for k, v in old['cut'].items() if k not in new['uncut']}
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({'seconds': {**old['seconds'], **new['seconds']}, 'cut': {**cut, **new['cut']}}, indent=1))
    return old


# ------------------------------------------------------------------ recorded results of experiment notebooks

def results_for(nb: Path) -> list[tuple[Path, str]]:
    "Run folders under results/ that an experiment notebook wrote: rows of results/README.md whose command runs it "
    "(with that row: command, machine, date), and folders named after it."
    found = {}
    readme = RESULTS/'README.md'
    for line in readme.read_text().splitlines() if readme.exists() else []:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        m = re.match(r'`([^`]+)`', cells[0]) if len(cells) >= 2 else None
        if m and re.search(rf'(^|[\s/`]){re.escape(nb.name)}\b', cells[1]) and (RESULTS/m.group(1).strip('/')).is_dir():
            found[RESULTS/m.group(1).strip('/')] = line
    for d in sorted(RESULTS.rglob(nb.stem)):
        if d.is_dir() and (d/'metrics.json').exists(): found.setdefault(d, '')
    return list(found.items())


def _fmt(v) -> str:
    if isinstance(v, float): return '' if v != v else f'{v:.4f}'
    return html.escape(str(v)).replace('|', '\\|')


def _num(v):
    try: return float(v)
    except ValueError: return v


def table_md(rows: list[dict]) -> str:
    "A list of dicts (metrics.json's `table`) as a Markdown table."
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ['| ' + ' | '.join(cols) + ' |', '| ' + ' | '.join('---' for _ in cols) + ' |']
    return '\n'.join(out + ['| ' + ' | '.join(_fmt(r.get(c, '')) for c in cols) + ' |' for r in rows])


def results_md(nb: Path, page_dir: Path) -> str:
    "Markdown for an experiment notebook's recorded results; their figures are copied beside the page."
    found, md = results_for(nb), ['## Recorded results\n']
    if not found:
        return md[0] + ('\nNo run of this notebook is recorded under `results/` yet. Run it with papermill (see the top '
                        'of this page and `results/README.md`) and commit its run folder to show its tables and figures.')
    md.append('This page shows the notebook as a template; it is not run when the site is built. These are the results '
              'of the recorded runs, read from `results/`.\n')
    for d, row in found:
        rel = d.relative_to(ROOT)
        md.append(f'### `{rel}/`\n')
        if row:
            cols = [c.strip() for c in row.strip().strip('|').split('|')]
            md.append(f'Command: {cols[1]}\n\nMachine: {cols[2] if len(cols) > 2 else "?"}'
                      f'{"; date: " + cols[3] if len(cols) > 3 else ""}\n')
        m = json.loads((d/'metrics.json').read_text()) if (d/'metrics.json').exists() else {}
        if isinstance(m.get('table'), list) and m['table']: md.append(table_md(m['table']) + '\n')
        elif (d/'table.csv').exists():
            with open(d/'table.csv') as f: rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
            md.append(table_md(rows) + '\n')
        for png in sorted(d.glob('*.png')):
            target = page_dir/'results'/rel.relative_to('results')/png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            md.append(f'![{png.stem.replace("_", " ")} ({rel})]({target.relative_to(page_dir).as_posix()})\n')
        if (d/'params.json').exists():
            p = json.dumps(json.loads((d/'params.json').read_text()), indent=1)
            md.append(f'<details><summary>params.json</summary>\n\n```json\n{p}\n```\n\n</details>\n')
    return '\n'.join(md)


# ------------------------------------------------------------------ before rendering: links and results

_MDLINK = re.compile(r'(\]\()([^)\s]+?\.ipynb)((?:#[^)\s]*)?\))')


def finish_notebook(path: Path, rel: PurePosixPath, names: dict, nb: Path):
    "Links from one notebook to another (`../04_spec.ipynb#x`) follow the pages' renaming; an experiment notebook "
    "gets its recorded results."
    d = json.loads(path.read_text())
    def fix(m):
        target = PurePosixPath(posixpath.normpath(posixpath.join(str(rel.parent), unquote(m.group(2)))))
        if target not in names: return m.group(0)
        return m.group(1) + posixpath.relpath(str(names[target]), str(rel.parent) or '.') + m.group(3)
    for c in d['cells']:
        if c['cell_type'] == 'markdown': c['source'] = _MDLINK.sub(fix, _source(c))
    if not runs(nb): d['cells'].append({'cell_type': 'markdown', 'metadata': {}, 'source': results_md(nb, path.parent)})
    path.write_text(json.dumps(d, indent=1))


# ------------------------------------------------------------------ after rendering

# MathJax 3 as the package django-static-mathjax ships it (no dependencies; `tex-svg-full.js` is one file with every TeX
# extension and SVG output, so it loads no fonts and nothing else); smalldocs writes maths as \( \) and \[ \]
MATHJAX_JS = 'tex-svg-full.js'
MATHJAX_CONFIG = ('window.MathJax = {tex: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]], '
                  'processEscapes: true}, svg: {fontCache: "global"}, options: {enableMenu: false}};')
_KATEX = re.compile(r'<link[^>]+katex[^>]*>\s*|<script[^>]+(?:katex|auto-render)[^>]*></script>\s*')
_REMOTE = re.compile(r'<(?:script|link|img|iframe)\b[^>]*?\s(?:src|href)="((?:https?:)?//[^"]+)"', re.I)
_REMOTE_CSS_IMPORT = re.compile(r'@import\s+url\((["\']?)(?:https?:)?//fonts\.googleapis\.com/[^)]*\1\)\s*;?')
_REMOTE_CSS = re.compile(r'url\(\s*["\']?((?:https?:)?//[^)"\']+)')
_REFS = re.compile(r'\s(?:href|src)="([^"]*)"')
_IDS = re.compile(r'\sid="([^"]+)"')


def mathjax_file() -> Path:
    import importlib.util
    spec = importlib.util.find_spec('mathjax')
    f = Path(list(spec.submodule_search_locations)[0])/'static'/'mathjax'/'es5'/MATHJAX_JS if spec else None
    if not f or not f.exists(): raise DocsError('MathJax is missing: install django-static-mathjax (make env does)')
    return f


def postprocess(site: Path, doc_url: str, source: dict) -> int:
    "Serve maths from the site, make doc links relative, and check every page: no remote assets, no dead links. "
    "Returns how many of nbdev's symbol links were unlinked (names without an API entry, such as private helpers)."
    (site/'site_libs'/'mathjax').mkdir(parents=True)
    shutil.copyfile(mathjax_file(), site/'site_libs'/'mathjax'/MATHJAX_JS)
    site = site.resolve()
    for css in site.rglob('*.css'):  # Bootswatch themes @import Google fonts: the themes' fallback fonts are used
        c = css.read_text(encoding='utf-8')
        if _REMOTE_CSS_IMPORT.search(c): css.write_text(_REMOTE_CSS_IMPORT.sub('', c), encoding='utf-8')
    pages = {p: p.read_text(encoding='utf-8') for p in sorted(site.rglob('*.html'))}
    ids = {p: set(_IDS.findall(s)) for p, s in pages.items()}
    unlinked = 0
    for p, s in pages.items():
        off = posixpath.relpath('.', p.parent.relative_to(site).as_posix())
        off = '' if off == '.' else off + '/'
        if _KATEX.search(s):
            s = _KATEX.sub('', s).replace('</head>', f'<script>{MATHJAX_CONFIG}</script>\n'
                                          f'<script src="{off}site_libs/mathjax/{MATHJAX_JS}" defer></script>\n</head>', 1)
        if doc_url:
            # nbdev links backticked names to the published site (doc_host + doc_baseurl): point them into this one;
            # a name with no API entry there (a private helper, an attribute) is left as plain code, as it has no page
            def local(m):
                nonlocal unlinked
                u = urlsplit(html.unescape(m.group(2)))
                target = site/unquote(u.path) if u.path else None
                if target and target.is_file() and (not u.fragment or unquote(u.fragment) in ids.get(target, ())):
                    return f'<a{m.group(1)}href="{off}{m.group(2)}"{m.group(3)}>{m.group(4)}</a>'
                unlinked += 1
                return m.group(4)
            s = re.sub(rf'<a([^>]*?\s)href="{re.escape(doc_url)}/?([^"]*)"([^>]*)>(.*?)</a>', local, s, flags=re.S)
        pages[p] = s
        p.write_text(s, encoding='utf-8')
    problems = [f'{c.relative_to(site)}: loads {u} from outside the site' for c in site.rglob('*.css')
                for u in _REMOTE_CSS.findall(c.read_text(encoding='utf-8'))]
    for p, s in pages.items():
        rel = p.relative_to(site).as_posix()
        rel = f'{source[rel]} (page {rel})' if rel in source else rel
        problems += [f'{rel}: loads {u} from outside the site' for u in _REMOTE.findall(s)]
        for ref in map(html.unescape, _REFS.findall(s)):
            u = urlsplit(ref)
            if u.scheme or ref.startswith('//') or not ref: continue
            target = (p.parent/unquote(u.path)).resolve() if u.path else p
            if target.is_dir(): target = target/'index.html'
            if not target.exists() or site not in target.parents: problems.append(f'{rel}: dead link {ref}')
            elif u.fragment and target in ids and unquote(u.fragment) not in ids[target]:
                problems.append(f'{rel}: dead link {ref} (no such anchor)')
    if problems: raise DocsError('the site has problems:\n  ' + '\n  '.join(dict.fromkeys(problems)))
    return unlinked


# ------------------------------------------------------------------ the build

def build(jobs: int = 0, use_cache: bool = True, budget: float = 50, out: Path | None = None) -> Path:
    "Build the site into `out` (default _docs/); `budget`: seconds for running notebooks (0: no limit)."
    import importlib.util
    t0, out = time.time(), out or ROOT/'_docs'
    missing = [m for m in ('smalldocs', 'nbdev', 'execnb', 'nbformat') if importlib.util.find_spec(m) is None]
    if missing: raise DocsError(f'missing Python packages {missing}: dev requirements (settings.ini); run make env')
    mathjax_file()
    nbs = notebooks()
    if not nbs: raise DocsError('nbs/: no notebooks')
    for nb in nbs: read_notebook(nb)
    rels = [PurePosixPath(nb.relative_to(NBS).as_posix()) for nb in nbs]
    names = {r: out_name(r) for r in rels}
    clash = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    if clash: raise DocsError(f'nbs/: {", ".join(str(r) for r in rels if names[r] in clash)} would all become the '
                              f'page {clash[0].with_suffix(".html")}; rename one of them')
    cfg = site_config(rels, names)
    work, saved_env = Path(tempfile.mkdtemp(prefix='_docs.building-', dir=ROOT)), dict(os.environ)
    try:
        src, site, run = work/'src', work/'site', work/'run'
        shutil.copytree(NBS, src, ignore=shutil.ignore_patterns('*.ipynb', '_*', '.*'))
        (src/'_quarto.yml').write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        # the notebooks run in a copy of nbs/; what they write, even to ~ or a default cache, lands in the build folder
        shutil.copytree(NBS, run, ignore=shutil.ignore_patterns('_*', '.ipynb_checkpoints'))
        for d in (work/'cache', work/'tmp', work/'home', work/'started', CACHE/'mpl', CACHE/'ipython'):
            d.mkdir(parents=True, exist_ok=True)
        n = jobs or os.cpu_count() or 1
        os.environ.update(HOME=str(work/'home'), MODELFUSION_CACHE=str(work/'cache'), TMPDIR=str(work/'tmp'),
                          MPLCONFIGDIR=str(CACHE/'mpl'), IPYTHONDIR=str(CACHE/'ipython'), MODELFUSION_PROGRESS='0',
                          PYDEVD_DISABLE_FILE_VALIDATION='1')
        os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // n)))  # n workers share the CPUs
        state, todo = _state(), []
        deadline = time.time() + budget if budget else 0.0
        for nb, r in zip(nbs, rels):
            mode = 'run' if runs(nb) else 'api'
            j = dict(root=str(ROOT), src=str(run/r), dst=str(src/names[r]), rel=str(r), mode=mode,
                     key=cache_key(nb, mode) if use_cache else '', deadline=deadline)
            Path(j['dst']).parent.mkdir(parents=True, exist_ok=True)
            cut = state['cut'].get(j['rel'])  # [key, budget]: unchanged, it did not fit in this budget or a longer one
            if budget and mode == 'run' and j['key'] and isinstance(cut, list) and cut[0] == j['key'] \
               and budget <= cut[1] and not (CACHE/f'{j["key"]}.ipynb').exists(): j['deadline'] = 1.0  # long past
            todo.append(j)
        # cached ones first, then the quickest (the last builds' times, else the smallest), so most fit in the budget
        todo.sort(key=lambda j: (not (CACHE/f'{j["key"]}.ipynb').exists(),
                                 state['seconds'].get(j['rel'], Path(j['src']).stat().st_size / 2e3)))
        print(f'docs: {len(todo)} notebooks ({sum(j["mode"] == "run" for j in todo)} run for their outputs) on {n} '
              f'workers, {f"time budget {budget:g}s" if budget else "no time budget"}', flush=True)
        if str(Path(__file__).parent) not in sys.path: sys.path.insert(0, str(Path(__file__).parent))
        done = run_jobs(todo, n)
        cut = {r: d for r, d in done.items() if d['cut_after'] is not None}
        if cut: print(f'docs: time budget ({budget:g}s) spent: API entries only for {", ".join(cut)}', flush=True)
        # remember the notebooks that had run for half the budget or more when it was spent (not those started late):
        # builds with this budget or less give them their API entries at once, until they change
        _state({'seconds': {**{r: d['cut_after'] for r, d in cut.items() if d['cut_after']},
                            **{r: d['seconds'] for r, d in done.items() if d['mode'] == 'run' and not d['cached']}},
                'cut': {r: [d['key'], budget] for r, d in cut.items() if d['cut_after'] >= budget / 2},
                'uncut': [r for r, d in done.items() if d['mode'] == 'run']})
        t1 = time.time()
        for nb, r in zip(nbs, rels): finish_notebook(src/names[r], r, names, nb)
        from smalldocs.config import load
        from smalldocs.site import Site
        sd = Site(load(src), quiet=True)
        sd.build()
        by_page = {str(names[r]): f'nbs/{r}' for r in rels}  # name the notebook a problem comes from
        broken = [f'{by_page.get(p, p)}: {why}' for p, why in (w.split(': ', 1) for w in sd.warnings if 'broken link' in w)]
        if broken: raise DocsError('dead links:\n  ' + '\n  '.join(broken))
        for w in sd.warnings:  # options of _quarto.yml that it does not read, and the like (output-file: done above)
            if 'output-file is not read' not in w: print(f'docs: smalldocs: {w}')
        from nbdev.config import get_config
        c = get_config()
        unlinked = postprocess(site, (c.get('doc_host', '') + c.get('doc_baseurl', '')).rstrip('/'),
                               {str(names[r].with_suffix('.html')): f'nbs/{r}' for r in rels})
        if unlinked: print(f'docs: {unlinked} backticked names have no API entry to link to (private helpers, attributes)')
        (site/'.docs-complete').write_text(f'built {time.strftime("%Y-%m-%d %H:%M:%S")} from {len(nbs)} notebooks\n')
        if out.exists(): os.replace(out, work/'old')
        os.replace(site, out)
        print(f'docs: wrote {len(list(out.rglob("*.html")))} pages to {out.relative_to(ROOT)}/ in {time.time() - t0:.0f}s'
              f' (notebooks {t1 - t0:.0f}s, rendering {time.time() - t1:.0f}s)', flush=True)
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ README from nbs/index.ipynb

def readme_text() -> str:
    "README.md as nbdev_readme would write it from nbs/index.ipynb, without Quarto: the markdown cells, and the code "
    "cells as Python blocks (without outputs, which change from run to run); hidden cells and directives left out."
    parts = []
    for c in read_notebook(NBS/'index.ipynb')['cells']:
        s = _source(c)
        if c['cell_type'] == 'markdown': parts.append(expand_includes(s, NBS).strip())
        elif c['cell_type'] == 'code':
            dirs = [l for l in s.splitlines() if re.match(r'\s*#\|', l)]
            if any(re.match(r'\s*#\|\s*(hide|export|exporti|default_exp)\b|\s*#\|\s*(include|echo)\s*:\s*false', l)
                   for l in dirs): continue
            code = '\n'.join(l for l in s.splitlines() if not re.match(r'\s*#\|', l)).strip()
            if code: parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(p for p in parts if p) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(prog='tools/build_docs.py', description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    b = sub.add_parser('build', help='build the site into _docs/')
    b.add_argument('--jobs', type=int, default=int(os.environ.get('DOCS_JOBS', '0')), help='workers (default: CPUs)')
    b.add_argument('--no-cache', action='store_true', help='run every notebook again')
    b.add_argument('--budget', type=float, default=float(os.environ.get('DOCS_BUDGET') or 50),
                   help='seconds for running notebooks; those left get API entries only (0: no limit; default 50)')
    r = sub.add_parser('readme', help='write README.md from nbs/index.ipynb')
    r.add_argument('--check', action='store_true', help='only say whether README.md is what index.ipynb gives')
    a = p.parse_args(argv)
    os.chdir(ROOT)
    try:
        if a.cmd == 'build':
            build(a.jobs, use_cache=not a.no_cache and os.environ.get('DOCS_CACHE', '1') != '0', budget=a.budget)
        elif a.check:
            if (ROOT/'README.md').read_text() != readme_text():
                print('README.md differs from nbs/index.ipynb, its source: run `make readme`', file=sys.stderr)
                return 1
            print('README.md is what nbs/index.ipynb gives')
        else:
            (ROOT/'README.md').write_text(readme_text())
            print('README.md written from nbs/index.ipynb')
    except DocsError as e:
        print(f'docs: FAILED: {e}', file=sys.stderr)
        if a.cmd == 'build': print('docs: _docs/ was left as it was before this build', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())

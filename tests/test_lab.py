"""JupyterLab in the box: the `modelfusion` kernel runs the λ slider headless, `make lab` serves the notebooks with
that kernel, and no tracked file names a path of one machine."""
import json, os, re, secrets, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest
import nbformat
from conftest import BIN, ROOT, run

JUPYTER = BIN/'jupyter'
KERNEL = 'modelfusion'  # registered by `make env` (python -m ipykernel install --sys-prefix --name modelfusion)
WIDGET_VIEW, WIDGET_STATE = 'application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json'


def _jupyter_env(tmp_path: Path) -> dict:
    "The test's environment with Jupyter's per-user folders (config, runtime, Lab settings/workspaces) in tmp_path."
    env = dict(os.environ, MODELFUSION_PROGRESS='0', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for var, sub in [('JUPYTER_CONFIG_DIR', 'config'), ('JUPYTER_RUNTIME_DIR', 'runtime'),
                     ('JUPYTERLAB_SETTINGS_DIR', 'lab-settings'), ('JUPYTERLAB_WORKSPACES_DIR', 'lab-workspaces')]:
        (tmp_path/sub).mkdir(exist_ok=True); env[var] = str(tmp_path/sub)
    return env


def _need_jupyter():
    assert JUPYTER.exists(), f"{JUPYTER} is missing: JupyterLab is a dev requirement, run `make env`"


# %% (a) the λ slider, executed through the registered kernel, with the widget state saved

SLIDER_NB = [
    "import sys, modelfusion, torch\n"
    "from modelfusion.data import load_dataset\n"
    "from modelfusion.models import MLP\n"
    "from modelfusion.evaluation import lambda_slider\n"
    "print('modelfusion from', modelfusion.__file__)",
    "data = load_dataset('digits')\n"
    "torch.manual_seed(0); A = MLP(in_dim=64, widths=(16,))\n"
    "torch.manual_seed(1); B = MLP(in_dim=64, widths=(16,))",
    "w = lambda_slider(A, A.state_dict(), B.state_dict(), data); w",
]


def test_lambda_slider_notebook_saves_widget_state(tmp_path):
    _need_jupyter()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in SLIDER_NB])
    nb.metadata.kernelspec = {'name': KERNEL, 'display_name': 'Python (modelfusion)', 'language': 'python'}
    src = tmp_path/'slider.ipynb'; nbformat.write(nb, src)
    r = run([str(JUPYTER), 'nbconvert', '--to', 'notebook', '--execute', f'--ExecutePreprocessor.kernel_name={KERNEL}',
             '--ExecutePreprocessor.store_widget_state=True', '--ExecutePreprocessor.timeout=120',
             '--output', 'executed.ipynb', '--output-dir', str(tmp_path), str(src)],
            cwd=tmp_path, env=_jupyter_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = nbformat.read(tmp_path/'executed.ipynb', as_version=4)
    assert out.metadata.kernelspec.name == KERNEL
    # the kernel imported this checkout's modelfusion (the editable install in the venv)
    first = ''.join(o.get('text', '') for o in out.cells[0].outputs)
    assert 'modelfusion from' in first and Path(first.split('modelfusion from', 1)[1].strip()).resolve().is_relative_to(ROOT), first

    # the slider cell displays a widget view ...
    views = [o['data'][WIDGET_VIEW] for o in out.cells[-1].outputs if WIDGET_VIEW in o.get('data', {})]
    assert len(views) == 1, out.cells[-1].outputs
    # ... whose model, and the models it refers to, are saved in the notebook's metadata
    state = out.metadata['widgets'][WIDGET_STATE]['state']
    assert views[0]['model_id'] in state
    children = {c.removeprefix('IPY_MODEL_') for c in state[views[0]['model_id']]['state']['children']}
    kinds = {state[c]['model_name']: state[c]['state'] for c in children}
    assert set(kinds) == {'FloatSliderModel', 'OutputModel'}, kinds.keys()  # interactive: the slider and its output
    slider = kinds['FloatSliderModel']
    assert slider['value'] == 0.5 and slider['description'] == 'λ' and (slider['min'], slider['max']) == (0, 1)
    # the printed loss/accuracy at λ = 0.5 is in the Output widget's saved outputs
    texts = [o.get('text', '') for o in kinds['OutputModel'].get('outputs', [])]
    line = next((t for t in texts if t.startswith('λ=0.50')), None)
    assert line is not None, texts
    m = re.fullmatch(r'λ=0\.50  test loss (\d+\.\d{4})  accuracy (\d+\.\d{2})%\n', line)
    assert m, line
    assert float(m[1]) > 0 and 0 <= float(m[2]) <= 100


# %% (b) `make lab`: a headless JupyterLab that lists the modelfusion kernel

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _get(url: str, token: str, timeout: float = 5):
    req = urllib.request.Request(url, headers={'Authorization': f'token {token}'})
    with urllib.request.urlopen(req, timeout=timeout) as resp: return resp.status, resp.read().decode()


def _group_alive(pgid: int) -> bool:
    "Whether any process of the group is still running (zombies do not count: a container's init may never reap them)."
    proc = Path('/proc')
    if not (proc/'self'/'stat').exists():
        try: os.killpg(pgid, 0); return True
        except ProcessLookupError: return False
    for p in proc.iterdir():
        if not p.name.isdigit(): continue
        try: fields = (p/'stat').read_text().rsplit(')', 1)[1].split()
        except (OSError, IndexError): continue
        if int(fields[2]) == pgid and fields[0] != 'Z': return True
    return False


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    "SIGTERM the whole process group (make and jupyter), then SIGKILL whatever is left after `timeout` s."
    pgid = proc.pid  # start_new_session: the group's id is make's pid
    for sig, wait in [(signal.SIGTERM, timeout), (signal.SIGKILL, 10)]:
        try: os.killpg(pgid, sig)
        except ProcessLookupError: pass
        try: proc.wait(timeout=wait)
        except subprocess.TimeoutExpired: pass
        t = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < t: time.sleep(0.1)
        if not _group_alive(pgid): return


def test_make_lab_serves_modelfusion_kernel(tmp_path):
    _need_jupyter()
    port, token, venv = _free_port(), secrets.token_hex(16), Path(sys.prefix)
    lab_args = (f'--no-browser --ServerApp.open_browser=False --ServerApp.ip=127.0.0.1 --port={port} '
                f'--ServerApp.port_retries=0 --IdentityProvider.token={token} --allow-root')
    # `make lab` as a user runs it; -o: take the venv as installed (the test must not reinstall the environment)
    cmd = ['make', '--no-print-directory', '-C', str(ROOT), f'VENV={venv}', '-o', f'{venv}/.installed', 'lab', f'LAB_ARGS={lab_args}']
    log = tmp_path/'lab.log'
    with open(log, 'wb') as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_jupyter_env(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline, api = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"make lab exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try: api = _get(f'{base}/api', token, timeout=2); break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError): time.sleep(0.5)
        assert api is not None, f"JupyterLab did not answer on port {port} within 60 s:\n{log.read_text()[-4000:]}"
        assert api[0] == 200 and 'version' in json.loads(api[1])

        status, body = _get(f'{base}/api/kernelspecs', token)
        specs = json.loads(body)['kernelspecs']
        assert status == 200 and KERNEL in specs, sorted(specs)
        spec = specs[KERNEL]['spec']
        assert spec['display_name'] == 'Python (modelfusion)' and spec['language'] == 'python'
        assert Path(spec['argv'][0]).parent == Path(sys.executable).parent, spec['argv']  # the venv's python
        # the server is rooted in nbs/ ...
        status, body = _get(f'{base}/api/contents', token)
        assert status == 200 and 'index.ipynb' in {c['name'] for c in json.loads(body)['content']}
        # ... and the Lab front end is served with the ipywidgets extension (the slider renders)
        status, html = _get(f'{base}/lab', token, timeout=10)
        assert status == 200 and 'JupyterLab' in html
        assert '@jupyter-widgets/jupyterlab-manager' in html
        # a wrong token is refused
        with pytest.raises(urllib.error.HTTPError) as e: _get(f'{base}/api/kernelspecs', 'wrong' + token)
        assert e.value.code == 403
    finally:
        _stop_group(proc)
    assert not _group_alive(proc.pid), f"processes of `make lab` survived SIGKILL:\n{log.read_text()[-2000:]}"
    with pytest.raises(OSError):
        socket.create_connection(('127.0.0.1', port), timeout=1).close()


# %% no paths of one machine in the repository

# The work and shared folders of one machine, and home folders (Linux, root, macOS). Written as alternations so that
# this file does not match itself.
MACHINE_PATH = re.compile(r'/work/(?:shared|main)\b|/(?:root|home|Users)/')


def test_no_machine_specific_paths():
    "Tracked (and new, not ignored) text files name data and outputs relative to the repository, never a machine's path."
    r = run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'])
    if r.returncode != 0: pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    hits = []
    for name in filter(None, r.stdout.split('\0')):
        p = ROOT/name
        if not p.is_file(): continue  # deleted in the work tree
        raw = p.read_bytes()
        if b'\0' in raw[:8192]: continue  # binary
        text = raw.decode('utf-8', errors='replace')
        hits += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]}" for m in MACHINE_PATH.finditer(text)]
    assert not hits, "absolute paths of one machine (use paths relative to the repository or $MODELFUSION_DATA):\n" + '\n'.join(hits)

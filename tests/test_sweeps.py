"""Acceptance tests of the sweep engine (issue 14): a sweep killed with SIGKILL half-way and started again runs only the
missing runs and loses no finished one; Dask (LocalCluster) gives the same metrics as the local executor; bad input
fails at once with a clear message. Tiny notebooks in a temporary folder keep it fast (each run is one kernel start)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import yaml
import nbformat

from modelfusion.core import OutputNotWritable
from modelfusion.sweeps import run_sweep, load_sweep, SweepError, SWEEP_MARKER, shipped_sweeps

TOY = """import json, time
from pathlib import Path
time.sleep(sleep)
if fail: raise RuntimeError('asked to fail')
o = Path(out)
o.mkdir(parents=True, exist_ok=True)
(o/'params.json').write_text(json.dumps({'a': a, 'b': b}))
(o/'metrics.json').write_text(json.dumps({'y': a * b, 'computed_from': {'a': a, 'b': b}}))
(o/'.modelfusion-run').write_text('{}')"""


def toy_notebook(d: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    params = ('a = 1  # an int\nb = 0.5  # a number\nfail = False  # raise an error\n'
              'sleep = 0.0  # seconds to wait\nout = "runs/toy"  # run folder')
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(TOY)]
    nbformat.write(nb, d/'toy.ipynb')
    return d/'toy.ipynb'


@pytest.fixture
def nbs(tmp_path):
    d = tmp_path/'nbs'
    d.mkdir()
    toy_notebook(d)
    return d


def finished(out: Path) -> dict:
    "Finished run folders: name -> (marker text, marker mtime, metrics)."
    return {p.parent.name: (p.read_text(), p.stat().st_mtime_ns, json.loads((p.parent/'metrics.json').read_text()))
            for p in out.glob(f'*/{SWEEP_MARKER}')}


def test_sigkill_half_way_then_rerun_runs_only_the_missing(nbs, tmp_path):
    n = 6
    spec = tmp_path/'toy.yaml'
    spec.write_text(yaml.safe_dump({'notebook': 'toy', 'notebooks': str(nbs), 'params': {'sleep': 0.5},
                                    'grid': {'a': list(range(1, n + 1))}}))
    out = tmp_path/'sweep'
    code = f"from modelfusion.sweeps import run_sweep; run_sweep({str(spec)!r}, out={str(out)!r}, verbose=False)"
    p = subprocess.Popen([sys.executable, '-c', code], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while len(finished(out)) < 2 and time.time() - t0 < 60 and p.poll() is None: time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)  # the sweep process, half-way
        p.wait()
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)  # its orphaned kernel, if one is left
        except ProcessLookupError: pass
    before = finished(out)
    assert 2 <= len(before) < n, f"killed at {len(before)} of {n} finished runs"
    s = run_sweep(spec, out=out, verbose=False)
    print(f"killed with {len(before)} of {n} runs finished; the rerun ran {s['done']} and skipped {s['skipped']}")
    assert (s['skipped'], s['done'], s['failed']) == (len(before), n - len(before), 0)  # only the missing runs ran
    after = finished(out)
    assert len(after) == n
    for name, v in before.items(): assert after[name] == v  # no finished run lost, rerun or touched
    assert sorted(m['y'] for _, _, m in after.values()) == [a * 0.5 for a in range(1, n + 1)]
    s = run_sweep(spec, out=out, verbose=False)
    assert (s['skipped'], s['done']) == (n, 0)


def test_dask_local_cluster_gives_the_same_metrics_as_local(nbs, tmp_path):
    spec = {'notebook': 'toy', 'notebooks': str(nbs), 'params': {'b': 0.25}, 'grid': {'a': [1, 2, 3]}}
    local = run_sweep(spec, out=tmp_path/'local', verbose=False)
    dask = run_sweep(spec, executor='dask', jobs=2, out=tmp_path/'dask', verbose=False)
    assert local['done'] == dask['done'] == 3 and local['failed'] == dask['failed'] == 0
    ml = {k: m for k, (_, _, m) in finished(tmp_path/'local').items()}
    md = {k: m for k, (_, _, m) in finished(tmp_path/'dask').items()}
    assert ml == md and len(ml) == 3


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(nbs, tmp_path):
    spec = {'notebook': 'toy', 'notebooks': str(nbs), 'cases': [{'a': 2}, {'fail': True}, {'a': 3}]}
    s = run_sweep(spec, out=tmp_path/'s', verbose=False)
    assert (s['done'], s['failed']) == (2, 1)
    bad = next(r for r in s['runs'] if r['status'] == 'failed')
    assert bad['error'] == 'RuntimeError: asked to fail'
    assert (tmp_path/'s'/'.failed'/f"{bad['name']}.json").exists() and not (tmp_path/'s'/bad['name']).exists()


def test_unknown_notebook(nbs):
    with pytest.raises(SweepError, match=r"unknown notebook 'toyy': the notebooks in .* are toy"):
        load_sweep({'notebook': 'toyy', 'notebooks': str(nbs)})


def test_unknown_parameter_names_the_known_ones(nbs):
    with pytest.raises(SweepError, match="unknown parameter 'epochs' for toy: its parameters are a, b, fail, sleep, out"):
        load_sweep({'notebook': 'toy', 'notebooks': str(nbs), 'grid': {'epochs': [1, 2]}})


def test_wrong_type(nbs):
    with pytest.raises(SweepError, match=r"parameter 'a' of toy wants an int \(default 1\), got 'ten' \(str\)"):
        load_sweep({'notebook': 'toy', 'notebooks': str(nbs), 'params': {'a': 'ten'}})
    with pytest.raises(SweepError, match="parameter 'fail' of toy wants a bool"):
        load_sweep({'notebook': 'toy', 'notebooks': str(nbs), 'cases': [{'fail': 'yes'}]})


def test_unwritable_output_folder(nbs, tmp_path):
    ro = tmp_path/'ro'
    ro.mkdir()
    ro.chmod(0o500)
    try:
        target = '/proc/modelfusion-sweep' if os.geteuid() == 0 else str(ro/'sweep')  # root writes anywhere but /proc
        with pytest.raises(OutputNotWritable, match='cannot write to the output folder'):
            run_sweep({'notebook': 'toy', 'notebooks': str(nbs)}, out=target, verbose=False)
    finally: ro.chmod(0o700)


def test_unreachable_scheduler_fails_fast(nbs, tmp_path):
    t = time.time()
    with pytest.raises(SweepError, match='cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 1 s'):
        run_sweep({'notebook': 'toy', 'notebooks': str(nbs)}, executor='dask', scheduler='tcp://127.0.0.1:9',
                  connect_timeout=1, out=tmp_path/'s', verbose=False)
    assert time.time() - t < 15


def test_shipped_sweeps_cover_every_experiment_notebook():
    root = Path(__file__).resolve().parents[1]
    names = {p.stem for p in (root/'nbs'/'experiments').glob('*.ipynb')}
    assert names <= set(shipped_sweeps())
    for name in names:
        for profile in ('cpu', 'gpu', 'smoke'):
            runs = load_sweep(name, profile, root/'nbs'/'experiments')
            assert runs and all(r.notebook == name for r in runs)

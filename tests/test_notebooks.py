"""Papermill smoke runs of every experiment notebook, with tiny parameters."""
import json, pytest
from pathlib import Path
from conftest import ROOT

EXPERIMENTS = sorted((ROOT/'nbs'/'experiments').glob('*.ipynb'))
# Tiny parameters per experiment notebook, in nbs/experiments/profiles/<notebook>/smoke.yaml: every notebook needs one.
def smoke(nb: Path) -> dict:
    import yaml
    p = ROOT/'nbs'/'experiments'/'profiles'/nb.stem/'smoke.yaml'
    return yaml.safe_load(p.read_text()) if p.exists() else None

def test_profiles_name_real_parameters():
    "Every YAML profile only sets parameters that its notebook's parameters cell defines."
    import yaml, nbformat
    for prof in (ROOT/'nbs'/'experiments'/'profiles').glob('*/*.yaml'):
        nb = ROOT/'nbs'/'experiments'/f'{prof.parent.name}.ipynb'
        assert nb.exists(), f'{prof} has no notebook {nb.name}'
        cell = next(c for c in nbformat.read(nb, 4).cells if 'parameters' in c.metadata.get('tags', []))
        names = {l.split('=')[0].strip() for l in cell.source.splitlines() if '=' in l}
        assert set(yaml.safe_load(prof.read_text())) <= names, (prof, set(yaml.safe_load(prof.read_text())) - names)

def _kernel():
    from jupyter_client.kernelspec import KernelSpecManager
    return 'modelfusion' if 'modelfusion' in KernelSpecManager().find_kernel_specs() else 'python3'

def test_every_experiment_has_smoke_parameters():
    assert EXPERIMENTS, 'no experiment notebooks found'
    missing = [p.stem for p in EXPERIMENTS if smoke(p) is None]
    assert not missing, f"add nbs/experiments/profiles/<notebook>/smoke.yaml for {missing}"

@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_notebook_runs(nb, tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('MODELFUSION_CACHE', str(tmp_path/'cache'))
    out = tmp_path/'run'
    pm.execute_notebook(str(nb), str(tmp_path/nb.name), parameters={**smoke(nb), 'out': str(out)},
                        kernel_name=_kernel(), cwd=str(nb.parent), progress_bar=False)
    assert json.loads((out/'params.json').read_text()) and json.loads((out/'metrics.json').read_text())
    assert (out/'.modelfusion-run').exists()  # a finished, all-or-nothing run folder
    assert any(p.suffix == '.png' for p in out.iterdir())

"""Papermill smoke runs of every experiment notebook, with tiny parameters."""
import json, pytest
from pathlib import Path
from conftest import ROOT

EXPERIMENTS = sorted((ROOT/'nbs'/'experiments').glob('*.ipynb'))
# Tiny parameters per experiment notebook: every notebook in nbs/experiments/ must have an entry.
SMOKE = {
    'git_rebasin_mnist_mlp': dict(dataset='digits', widths=[32, 32], epochs=2, n_lams=3, eval_samples=300),
}

def _kernel():
    from jupyter_client.kernelspec import KernelSpecManager
    return 'modelfusion' if 'modelfusion' in KernelSpecManager().find_kernel_specs() else 'python3'

def test_every_experiment_has_smoke_parameters():
    assert EXPERIMENTS, 'no experiment notebooks found'
    assert {p.stem for p in EXPERIMENTS} <= set(SMOKE), f"add smoke parameters for {[p.stem for p in EXPERIMENTS if p.stem not in SMOKE]}"

@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_notebook_runs(nb, tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('MODELFUSION_CACHE', str(tmp_path/'cache'))
    out = tmp_path/'run'
    pm.execute_notebook(str(nb), str(tmp_path/nb.name), parameters={**SMOKE[nb.stem], 'out': str(out)},
                        kernel_name=_kernel(), cwd=str(nb.parent), progress_bar=False)
    assert json.loads((out/'params.json').read_text()) and json.loads((out/'metrics.json').read_text())
    assert any(p.suffix == '.png' for p in out.iterdir())

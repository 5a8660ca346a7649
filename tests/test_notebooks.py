"""Papermill smoke runs of every experiment notebook, with tiny parameters."""
import json, pytest
from pathlib import Path
from conftest import ROOT

EXPERIMENTS = sorted((ROOT/'nbs'/'experiments').glob('*.ipynb'))
# Tiny parameters per experiment notebook: every notebook in nbs/experiments/ must have an entry.
SMOKE = {
    # list parameters as strings, the way `papermill -p widths "[32, 32]"` passes them: the runner parses them
    'git_rebasin_mnist_mlp': dict(dataset='digits', widths='[32, 32]', epochs=2, n_lams=3, eval_samples=300, matchers='[weight, activation, ste]'),
    'repair': dict(model='mlp', model_kw={'widths': [32, 32]}, dataset='digits', train_kw={'epochs': 2, 'batch_size': 64},
                   n_lams=3, repair_lams=3, calib_samples=500, eval_samples=300),
    'git_rebasin_resnet20_width': dict(widths=[0.25, 0.5], dataset='digits', train_kw={'epochs': 1, 'batch_size': 64}, n_lams=3, eval_samples=200),
    'task_merging': dict(modelpool='digits_mlp_tasks', taskpool='digits_tasks', methods=['simple_average', 'task_arithmetic', 'ties_merging',
                         'dare_ties', 'fisher_merging', 'regmean']),
}

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
    assert {p.stem for p in EXPERIMENTS} <= set(SMOKE), f"add smoke parameters for {[p.stem for p in EXPERIMENTS if p.stem not in SMOKE]}"

@pytest.mark.parametrize('nb', EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_notebook_runs(nb, tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('MODELFUSION_CACHE', str(tmp_path/'cache'))
    out = tmp_path/'run'
    pm.execute_notebook(str(nb), str(tmp_path/nb.name), parameters={**SMOKE[nb.stem], 'out': str(out)},
                        kernel_name=_kernel(), cwd=str(nb.parent), progress_bar=False)
    assert json.loads((out/'params.json').read_text()) and json.loads((out/'metrics.json').read_text())
    assert (out/'.modelfusion-run').exists()  # a finished, all-or-nothing run folder
    assert any(p.suffix == '.png' for p in out.iterdir())

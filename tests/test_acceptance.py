"""Issue acceptance: Git Re-Basin on full MNIST, 3x512 MLPs, 10 epochs (uses the model cache shared with `make demo`)."""
import json, pytest
from conftest import has_full
from modelfusion.experiments import run_rebasin_mlp

@pytest.mark.skipif(not has_full('mnist'), reason='full MNIST not configured (MODELFUSION_DATA); the sample variant below runs instead')
def test_weight_matching_removes_the_barrier_on_full_mnist(tmp_path):
    r = run_rebasin_mlp('mnist', widths=[512, 512, 512], epochs=10, seeds=[0, 1], out=tmp_path, allow_sample=False, verbose=False)
    m = r['metrics']; b = m['barriers']
    print(r['table'].to_string())
    assert r['params']['data']['name'] == 'mnist' and r['params']['data']['n_train'] == 60000
    assert b['weight matching']['test_loss_barrier'] < 0.05 and b['weight matching']['train_loss_barrier'] < 0.05
    assert b['naive']['test_loss_barrier'] > 0.5 and b['naive']['train_loss_barrier'] > 0.5
    assert abs(m['matched_midpoint_gap_points']) < 0.5

@pytest.mark.skipif(has_full('mnist'), reason='full MNIST is configured: the full-data test runs instead')
def test_weight_matching_removes_most_of_the_barrier_on_the_embedded_sample(tmp_path):
    r = run_rebasin_mlp('mnist', widths=[512, 512, 512], epochs=10, seeds=[0, 1], out=tmp_path, allow_sample=True, verbose=False)
    b = r['metrics']['barriers']
    assert b['naive']['test_loss_barrier'] > 0.3
    assert b['weight matching']['test_loss_barrier'] < 0.25 * b['naive']['test_loss_barrier']

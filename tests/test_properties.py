"""Properties of specs, transforms and weight matching."""
import pytest, torch
from modelfusion.models import MLP
from modelfusion.spec import mlp_spec, apply, random_alignment, Transform, verify_spec, Spec, Group
from modelfusion.methods.weight_matching import weight_matching, wm_objective
from modelfusion.core import clone_sd

CASES = [((32,), None, 0), ((64, 48, 32), None, 1), ((512, 512, 512), None, 2), ((40, 40), 'bn', 3), ((40, 40, 24), 'ln', 4)]

def _model(widths, norm, seed):
    torch.manual_seed(seed)
    m = MLP(784, widths, 10, norm=norm)
    if norm == 'bn':  # non-trivial running statistics
        m.train(); m(torch.randn(256, 1, 28, 28) * 2 + 0.5)
    return m.eval()

@pytest.mark.parametrize('widths,norm,seed', CASES)
def test_random_permutation_leaves_outputs_unchanged(widths, norm, seed):
    m = _model(widths, norm, seed); spec = mlp_spec(m); x = torch.randn(32, 1, 28, 28)
    al = random_alignment(spec, seed=seed + 10)
    assert all(not torch.equal(t.merge, torch.arange(len(t.merge))) for t in al.values())
    sd = m.state_dict(); psd = apply(sd, spec, al)
    assert any(not torch.equal(psd[k], sd[k]) for k in sd)
    torch.testing.assert_close(torch.func.functional_call(m, psd, (x,)), m(x), rtol=1e-5, atol=1e-5)
    verify_spec(m, spec, x)

@pytest.mark.parametrize('widths,norm,seed', CASES)
def test_weight_matching_recovers_planted_permutation(widths, norm, seed):
    m = _model(widths, norm, seed); spec = mlp_spec(m); sd = m.state_dict()
    planted = random_alignment(spec, seed=seed + 20)
    shuffled = apply(sd, spec, planted)
    res = weight_matching([sd, shuffled], spec, seed=seed)
    for g, grp in spec.groups.items():
        assert torch.equal(planted[g].merge[res.alignments[1][g].merge], torch.arange(grp.size)), g
    back = apply(shuffled, spec, res.alignments[1])
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # exactly the original model

def test_recovers_planted_permutation_of_a_trained_model(mnist):
    from modelfusion.training import fit, model_config, TrainConfig
    import dataclasses
    small = dataclasses.replace(mnist, x_train=mnist.x_train[:2000], y_train=mnist.y_train[:2000])
    sd, _ = fit(model_config('mlp', small, widths=[128, 128]), small, TrainConfig(epochs=1), seed=0, verbose=False)
    spec = mlp_spec(MLP(784, (128, 128), 10)); planted = random_alignment(spec, seed=5)
    res = weight_matching([sd, apply(sd, spec, planted)], spec)
    for g in spec.groups: assert torch.equal(planted[g].merge[res.alignments[1][g].merge], torch.arange(128))

@pytest.mark.parametrize('seed', range(4))
def test_weight_matching_improves_objective_and_is_a_permutation(seed):
    a, b = _model((64, 64), None, seed), _model((64, 64), None, seed + 100)
    spec = mlp_spec(a)
    res = weight_matching([a.state_dict(), b.state_dict()], spec, seed=seed)
    assert res.info['objective'] >= res.info['objective_identity']
    for g, t in res.alignments[1].items(): assert torch.equal(t.merge.sort().values, torch.arange(64))
    # the permuted B is functionally identical to B
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(torch.func.functional_call(b, apply(b.state_dict(), spec, res.alignments[1]), (x,)), b(x), rtol=1e-5, atol=1e-5)

def test_nothing_mutates_its_inputs():
    a, b = _model((32, 32), 'bn', 0), _model((32, 32), 'bn', 1)
    spec = mlp_spec(a); sa, sb = a.state_dict(), b.state_dict(); ca, cb = clone_sd(sa), clone_sd(sb)
    res = weight_matching([sa, sb], spec)
    apply(sb, spec, res.alignments[1]); apply(sa, spec, random_alignment(spec))
    from modelfusion.fusion import merge
    from modelfusion.methods.averaging import interpolate
    merge([sa, sb], 'weight_matching', template=a, spec=spec, fix='reset_bn', data=(torch.randn(64, 784), torch.randint(0, 10, (64,)))); interpolate([sa, sb])
    assert all(torch.equal(sa[k], ca[k]) and torch.equal(sb[k], cb[k]) for k in sa)

def test_general_linear_transform_is_exact_on_a_linear_network():
    # merge = M, unmerge = M^-1 is a symmetry of a network without nonlinearity: the general path of `apply`
    torch.manual_seed(0); m = MLP(20, (16,), 5); m.layers[1] = torch.nn.Identity(); m.eval()
    M = torch.randn(16, 16) + 4 * torch.eye(16)
    spec = mlp_spec(m); x = torch.randn(7, 20)
    out = torch.func.functional_call(m, apply(m.state_dict(), spec, {'layers.0': Transform(M, torch.linalg.inv(M))}), (x,))
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)

def test_permutation_as_matrix_equals_permutation_as_index():
    m = _model((24, 24), 'bn', 3); spec = mlp_spec(m); sd = m.state_dict()
    al = random_alignment(spec, 7)
    dense = {g: Transform(*t.matrices()) for g, t in al.items()}
    a, b = apply(sd, spec, al), apply(sd, spec, dense)
    for k in sd: torch.testing.assert_close(a[k], b[k])

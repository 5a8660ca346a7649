"""ZipIt! and CCA Merge (issue 10): acceptance properties on trained models, torchvision resnet18 through merge(),
the command line on a shipped pool, partial zipping, BatchNorm, statistics computed once, bad input."""
import copy, json, os
import pytest, torch
from torch import nn
from torch.testing import assert_close
from modelfusion.core import IncompatibleModels
from modelfusion.fusion import merge, MATCHERS, METHODS
from modelfusion.models import MLP, ResNet20
from modelfusion.spec import apply, mlp_spec, random_alignment, Transform
from modelfusion.trace import spec_for
from modelfusion.training import train, model_config, TrainConfig
from modelfusion.evaluation import evaluate
from modelfusion.methods import features
from modelfusion.methods.features import fold_bn
from modelfusion.methods.zipit import zipit, partial_zip, cut_points, load_partial_zip, PartialZip
from modelfusion.methods.cca import cca
from modelfusion.methods.activation import activation_matching


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread: on a shared 2-core machine, threads mostly wait for each other (restored afterwards)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def trained(digits, tmp_path_factory):
    "Three MLPs 64-48-48-10 trained on digits from different seeds (through a temporary model cache)."
    cache = tmp_path_factory.mktemp('cache')
    cfg = model_config('mlp', digits, widths=[48, 48])
    tc = TrainConfig(epochs=8, batch_size=64, lr=5e-3)
    return [train(cfg, digits, tc, seed=s, cache=cache, verbose=False).state_dict for s in range(3)]


@pytest.fixture(scope='module')
def net(): return MLP(64, (48, 48), 10)


def _out(model, sd, x):
    with torch.no_grad(): return torch.func.functional_call(model, sd, (x,))


def test_registered_as_universe_matchers():
    assert {'zipit', 'cca'} <= set(MATCHERS) and {'zipit', 'cca_merge'} <= set(METHODS)
    assert {'zipit', 'cca'} <= MATCHERS.universe


def _live(net, sd, spec, x) -> dict:
    "Per group, the units whose feature varies on x (dead units correlate with nothing, so any match is as good)."
    mo = features.feature_moments(net, [sd], spec, x)
    return {g: m.std > 1e-6 for g, m in mo.items()}


def test_zipit_beta0_two_models_is_the_permute_and_average_of_activation_matching(trained, net, digits):
    "β = 0, two models: ZipIt! is activation matching's permute-and-average on the same correlations, exactly."
    spec, x = mlp_spec(net), digits.x_train
    A, B = trained[:2]  # trained independently: no planted answer
    zr = zipit([A, B], spec, template=net, x=x, beta=0)
    zi, am = zr.alignments[1], activation_matching([A, B], spec, template=net, x=x).alignments[1]
    live_a, live_b = _live(net, A, spec, x), _live(net, B, spec, x)
    for g in spec.groups:
        assert zr.info['groups'][g]['solver'] == 'assignment'
        assert zi[g].is_perm
        both = live_a[g] & live_b[g][zi[g].merge]  # units live in both models (dead ones tie with anything)
        assert both.sum() > 24 and torch.equal(zi[g].merge[both], am[g].merge[both])
    r = merge([A, B], 'zipit', template=net, spec=spec, data=(x, digits.y_train), beta=0.0)
    Bp = apply(B, spec, r.report['alignments']['model_1'])
    for k, v in r.state_dict.items(): assert_close(v, (A[k] + Bp[k]) / 2)
    # a planted permuted copy is recovered on every live unit
    planted = random_alignment(spec, seed=5)
    zp = zipit([A, apply(A, spec, planted)], spec, template=net, x=x, beta=0).alignments[1]
    for g in spec.groups:
        assert torch.equal(planted[g].merge[zp[g].merge][live_a[g]], torch.arange(48)[live_a[g]])


def test_cca_recovers_a_planted_permutation_as_a_matrix_and_merging_returns_the_model(trained, net, digits):
    spec, x = mlp_spec(net), digits.x_train
    planted = random_alignment(spec, seed=7)
    B = apply(trained[0], spec, planted)
    al = cca([trained[0], B], spec, template=net, x=x).alignments[1]
    live = _live(net, trained[0], spec, x)
    for g, t in al.items():
        P, _ = Transform.perm(planted[g].merge).matrices()
        assert not t.is_perm and t.merge.shape == (48, 48)
        assert_close(t.merge[live[g]], P.T[live[g]], atol=2e-3, rtol=0)  # the live units' rows: the permutation
        assert t.merge[~live[g]].min() > -2e-3  # (never mixed with negative weights that could wake them up)
    r = merge([trained[0], B], 'cca_merge', template=net, spec=spec, data=(x, digits.y_train))
    assert_close(_out(net, r.state_dict, x), _out(net, trained[0], x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize('method', ['zipit', 'cca_merge'])
def test_function_preserving_when_a_model_is_mapped_into_its_own_space(method, trained, net, digits):
    "A model merged with a copy of itself is the same function (each copy's map is the identity), on unseen data too."
    r = merge([trained[1]] * 2, method, template=net, data=(digits.x_train, digits.y_train))
    assert_close(_out(net, r.state_dict, digits.x_test), _out(net, trained[1], digits.x_test), atol=1e-4, rtol=1e-4)
    assert all(t.is_perm and torch.equal(t.merge, torch.arange(48)) if t.is_perm else
               torch.allclose(t.merge, torch.eye(48), atol=1e-4) for t in r.report['alignments']['model_1'].values())


def test_zipit_and_cca_with_batchnorm_copies_and_fix():
    "A ResNet20 with BatchNorm merged with itself is unchanged; with reset_bn the statistics are its own again."
    torch.manual_seed(0)
    m = ResNet20(width=0.25)
    m.train()
    with torch.no_grad(): m(torch.randn(256, 3, 32, 32))
    m.eval()
    x = torch.randn(96, 3, 32, 32)
    for method in ('zipit', 'cca_merge'):
        r = merge([m, m], method, data=(x, torch.zeros(96, dtype=torch.long)), n_samples=96)
        assert_close(_out(m, r.state_dict, x[:8]), _out(m, m.state_dict(), x[:8]), atol=1e-3, rtol=1e-3)
    other = ResNet20(width=0.25).eval()
    r = merge([m, other], 'cca_merge', data=(x, torch.zeros(96, dtype=torch.long)), fix='reset_bn', n_samples=96)
    assert 'batchnorm' in r.report['steps'][0]['info']  # general maps met BatchNorm: reported
    assert [s['step'] for s in r.report['steps']] == ['match', 'average', 'fix']


def test_resnet18_through_merge_with_fixes():
    import torchvision
    torch.manual_seed(0)
    models = [torchvision.models.resnet18(weights=None, num_classes=10).eval() for _ in range(2)]
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,))  # 16x16 inputs: resnet18's last stage sees 1x1
    for method, fix in [('zipit', 'reset_bn'), ('cca_merge', 'repair')]:
        r = merge(models, method, data=(x, y), fix=fix, n_samples=48)
        assert [s['step'] for s in r.report['steps']] == ['match', 'average', 'fix'], (method, fix)
        assert isinstance(r.model, torchvision.models.ResNet)
        with torch.no_grad(): assert torch.isfinite(r.model(x[:4])).all()


def test_folded_batchnorm_takes_a_general_map_exactly():
    "fold_bn on a ResNet20: the same function without BatchNorm; CCA of it with a permuted copy merges back to it."
    torch.manual_seed(0)
    m = ResNet20(width=0.5)
    m.train()
    with torch.no_grad(): m(torch.randn(128, 3, 32, 32))
    m.eval()
    x = torch.randn(256, 3, 32, 32)
    f = fold_bn(m)
    with torch.no_grad(): assert_close(f(x[:8]), m(x[:8]), atol=1e-4, rtol=1e-4)
    spec = spec_for(f, x[:2])
    shuffled = apply(f.state_dict(), spec, random_alignment(spec, 1))
    r = merge([f, shuffled], 'cca_merge', template=f, spec=spec, data=(x, torch.zeros(256, dtype=torch.long)),
              n_samples=256)
    assert not any(t.is_perm for t in r.report['alignments']['model_1'].values())  # general matrices...
    with torch.no_grad(): assert_close(_out(f, r.state_dict, x[:32]), m(x[:32]), atol=1e-3, rtol=1e-3)  # ...and exact


def test_partial_zip_of_a_residual_network_evaluates_and_round_trips(tmp_path):
    "Partial zipping cuts a ResNet20 between residual blocks; the result evaluates, saves and loads."
    torch.manual_seed(0)
    models = [ResNet20(width=0.25).eval() for _ in range(2)]
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    K = len(cut_points(models[0], spec_for(models[0], x[:2])))
    pz = partial_zip(models, 4, (x, y), fix='reset_bn', n_samples=64)
    assert isinstance(pz, PartialZip) and pz.report['depth'] == 4 and K == 10
    with torch.no_grad(): out = pz(x[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert 0 <= evaluate(pz, pz.state_dict(), x, y)['acc'] <= 1
    pz.save(tmp_path/'pz.safetensors')
    back = load_partial_zip(tmp_path/'pz.safetensors', models[0], x=x[:2])
    with torch.no_grad(): assert_close(back(x[:4]), out)
    with pytest.raises(ValueError, match=rf'depth must be an integer in 0..{K}'): partial_zip(models, K + 1, (x, y))


def test_statistics_are_computed_once_for_a_sweep(trained, net, digits, monkeypatch):
    calls = []
    orig = features._accumulate
    monkeypatch.setattr(features, '_accumulate', lambda *a, **k: calls.append(1) or orig(*a, **k))
    features._CACHE.clear()
    data = (digits.x_train[:800], digits.y_train[:800])
    for kw in ({'beta': 0.0}, {'beta': 0.5}, {'alpha': 1.0}):
        merge(trained, 'zipit', template=net, data=data, **kw)
    for g in (0.01, 1.0): merge(trained, 'cca_merge', template=net, data=data, gamma=g)
    assert len(calls) == 1  # one pass over the data for five merges by two methods


def test_bad_input(trained, net, digits):
    data = (digits.x_train[:200], digits.y_train[:200])
    with pytest.raises(IncompatibleModels, match='at least 2 models'):
        merge(trained[:1], 'zipit', template=net, data=data)
    with pytest.raises(ValueError, match='needs data'): zipit(trained, mlp_spec(net))
    with pytest.raises(ValueError, match="model index in 0..2, 'best' or 'random'"):
        merge(trained, 'cca_merge', template=net, data=data, reference=5)
    wider = MLP(64, (64, 48), 10).state_dict()
    with pytest.raises(IncompatibleModels):
        merge([trained[0], wider], 'cca_merge', template=net, data=data)
    with pytest.raises(ValueError, match="needs data, but model 'model_0'"): merge(trained, 'zipit', template=net)
    # a singular covariance (a unit that never fires, no regularisation): reported, and no NaN in the weights
    dead = {k: v.clone() for k, v in trained[0].items()}
    dead['layers.0.weight'][5], dead['layers.0.bias'][5] = 0, -1.
    r = merge([dead, trained[1]], 'cca_merge', template=net, data=data, gamma=0.0)
    assert r.report['steps'][0]['info']['groups']['layers.0']['raised'] > 0
    assert all(torch.isfinite(v).all() for v in r.state_dict.values())


def test_cli_lists_and_fuses_on_a_shipped_pool(tmp_path, monkeypatch, capsys):
    "`modelfusion list methods` names both; each fuses the shipped BatchNorm pool (the command's main, in process)."
    from modelfusion.cli import main
    monkeypatch.setenv('MODELFUSION_CACHE', str(tmp_path/'cache'))
    assert main(['list', 'methods']) == 0
    listed = capsys.readouterr().out
    assert 'zipit' in listed and 'cca_merge' in listed
    for i, args in enumerate([['method=zipit', 'method.beta=0.5', 'method.fix=repair'],
                              ['method=cca_merge', 'method.reference=best', 'method.fix=reset_bn']]):
        out = str(tmp_path/f'run{i}')
        assert main(['fuse', *args, 'modelpool=digits_mlp_bn_seeds', 'taskpool=digits', '--out', out, '--quiet']) == 0
        rep = json.loads((tmp_path/f'run{i}'/'report.json').read_text())
        assert rep['results']['merged']['digits']['acc'] > 0.8, rep['results']
    assert 'batchnorm' in rep['steps'][0]['info']  # general maps met BatchNorm, and the report says so

"""Hardening of the matchers: Sinkhorn re-basin never returns worse than its start, STE recipes are named profiles,
and every matcher takes modules and parameter dicts as well as state dicts."""
import pytest, torch
from modelfusion.core import UnknownName
from modelfusion.models import MLP
from modelfusion.spec import mlp_spec, apply, random_alignment
from modelfusion.training import fit, model_config, TrainConfig
from modelfusion.fusion import MATCHERS
from modelfusion.methods.weight_matching import weight_matching, wm_objective
from modelfusion.methods.activation import activation_stats, activation_matching, ste_matching, STE_PROFILES
from modelfusion.methods.sinkhorn import sinkhorn_matching

@pytest.fixture(scope='module')
def pair(digits):
    "Two MLPs 64-128-128-10 trained on scikit-learn digits from different seeds (a few seconds on the CPU)."
    cfg = model_config('mlp', digits, widths=[128, 128])
    sds = [fit(cfg, digits, TrainConfig(epochs=3, batch_size=64, lr=3e-3), seed=s, device='cpu', verbose=False)[0] for s in (0, 1)]
    m = MLP(64, (128, 128), 10)
    return sds, m, mlp_spec(m), digits.x_train[:1000], digits.y_train[:1000]

def _dist(A, B, spec, al):
    Bp = apply(B, spec, al)
    return sum(float(((A[k] - Bp[k]).double() ** 2).sum()) for k in A if A[k].is_floating_point())

def _midpoint(m, A, B, spec, al, x, y):
    Bp = apply(B, spec, al)
    with torch.no_grad():
        out = torch.func.functional_call(m, {k: (A[k] + Bp[k]) / 2 for k in A}, (x,))
        return float(torch.nn.functional.cross_entropy(out, y))

@pytest.mark.parametrize('init', ['identity', 'weight_matching'])
def test_sinkhorn_distance_never_worse_than_its_start_on_trained_models(pair, init):
    (A, B), m, spec, x, y = pair
    r = sinkhorn_matching([A, B], spec, loss='distance', init=init)
    start = weight_matching([A, B], spec).alignments[1] if init == 'weight_matching' else {}
    d_start, d_out = _dist(A, B, spec, start), _dist(A, B, spec, r.alignments[1])
    assert d_out <= d_start + 1e-6 * d_start, (d_out, d_start)
    assert r.info['start_loss'] == pytest.approx(d_start, rel=1e-5)
    assert d_out == pytest.approx(min(r.info['start_loss'], r.info['result_loss']), rel=1e-5)
    assert r.info['kept'] in ('start', 'result') and r.info['init'] == init and r.info['hard_loss'] == 'distance'
    assert set(r.info['moved']) == set(spec.groups) and r.info['moved_total'] == sum(r.info['moved'].values())
    if r.info['kept'] == 'start':
        for n in spec.groups: assert torch.equal(r.alignments[1][n].merge, start[n].merge if start else torch.arange(128))

def test_sinkhorn_midpoint_never_worse_than_its_start_on_trained_models(pair):
    (A, B), m, spec, x, y = pair
    wm = weight_matching([A, B], spec).alignments[1]
    r = sinkhorn_matching([A, B], spec, template=m, x=x, y=y, init='weight_matching', epochs=3, batch_size=250)
    assert r.info['hard_loss'] == 'midpoint'
    assert r.info['start_loss'] == pytest.approx(_midpoint(m, A, B, spec, wm, x, y), rel=1e-4)
    assert _midpoint(m, A, B, spec, r.alignments[1], x, y) <= r.info['start_loss'] * (1 + 1e-5)

def test_sinkhorn_holdout_judges_on_data_the_descent_did_not_see(pair):
    (A, B), m, spec, x, y = pair
    r = sinkhorn_matching([A, B], spec, template=m, x=x, y=y, init='weight_matching', epochs=2, batch_size=250, holdout=0.25)
    assert r.info['judged_on'] == 250 and r.info['steps'] == 2 * 3  # 750 samples left for the descent
    assert r.info['kept'] == ('result' if r.info['result_loss'] < r.info['start_loss'] else 'start')
    with pytest.raises(ValueError, match='holdout must be in'): sinkhorn_matching([A, B], spec, template=m, x=x, y=y, holdout=1.0)

def test_sinkhorn_rejects_unknown_init():
    m = MLP(8, (4,), 2); sd = m.state_dict()
    with pytest.raises(UnknownName, match='known: identity, weight_matching'):
        sinkhorn_matching([sd, sd], mlp_spec(m), loss='distance', init='wm')

def _small():
    torch.manual_seed(0)
    m = MLP(64, (32, 32), 10); spec = mlp_spec(m); sd = m.state_dict()
    planted = random_alignment(spec, seed=3); x = torch.randn(1000, 64)
    with torch.no_grad(): y = m(x).argmax(1)
    return m, spec, sd, planted, apply(sd, spec, planted), x, y

def test_ste_paper_profile_is_the_reference_recipe():
    m, spec, sd, planted, shuffled, x, y = _small()
    assert STE_PROFILES['paper'] == dict(optimizer='sgd', lr=1e-2, momentum=0.9, weight_decay=0.0, epochs=250, batch_size=1000)
    r = ste_matching([sd, shuffled], spec, template=m, x=x, y=y, profile='paper', epochs=1)
    assert r.info['optimizer'] == {'name': 'SGD', 'lr': 1e-2, 'momentum': 0.9}
    assert r.info['settings'] == {'profile': 'paper', 'optimizer': 'sgd', 'lr': 1e-2, 'momentum': 0.9, 'weight_decay': 0.0,
                                 'epochs': 1, 'batch_size': 1000}
    assert r.info['steps'] == 1  # 1,000 samples in batches of 1,000, for the one epoch asked for
    fast = ste_matching([sd, shuffled], spec, template=m, x=x, y=y)
    assert fast.info['settings']['profile'] == 'fast' and fast.info['optimizer']['name'] == 'Adam'

def test_ste_explicit_parameters_override_the_profile():
    m, spec, sd, planted, shuffled, x, y = _small()
    r = ste_matching([sd, shuffled], spec, template=m, x=x, y=y, profile='paper', epochs=1, optimizer='adam', lr=3e-3, batch_size=250)
    assert r.info['optimizer'] == {'name': 'Adam', 'lr': 3e-3} and r.info['steps'] == 4

def test_ste_unknown_profile_lists_the_known_ones():
    m, spec, sd, planted, shuffled, x, y = _small()
    with pytest.raises(UnknownName, match='known: fast, paper'):
        ste_matching([sd, shuffled], spec, template=m, x=x, y=y, profile='slow')
    with pytest.raises(UnknownName, match='known: adam, sgd'):
        ste_matching([sd, shuffled], spec, template=m, x=x, y=y, optimizer='lbfgs')

def _as(kind, m):
    return m if kind == 'module' else dict(m.named_parameters())

@pytest.mark.parametrize('kind', ['module', 'named_parameters'])
@pytest.mark.parametrize('name', ['weight', 'activation', 'ste', 'sinkhorn'])
def test_matchers_accept_modules_and_parameter_dicts(kind, name):
    m, spec, sd, planted, shuffled, x, y = _small()
    mb = MLP(64, (32, 32), 10); mb.load_state_dict(shuffled)
    kw = {'activation': dict(template=m, x=x), 'ste': dict(template=m, x=x, y=y),
          'sinkhorn': dict(loss='distance', init='weight_matching', steps=5)}.get(name, {})
    r = MATCHERS(name, [_as(kind, m), _as(kind, mb)], spec, **kw)
    for n in spec.groups: assert torch.equal(planted[n].merge[r.alignments[1][n].merge], torch.arange(32))

@pytest.mark.parametrize('kind', ['module', 'named_parameters'])
def test_objective_and_stats_accept_modules_and_parameter_dicts(kind):
    m, spec, sd, planted, shuffled, x, y = _small()
    mb = MLP(64, (32, 32), 10); mb.load_state_dict(shuffled)
    assert wm_objective(_as(kind, m), _as(kind, mb), spec, {}) == pytest.approx(wm_objective(sd, shuffled, spec, {}))
    st, ref = activation_stats(m, [_as(kind, m), _as(kind, mb)], spec, x), activation_stats(m, [sd, shuffled], spec, x)
    for n in spec.groups: torch.testing.assert_close(st[n]['cov'], ref[n]['cov'])

def test_the_paper_matchers_are_registered():
    assert {'weight', 'activation', 'ste', 'sinkhorn'} <= set(MATCHERS)

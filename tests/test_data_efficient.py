"""Data-efficient merging (issue 12): coreset selectors, dataset condensation, STE on a mix of data sets.
Real data: scikit-learn's digits (always there); each test runs in seconds."""
import json
import pytest, torch
import torch.nn.functional as F
from conftest import run, BIN
from modelfusion.data import Data, rotate
from modelfusion.models import build_model
from modelfusion.training import fit, model_config, TrainConfig, loss_acc, load_checkpoint
from modelfusion.fusion import merge, SELECTORS, METHODS
from modelfusion.evaluation import evaluate
import modelfusion.methods.condensation as cond
from modelfusion.methods.coresets import (select, features, herding, kcenter, kcenter_order, class_budget,
                                          facility_location_order, facility_value)

CORESETS = ['random', 'herding', 'kcenter', 'el2n', 'facility_location']


@pytest.fixture(scope='module')
def trained(digits):
    cfg = model_config('mlp', digits, widths=[64])
    sd, _ = fit(cfg, digits, TrainConfig(epochs=5, batch_size=64, lr=3e-3), seed=0, verbose=False)
    m = build_model(cfg)
    m.load_state_dict(sd)
    return cfg, m.eval()


@pytest.fixture(autouse=True)
def scratch_cache(tmp_path, monkeypatch): monkeypatch.setenv('MODELFUSION_CACHE', str(tmp_path/'cache'))


@pytest.mark.parametrize('name', CORESETS)
def test_coresets_are_class_balanced_seeded_and_of_the_asked_size(digits, trained, name):
    _, m = trained
    s = select(digits, name, model=m, ipc=7)
    assert len(s) == 70 and torch.bincount(s.y).tolist() == [7] * 10
    assert len(set(s.indices.tolist())) == 70 and torch.equal(s.x, digits.x_train[s.indices])
    assert torch.equal(select(digits, name, model=m, ipc=7).indices, s.indices)  # seeded: the same coreset again
    f = select(digits, name, model=m, fraction=0.05)
    counts = torch.bincount(digits.y_train)
    assert torch.bincount(f.y).tolist() == [max(1, round(0.05 * int(n))) for n in counts]
    if name in ('random', 'kcenter'):  # the seeded ones change with the seed
        assert not torch.equal(select(digits, name, model=m, ipc=7, seed=1).indices, s.indices)


def test_herding_first_pick_is_nearest_its_class_mean(digits, trained):
    _, m = trained
    x, y = digits.x_train, digits.y_train
    h = herding(x, y, m, m.state_dict(), ipc=3)
    f = features(m, x)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        assert h[3 * c] == idx[(f[idx] - f[idx].mean(0)).norm(dim=1).argmin()]


def test_kcenter_picks_maximise_the_minimum_distance_greedily(digits, trained):
    # brute force on a small case: every pick is the point farthest from the picks before it
    pts = torch.randn(25, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    o = kcenter_order(pts, 6, torch.Generator().manual_seed(0)).tolist()
    for t in range(1, 6):
        mind = lambda i: min(float((pts[i] - pts[j]).norm()) for j in o[:t])
        assert mind(o[t]) == pytest.approx(max(mind(i) for i in range(25) if i not in o[:t]))
    # and through the selector, on a model's features of a real class
    _, m = trained
    x, y = digits.x_train, digits.y_train
    k = kcenter(x, y, m, m.state_dict(), ipc=4, classes=[3])
    f = features(m, x).double()
    for t in range(1, 4):
        d = torch.cdist(f[y == 3], f[k[:t]]).min(1).values
        assert float(torch.cdist(f[k[t:t + 1]], f[k[:t]]).min()) == pytest.approx(float(d.max()))


def test_facility_location_is_greedy_and_beats_random():
    pts = torch.rand(20, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    o = facility_location_order(pts, 4).tolist()
    for t in range(4):
        base = facility_value(pts, torch.tensor(o[:t])) if t else 0.0
        gain = lambda j: facility_value(pts, torch.tensor(o[:t] + [j])) - base
        assert gain(o[t]) == pytest.approx(max(gain(j) for j in range(20) if j not in o[:t]))


def test_bad_input_to_selectors(digits, trained):
    _, m = trained
    with pytest.raises(ValueError, match='ipc=500 but class 0 has only'): select(digits, 'random', ipc=500)
    with pytest.raises(ValueError, match='class 1 has no samples'): class_budget(torch.tensor([0, 0, 2, 2]), ipc=1)
    for name in ('herding', 'kcenter', 'el2n', 'facility_location'):
        with pytest.raises(ValueError, match='needs the model trained on this data'): select(digits, name, ipc=2)
    with pytest.raises(ValueError, match='needs the architecture'): select(digits, 'condensation', ipc=1)
    with pytest.raises(Exception, match='known selectors'): select(digits, 'telepathy')


def _train_fresh(tmpl, x, y, test, seed=0):
    net = cond.fresh_net(tmpl, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(300):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss_acc(net, *test)['acc']


@pytest.mark.parametrize('ipc', [1, 10])
def test_condensation_lowers_its_loss_and_trains_a_fresh_model_above_chance(digits, trained, ipc):
    cfg, _ = trained
    tmpl = build_model(cfg)
    xs, ys, info = cond.condensation(digits.x_train, digits.y_train, tmpl, ipc=ipc, iterations=30, init='noise')
    L = info['losses']
    assert sum(L[-5:]) / 5 < 0.9 * sum(L[:5]) / 5, L  # the gradient-matching loss goes down
    acc = _train_fresh(tmpl, xs, ys, (digits.x_test, digits.y_test))
    assert acc > 0.3, acc  # chance is 0.1
    sd, meta = load_checkpoint(info['path'])  # the cache entry: safetensors with its provenance
    assert torch.equal(sd['x'], xs) and meta['params']['ipc'] == ipc and meta['selector'] == 'condensation'
    assert meta['data']['n'] == len(digits.y_train) and len(meta['losses']) == 30
    again = cond.condensation(digits.x_train, digits.y_train, tmpl, ipc=ipc, iterations=30, init='noise')
    assert again[2]['from_cache'] and torch.equal(again[0], xs)


def test_condensation_interrupted_half_way_resumes_with_no_half_written_entry(digits, trained, monkeypatch):
    cfg, _ = trained
    tmpl = build_model(cfg)
    kw = dict(ipc=1, iterations=6, save_every=1, init='noise', seed=3)
    whole = cond.condensation(digits.x_train, digits.y_train, tmpl, cache=False, **kw)
    orig, calls = cond._iteration, []
    def interrupted(*a, **k):
        if len(calls) == 3: raise KeyboardInterrupt
        calls.append(1)
        return orig(*a, **k)
    monkeypatch.setattr(cond, '_iteration', interrupted)
    with pytest.raises(KeyboardInterrupt): cond.condensation(digits.x_train, digits.y_train, tmpl, **kw)
    entries = list((cond.cache_dir('condensed')).rglob('*.safetensors'))
    assert [p.name.endswith('.state.safetensors') for p in entries] == [True]  # only the running state
    monkeypatch.setattr(cond, '_iteration', orig)
    xs, ys, info = cond.condensation(digits.x_train, digits.y_train, tmpl, **kw)
    assert info['resumed_at'] == 3 and torch.allclose(xs, whole[0])
    assert [p.name.endswith('.state.safetensors') for p in cond.cache_dir('condensed').rglob('*.safetensors')] == [False]


def test_ste_on_the_mix_beats_weight_matching_and_bad_input(digits):
    rot = rotate(digits, 90)
    cfg = model_config('mlp', digits, widths=[32, 32])
    tc = TrainConfig(epochs=8, batch_size=64, lr=3e-3)
    A, B = fit(cfg, digits, tc, seed=0, verbose=False)[0], fit(cfg, rot, tc, seed=1, verbose=False)[0]
    tmpl = build_model(cfg)
    xj, yj = torch.cat([digits.x_test, rot.x_test]), torch.cat([digits.y_test, rot.y_test])
    acc = lambda sd: evaluate(tmpl, sd, xj, yj)['acc']
    wm = acc(merge([A, B], 'weight_matching', template=tmpl).state_dict)
    sgd = dict(optimizer='sgd', lr=0.05, momentum=0.9)
    full = merge([A, B], 'ste_mix', data=[digits, rot], template=tmpl, epochs=10, **sgd)
    small = merge([A, B], 'ste_mix', data=[digits, rot], template=tmpl, selector='random', ipc=5, epochs=40, **sgd)
    assert acc(full.state_dict) > wm + 0.1 and acc(small.state_dict) > wm + 0.1, (wm, acc(full.state_dict))
    assert [s['samples'] for s in small.report['steps'] if s['step'] == 'select'] == [50, 50]
    other = Data('other', torch.zeros(20, 1, 28, 28), torch.arange(20) % 10, torch.zeros(10, 1, 28, 28),
                 torch.arange(10), 10)
    with pytest.raises(ValueError, match='different input shapes'):
        merge([A, B], 'ste_mix', data=[digits, other], template=tmpl)
    with pytest.raises(ValueError, match='needs the model trained on this data'):
        from modelfusion.methods.data_mix import mixed_data
        mixed_data([digits, rot], [A, B], None, ['a', 'b'], 'herding')


def test_cli_lists_the_selectors_and_the_methods():
    out = run([str(BIN/'modelfusion'), 'list', 'selectors']).stdout
    for name in [*CORESETS, 'condensation']: assert name in out
    assert {'ste_mix', 'sinkhorn_mix'} <= set(METHODS) and set(CORESETS) <= set(SELECTORS)

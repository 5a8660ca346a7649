"""OT Fusion (Singh & Jaggi, 2020): the acceptance properties, `merge()` / `modelfusion fuse` / torchvision ResNet18,
models of different widths, shared activation statistics, and bad input."""
import json
import pytest, torch
from torch import nn
from conftest import run, BIN
from modelfusion.core import IncompatibleModels, NotAModel, clone_sd
from modelfusion.spec import apply, random_alignment, mlp_spec
from modelfusion.trace import spec_for
from modelfusion.models import MLP, build_model
from modelfusion.fusion import METHODS, merge
from modelfusion.training import TrainConfig, model_config, train
from modelfusion.evaluation import evaluate
from modelfusion.pipeline import load_config
from modelfusion.cli import main
import modelfusion.methods.features as features
from modelfusion.methods.ot_fusion import ot_fuse, ot_align


def _close(a: dict, b: dict, tol: float=1e-5):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k].float(), b[k].float(), atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize('make', [lambda: MLP(20, (12, 8), 5, bias=False), lambda: MLP(20, (12, 8), 5, norm='bn')],
                         ids=['mlpnet_no_bias', 'mlp_bias_bn'])
@pytest.mark.parametrize('mode', ['wts', 'acts'])
def test_exact_plan_on_a_permuted_copy_returns_the_original(make, mode):
    torch.manual_seed(0)
    m = make().eval()
    if isinstance(m, MLP) and any(isinstance(l, nn.BatchNorm1d) for l in m.layers):
        m.train()(torch.randn(64, 20))
        m.eval()
    sd, spec = clone_sd(m.state_dict()), mlp_spec(m)
    copies = [apply(sd, spec, random_alignment(spec, seed=s)) for s in (1, 2)]
    x = torch.randn(300, 20)
    r = merge([m, *copies], 'ot_fusion', data=(x, torch.zeros(300, dtype=torch.long)), mode=mode, act_samples=300)
    _close(r.state_dict, sd)
    assert all(s['info']['permutations'] == 2 for s in r.report['steps'] if s['step'] == 'match')
    _close(m.state_dict(), sd, 0)  # inputs untouched


def test_mapping_a_model_into_its_own_space_preserves_its_function():
    torch.manual_seed(1)
    m = MLP(20, (12, 8), 5, bias=False).eval()
    spec, x = mlp_spec(m), torch.randn(50, 20)
    for solver in ('emd', 'sinkhorn'):
        al = ot_align([m, m], spec, solver=solver, reg=0.005).alignments[1]
        for g, t in al.items():  # merge then unmerge is the identity
            M, U = t.matrices()
            torch.testing.assert_close(M @ U, torch.eye(t.shape[0]), atol=1e-4, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(torch.func.functional_call(m, apply(m, spec, al), (x,)), m(x), atol=1e-4, rtol=0)


def test_list_and_show_name_ot_fusion(capsys):
    assert 'ot_fusion' in METHODS
    assert main(['list', 'methods']) == 0 and 'ot_fusion' in capsys.readouterr().out
    assert main(['show', 'method', 'ot_fusion']) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in ('mode', 'solver', 'marginals', 'unmerge', 'fix', 'arxiv.org/abs/1910.05653'))


def test_fuse_runs_on_the_shipped_mlpnet_pool(tmp_path):
    cfg = load_config('modelpool', 'mnist_mlpnet_seeds')
    assert cfg['model'] == {'name': 'mlp', 'widths': [400, 200, 100], 'bias': False} and len(cfg['models']) == 2
    # the shipped pool's models and recipe, shrunk onto scikit-learn digits so that the test trains in seconds
    r = run([str(BIN/'modelfusion'), 'fuse', 'method=ot_fusion', 'method.mode=acts', 'modelpool=mnist_mlpnet_seeds',
             'modelpool.data.dataset=digits', 'modelpool.model.in_dim=64', 'modelpool.model.widths=[32,16]',
             'modelpool.train.epochs=3', 'taskpool=digits', '--out', str(tmp_path/'run'), '--quiet'],
            env={**__import__('os').environ, 'MODELFUSION_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path/'run'/'report.json').read_text())
    assert rep['method'] == 'ot_fusion' and [s['step'] for s in rep['steps']] == ['match', 'average']
    assert 0.1 < rep['results']['merged']['digits']['acc'] <= 1


def test_merge_on_torchvision_resnet18():
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    a, b = torchvision.models.resnet18(weights=None).eval(), torchvision.models.resnet18(weights=None).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,))
    spec = spec_for(a, x[:2])
    perm = apply(a.state_dict(), spec, random_alignment(spec, seed=3))
    r = merge([a, perm], 'ot_fusion', spec=spec)  # streams (groups with several writers) included
    _close(r.state_dict, a.state_dict())
    r2 = merge([a, b], 'ot_fusion', data=(x, y), spec=spec, mode='acts', act_samples=8, fix='reset_bn', fix_samples=8)
    assert [s['step'] for s in r2.report['steps']] == ['match', 'average', 'fix']
    assert all(torch.isfinite(v).all() for v in r2.state_dict.values() if v.is_floating_point())
    with torch.no_grad(): assert r2.model(x).shape == (8, 1000)


def test_models_of_different_widths_fuse_into_the_target():
    torch.manual_seed(0)
    small, wide = MLP(20, (12, 8), 5, bias=False), MLP(20, (12, 8), 5, width=2.5, bias=False)
    x = torch.randn(200, 20)
    for mode in ('wts', 'acts'):
        for target, ref in ((0, small), (1, wide)):  # into the smaller or into the wider
            r = ot_fuse([small, wide], x=x, target=target, mode=mode)
            assert {k: v.shape for k, v in r.state_dict.items()} == {k: v.shape for k, v in ref.state_dict().items()}
            assert type(r.model) is MLP and r.report['steps'][0]['onto'] == f'model_{target}'


def test_acts_statistics_are_computed_once_for_n_models_and_shared(monkeypatch):
    torch.manual_seed(0)
    ms = [MLP(20, (12, 8), 5, bias=False).eval() for _ in range(3)]
    x = torch.randn(256, 20)
    calls = []
    real = features._accumulate
    monkeypatch.setattr(features, '_accumulate', lambda *a, **k: calls.append(1) or real(*a, **k))
    data = (x, torch.zeros(256, dtype=torch.long))
    r1 = merge(ms, 'ot_fusion', data=data, mode='acts', act_samples=256)
    r2 = merge(ms, 'ot_fusion', data=data, mode='acts', act_samples=256, solver='sinkhorn', reg=0.05)  # a sweep
    assert len(calls) == 1  # one pass over all N models, then the cache
    mo = features.feature_moments(ms[0], ms, spec_for(ms[0]), x)  # what ZipIt! and CCA read: the same statistics
    assert len(calls) == 1 and set(mo) == {'layers.0', 'layers.2'}
    assert not torch.equal(r1.state_dict['layers.0.weight'], r2.state_dict['layers.0.weight'])


def test_bad_input_is_one_clear_error():
    torch.manual_seed(0)
    m, other = MLP(20, (12, 8), 5, bias=False), MLP(20, (12, 8), 5, bias=False)
    before = clone_sd(m.state_dict())
    with pytest.raises(IncompatibleModels, match='at least 2 models'): merge([m], 'ot_fusion')
    with pytest.raises(IncompatibleModels, match='at least 2 models'): ot_fuse([m])
    with pytest.raises(ValueError, match=r"mode='acts' needs data: pass data= to merge\(\)"):
        merge([m, other], 'ot_fusion', mode='acts')
    with pytest.raises(ValueError, match=r"fix='repair' needs data"): merge([m, other], 'ot_fusion', fix='repair')
    with pytest.raises(IncompatibleModels, match='dim 1 is no feature space OT Fusion can transport'):
        ot_fuse([m, MLP(21, (12, 8), 5, bias=False)])  # other inputs: no width OT can reconcile
    with pytest.raises(IncompatibleModels, match='different tensors'):
        ot_fuse([m, MLP(20, (12,), 5, bias=False)])  # another depth
    with pytest.raises(IncompatibleModels, match='different tensors'):
        ot_fuse([m, MLP(20, (12, 8), 5)])  # biases in one model only
    with pytest.raises(NotAModel, match='pass it as an nn.Module'):
        ot_fuse([m, MLP(20, (24, 16), 5, bias=False).state_dict()], x=torch.randn(10, 20), template=m, mode='acts')
    with pytest.raises(IncompatibleModels, match='Different widths'):  # merge() holds one architecture: ot_fuse
        merge([m, MLP(20, (24, 16), 5, bias=False)], 'ot_fusion')
    _close(m.state_dict(), before, 0)


def test_ot_fusion_beats_naive_averaging_on_trained_digits_models(digits, tmp_path):
    cfg = model_config('mlp', digits, widths=[48, 24], bias=False)
    tc = TrainConfig(epochs=5, batch_size=64, lr=3e-3)
    A, B = (train(cfg, digits, tc, seed=s, cache=str(tmp_path), verbose=False).state_dict for s in (0, 1))
    tmpl = build_model(cfg)
    acc = lambda sd: evaluate(tmpl, sd, digits.x_test, digits.y_test)['acc']
    naive = acc({k: (A[k] + B[k]) / 2 for k in A})
    for mode in ('wts', 'acts'):
        fused = merge([A, B], 'ot_fusion', template=tmpl, data=digits, mode=mode, act_samples=500).state_dict
        assert acc(fused) > naive + 0.05, (mode, acc(fused), naive)

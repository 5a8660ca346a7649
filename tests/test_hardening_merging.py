"""Hardening of merging and task-vector methods: REPAIR and BatchNorm reset on token and (N, C, L) models, the
diagonal Fisher of weight-shared layers, and modules accepted wherever models are."""
import copy
import pytest, torch
from torch import nn
import torch.nn.functional as F
from modelfusion.core import IncompatibleModels
from modelfusion.trace import spec_for
from modelfusion.fusion import align, merge
from modelfusion.methods.repair import repair, reset_bn_stats
from modelfusion.methods.averaging import interpolate, weighted_average, simple_average
from modelfusion.methods.fedmr import recombine
from modelfusion.spec import random_alignment, apply
from modelfusion.methods.taskvec import task_vectors, task_arithmetic, ties_merging, dare, check_base, from_delta
from modelfusion.methods.fisher_regmean import fisher_diag, fisher_merging, regmean_grams, regmean_merging

# ---------------------------------------------------------------- REPAIR: the channel dim is the layer's

def _token_mlp(seed, h=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 4)).eval()

def _stats(model, sd, points, x, dim):
    "Per-feature mean and std (over every dim but `dim`, population) at the outputs of `points`."
    m = copy.deepcopy(model); m.load_state_dict(sd); m.eval(); out = {}
    def hook(p):
        def f(mod, inp, y):
            y = y.movedim(dim, -1).reshape(-1, y.shape[dim]).double()
            out[p] = (y.mean(0), y.std(0, unbiased=False))
        return f
    hs = [m.get_submodule(p).register_forward_hook(hook(p)) for p in points]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    return out

def _repair_errors(model, spec, sa, sb, merged, x, points, dim, **kw):
    fixed = repair(model, spec, [sa, sb], merged, x, **kw)
    A, B, M, R = (_stats(model, s, points, x, dim) for s in (sa, sb, merged, fixed))
    err = {}
    for p in points:
        mt, st = (A[p][0] + B[p][0]) / 2, (A[p][1] + B[p][1]) / 2
        err[p] = dict(mean_before=(M[p][0] - mt).abs().max().item(), mean_after=(R[p][0] - mt).abs().max().item(),
                      std_before=(M[p][1] - st).abs().max().item(), std_after=(R[p][1] - st).abs().max().item(),
                      scale=st.abs().max().item())
    return err, fixed

@pytest.mark.parametrize('tokens,h', [(5, 16), (8, 16), (8, 8)])  # (8, 8) used to run and worsen the statistics
def test_repair_token_model_matches_targets_per_feature(tokens, h):
    a, b = _token_mlp(0, h), _token_mlp(1, h)
    torch.manual_seed(2); x = torch.randn(2000, tokens, 8)
    spec = spec_for(a, x[:4])
    sa, sb = a.state_dict(), b.state_dict(); merged = interpolate([sa, sb])
    err, fixed = _repair_errors(a, spec, sa, sb, merged, x, ['0', '2'], -1)
    for p, e in err.items():  # up to batch-vs-population statistics
        assert e['mean_after'] < 0.02 * e['scale'] + 1e-3, (p, e)
        assert e['std_after'] < 0.02 * e['scale'], (p, e)
    assert err['2']['std_after'] < 0.25 * err['2']['std_before']
    assert set(fixed) == set(sa) and all(fixed[k].shape == sa[k].shape for k in sa)

def test_repair_token_model_with_layernorm_and_conv1d_batchnorm():
    # LayerNorm after Linear on (N, T, C): the last dim; Conv1d + BatchNorm1d on (N, C, L): dim 1
    def tok(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
        with torch.no_grad(): m[1].weight.uniform_(0.5, 2); m[1].bias.normal_()
        return m.eval()
    a, b = tok(0), tok(1); x = torch.randn(1500, 6, 8)
    err, _ = _repair_errors(a, spec_for(a, x[:4]), a.state_dict(), b.state_dict(),
                            interpolate([a.state_dict(), b.state_dict()]), x, ['1', '3'], -1)
    for p, e in err.items(): assert e['mean_after'] < 0.02 * e['scale'] + 1e-3 and e['std_after'] < 0.02 * e['scale'], (p, e)

    def cnn(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 6, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 6, 3))
        m.train(); m(torch.randn(500, 3, 10) * 2 + 1); return m.eval()
    a, b = cnn(0), cnn(1); x = torch.randn(1500, 3, 10) * 2 + 1
    err, _ = _repair_errors(a, spec_for(a, x[:4]), a.state_dict(), b.state_dict(),
                            interpolate([a.state_dict(), b.state_dict()]), x, ['1', '3'], 1)
    for p, e in err.items(): assert e['mean_after'] < 0.02 * e['scale'] + 1e-3 and e['std_after'] < 0.02 * e['scale'], (p, e)

# ---------------------------------------------------------------- BatchNorm reset: BatchNorm normalises dim 1

class _T(nn.Module):
    def forward(self, x): return x.transpose(1, 2)

def test_reset_bn_stats_ncl_and_token_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 8, 2))
    x = torch.randn(600, 3, 10) * 3 + 1
    new = reset_bn_stats(m, m.state_dict(), x, batch_size=600)
    h = m[0](x).detach().transpose(0, 1).reshape(5, -1)  # (C, N·L)
    torch.testing.assert_close(new['1.running_mean'], h.mean(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new['1.running_var'], h.var(1), rtol=1e-3, atol=1e-4)  # BatchNorm's unbiased batch variance
    # tokens (N, T, C): a Linear over features, then BatchNorm1d over the features (transposed to (N, C, T))
    tok = nn.Sequential(nn.Linear(8, 6), _T(), nn.BatchNorm1d(6), _T(), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(400, 5, 8) * 2 - 1
    new = reset_bn_stats(tok, tok.state_dict(), x, batch_size=400)
    h = tok[0](x).detach().reshape(-1, 6)  # (N·T, C)
    torch.testing.assert_close(new['2.running_mean'], h.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new['2.running_var'], h.var(0), rtol=1e-3, atol=1e-4)
    assert torch.equal(tok.state_dict()['2.running_mean'], torch.zeros(6))  # the template is untouched

# ---------------------------------------------------------------- Fisher of a weight-shared layer

def _brute_fisher(model, x):
    "Expected diagonal Fisher by autograd, one sample and one class at a time: mean_n Σ_c p_c (∇ log p_c)²."
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xn in x:
        pr = F.softmax(model(xn[None]), -1)[0].detach()
        for c in range(len(pr)):
            model.zero_grad(); F.log_softmax(model(xn[None]), -1)[0, c].backward()
            for n, p in model.named_parameters(): ref[n] += pr[c] * p.grad ** 2 / len(x)
    return ref

class Shared(nn.Module):
    "One square Linear layer applied twice per sample (weight sharing), then a head."
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(6, 6); self.head = nn.Linear(6, 3)
    def forward(self, x): return self.head(torch.relu(self.lin(torch.relu(self.lin(x)))))

def _rel_err(f, ref): return max(((f[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)

@pytest.fixture
def vmap_calls(monkeypatch):
    "Which parameters go through the per-sample (vmap) path of `fisher_diag`."
    import torch.func
    seen, real = [], torch.func.vmap
    def spy(fn, *a, **kw):
        v = real(fn, *a, **kw)
        def g(params, *args): seen.append(sorted(params)); return v(params, *args)
        return g
    monkeypatch.setattr(torch.func, 'vmap', spy)
    return seen

def test_fisher_diag_weight_shared_layer_is_exact(vmap_calls):
    torch.manual_seed(0); m = Shared(); x = torch.randn(12, 6)
    f, ref = fisher_diag(m, m.state_dict(), x, batch_size=5), _brute_fisher(m, x)
    for n in ref: torch.testing.assert_close(f[n], ref[n], rtol=1e-4, atol=1e-7)
    assert any('lin.weight' in s for s in vmap_calls)  # the shared layer takes the per-sample path
    assert not any('head.weight' in s for s in vmap_calls)  # the head keeps the outer-product shortcut

def test_fisher_diag_plain_mlp_stays_exact_on_the_fast_path(vmap_calls):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 4)); x = torch.randn(15, 5)
    f, ref = fisher_diag(m, m.state_dict(), x, batch_size=6), _brute_fisher(m, x)
    for n in ref: torch.testing.assert_close(f[n], ref[n], rtol=1e-4, atol=1e-7)
    assert vmap_calls == []  # every layer by the outer-product shortcut

def test_fisher_diag_tied_weights_are_exact():
    # two modules holding one Parameter: each module is called once, but the weight is used twice
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    m[2].weight = m[0].weight
    x = torch.randn(10, 4)
    f, ref = fisher_diag(m, m.state_dict(), x, batch_size=4), _brute_fisher(m, x)
    for n in ref: torch.testing.assert_close(f[n], ref[n], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f['2.weight'], f['0.weight'])  # under each of its names, so Fisher merging weights both

class Reused(nn.Module):
    "A layer called once, whose weight is also used functionally elsewhere in the forward."
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(5, 5); self.head = nn.Linear(5, 3)
    def forward(self, x): return self.head(torch.tanh(F.linear(torch.tanh(self.lin(x)), self.lin.weight)))

def test_fisher_diag_weight_used_outside_its_module_is_exact(vmap_calls):
    torch.manual_seed(3); m = Reused(); x = torch.randn(10, 5)
    f, ref = fisher_diag(m, m.state_dict(), x, batch_size=4), _brute_fisher(m, x)
    for n in ref: torch.testing.assert_close(f[n], ref[n], rtol=1e-4, atol=1e-7)
    assert any('lin.weight' in s for s in vmap_calls)

# ---------------------------------------------------------------- modules everywhere

def _mlp(seed, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).eval()

def _eq(a, b):
    assert set(a) == set(b)
    for k in a: torch.testing.assert_close(a[k], b[k])

def test_merges_accept_modules_and_parameter_dicts():
    a, b = _mlp(0), _mlp(1); sa, sb = a.state_dict(), b.state_dict()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    _eq(weighted_average([a, pb], [1, 3]), weighted_average([sa, sb], [1, 3]))
    out = interpolate([pa, b], 0.3); _eq(out, interpolate([sa, sb], 0.3))
    assert not any(v.requires_grad for v in out.values())
    spec = spec_for(a, torch.randn(2, 4)); al = random_alignment(spec, seed=0)
    _eq(align([a], spec, [al])[0], apply(sa, spec, al))
    m1 = merge([a, pb], 'weight_matching', template=a, spec=spec).state_dict
    m2 = merge([sa, sb], 'weight_matching', template=a, spec=spec).state_dict
    _eq(m1, m2)
    n1, s1 = recombine([a, pb], seed=0); n2, s2 = recombine([sa, sb], seed=0)
    assert s1 == s2; _eq(n1[0], n2[0])
    x = torch.randn(300, 4)
    _eq(repair(a, spec, [a, pb], interpolate([a, b]), x), repair(a, spec, [sa, sb], interpolate([sa, sb]), x))
    bn = _mlp(2, bn=True)
    _eq(reset_bn_stats(bn, bn, x), reset_bn_stats(bn, bn.state_dict(), x))
    with pytest.raises(TypeError, match='must be an nn.Module or a state dict'): interpolate([a, 3])

def test_task_vector_methods_accept_modules_and_parameter_dicts():
    base = _mlp(0); sbase = base.state_dict()
    fts = [copy.deepcopy(base) for _ in range(3)]
    for i, m in enumerate(fts):
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters(): p.add_(0.1 * torch.randn_like(p))
    sds = [m.state_dict() for m in fts]; mixed = [fts[0], dict(fts[1].named_parameters()), sds[2]]
    _eq(simple_average(mixed), simple_average(sds))
    _eq(task_arithmetic(mixed, base, lam=0.4), task_arithmetic(sds, sbase, lam=0.4))
    _eq(ties_merging(mixed, dict(base.named_parameters()), k=0.5), ties_merging(sds, sbase, k=0.5))
    _eq(dare(mixed, base, p=0.3, seed=1), dare(sds, sbase, p=0.3, seed=1))
    tv = task_vectors(mixed, base); _eq(tv[1], task_vectors(sds, sbase)[1])
    _eq(from_delta(base, tv[0], mixed), from_delta(sbase, tv[0], sds))
    check_base(mixed, base)
    with pytest.raises(ValueError, match='needs a base model'): check_base(mixed, None)
    x = torch.randn(20, 4)
    fis = [fisher_diag(base, m, x) for m in mixed]
    for f, sd in zip(fis, sds): _eq(f, fisher_diag(base, sd, x))
    _eq(fisher_merging(mixed, fis), fisher_merging(sds, fis))
    grams = [regmean_grams(base, m, x) for m in mixed]
    for g, sd in zip(grams, sds): _eq(g, regmean_grams(base, sd, x))
    _eq(regmean_merging(mixed, grams), regmean_merging(sds, grams))
    assert all(not v.requires_grad for v in task_arithmetic(mixed, base).values())

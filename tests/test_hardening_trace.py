"""Hardening of trace_spec: no feature space is dropped silently, torch.fx failures give clean errors, state dicts are
told apart from modules."""
import inspect, warnings, pytest, torch
from torch import nn
import torch.nn.functional as F
import torchvision
from modelfusion.core import NotAModel
from modelfusion.models import MLP, ResNet20
from modelfusion.spec import Spec, SpecError, SpecWarning, apply, mlp_spec, random_alignment, verify_spec
from modelfusion.trace import trace_spec, spec_for

class AttnBlock(nn.Module):
    "A tiny transformer: embedding -> attention + residual -> MLP + residual -> head."
    def __init__(self, mlp=True):
        super().__init__(); self.mlp = mlp
        self.emb = nn.Embedding(50, 16); self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ln = nn.LayerNorm(16); self.fc1 = nn.Linear(16, 32); self.fc2 = nn.Linear(32, 16); self.head = nn.Linear(16, 50)
    def forward(self, t):
        h = self.emb(t)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.mlp: h = h + self.fc2(torch.relu(self.fc1(self.ln(h))))
        return self.head(h)

def tokens(): return torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))

def test_attention_stream_is_reported_fixed_and_the_safe_groups_are_kept():
    torch.manual_seed(0); m = AttnBlock().eval()
    with pytest.warns(SpecWarning, match=r"'emb'.*MultiheadAttention"): spec = trace_spec(m, tokens())
    assert list(spec.groups) == ['fc1']  # the MLP's hidden units are safe to permute
    assert 'attn' in spec.fixed['emb'] and 'MultiheadAttention' in spec.fixed['emb']
    assert 'output' in spec.fixed['head']
    r = repr(spec)
    assert 'fc1[32]' in r and 'emb' in r and 'MultiheadAttention' in r and 'head' in r
    verify_spec(m, spec, tokens())

def test_a_model_with_nothing_transformable_left_names_the_blocking_module():
    with pytest.raises(SpecError, match=r"node 'attn' \(module 'attn': MultiheadAttention\).*'emb'.*spec=Spec"):
        trace_spec(AttnBlock(mlp=False), tokens())

class ConstBias(nn.Module):
    "A per-feature constant (a buffer outside the state dict) pins the hidden layer: legitimately fixed, no warning."
    def __init__(self):
        super().__init__(); self.a = nn.Linear(4, 8); self.b = nn.Linear(8, 6); self.c = nn.Linear(6, 2)
        self.register_buffer('shift', torch.randn(8), persistent=False)
    def forward(self, x): return self.c(F.relu(self.b(F.relu(self.a(x) + self.shift))))

def test_legitimately_fixed_spaces_are_recorded_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        spec = trace_spec(ConstBias())
    assert list(spec.groups) == ['b']
    assert "'shift'" in spec.fixed['a'] and 'output' in spec.fixed['c']

@pytest.mark.parametrize('ctor,shape,out', [
    (lambda: ResNet20(width=1, norm='bn'), (2, 3, 32, 32), 'fc'),
    (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 64, 64), 'fc')])
def test_every_written_space_is_a_group_or_fixed(ctor, shape, out):
    torch.manual_seed(0); m = ctor().eval()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        spec = trace_spec(m, torch.randn(shape))
    assert list(spec.fixed) == [out] and 'output' in spec.fixed[out]
    layers = {n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    written = {a.param.rsplit('.', 1)[0] for g in spec.groups.values() for a in g.axes if a.role == 'out'}
    assert layers <= written | set(spec.fixed)

def test_verify_spec_warns_when_there_is_nothing_to_verify():
    m = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.warns(SpecWarning, match='no groups'): verify_spec(m, Spec({}), torch.randn(2, 4))

def test_hand_written_specs_need_no_fixed():
    s = mlp_spec(MLP(8, (4,), 2))
    assert Spec(s.groups).fixed == {} and 'fixed' not in repr(Spec(s.groups))

class WrongWidth(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Linear(4, 8); self.b = nn.Linear(6, 2)
    def forward(self, x): return self.b(self.a(x))

def test_a_failing_example_run_prints_nothing_but_our_error(capfd):
    with pytest.raises(SpecError, match=r'running WrongWidth .* failed'): trace_spec(WrongWidth())
    out, err = capfd.readouterr()
    assert out == '' and err == ''

class Branchy(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Linear(4, 8); self.b = nn.Linear(8, 2)
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0: h = F.relu(h)
        return self.b(h)

class Outer(nn.Module):
    def __init__(self): super().__init__(); self.inner = Branchy()
    def forward(self, x): return self.inner(x) * 2

def _line(cls, text):
    src, start = inspect.getsourcelines(cls)
    return start + next(i for i, l in enumerate(src) if text in l)

def test_control_flow_error_names_the_file_and_line(capfd):
    where = rf"control flow in Branchy\.forward at {__file__}:{_line(Branchy, 'if h.sum')}: `if h\.sum\(\) > 0: h = F\.relu\(h\)`"
    with pytest.raises(SpecError, match=where): trace_spec(Branchy())
    with pytest.raises(SpecError, match=where): trace_spec(Outer())  # inside a submodule: the submodule's forward
    assert capfd.readouterr() == ('', '')

def test_spec_for_and_trace_spec_need_a_module():
    sd = MLP(8, (4,), 2).state_dict()
    for f in (spec_for, trace_spec):
        with pytest.raises(NotAModel, match=rf"{f.__name__} needs the model as an nn.Module \(to trace its forward pass\); "
                                             "a state dict only has the weights"): f(sd)
    with pytest.raises(NotAModel, match=r"verify_spec needs the model as an nn.Module"):
        verify_spec(sd, mlp_spec(MLP(8, (4,), 2)), torch.randn(2, 8))

def test_apply_and_check_accept_a_module():
    torch.manual_seed(0); m = MLP(8, (6, 5), 2); spec = mlp_spec(m); al = random_alignment(spec, seed=1)
    a, b = apply(m, spec, al), apply(m.state_dict(), spec, al)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spec.check(m)
    with pytest.raises(SpecError, match='size 7x1'): mlp_spec(MLP(8, (7, 5), 2)).check(m)
    with pytest.raises(NotAModel): apply([1, 2], spec, al)

def test_apply_keeps_gradients_of_a_state_dict():
    m = MLP(8, (6,), 2); spec = mlp_spec(m)
    sd = {k: v.clone().requires_grad_(True) for k, v in m.state_dict().items()}
    out = apply(sd, spec, random_alignment(spec))
    out['layers.0.weight'].sum().backward()
    assert sd['layers.0.weight'].grad is not None

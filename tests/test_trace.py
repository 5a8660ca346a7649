"""Issue 3 acceptance: derived specs verify on many architectures, and weight matching recovers planted permutations."""
import time, pytest, torch
from torch import nn
import torch.nn.functional as F
import torchvision
from modelfusion.models import MLP, VGG, ResNet20
from modelfusion.spec import SpecError, verify_spec, apply, random_alignment
from modelfusion.trace import trace_spec, spec_for
from modelfusion.methods.weight_matching import weight_matching
from modelfusion.methods.activation import activation_matching, activation_stats

class CatNet(nn.Module):
    "Two conv branches concatenated along channels, then a BN and a conv that read the concatenation."
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1); self.b = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 5)
    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.relu(self.c(F.relu(self.bn(y))))
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(y.view(y.size(0), -1))

class CatInputNet(nn.Module):
    "Concatenates a feature map with the (fixed) input: the consumer's 'in' axis covers only part of its dim."
    def __init__(self, first=True):
        super().__init__(); self.first = first
        self.a = nn.Conv2d(3, 8, 3, padding=1); self.c = nn.Conv2d(11, 4, 1)
    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(torch.cat([h, x] if self.first else [x, h], 1)).mean((2, 3))

class Gated(nn.Module):
    "Exercises more rules: x.relu(), torch.relu_, scalar ops, iadd, mean((2,3)), per-channel parameter, squeeze/unsqueeze, transpose round trip."
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1); self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16); self.fc2 = nn.Linear(16, 3)
    def forward(self, x):
        h = self.c1(x).relu()
        h2 = torch.relu_(self.c2(h)) * 0.5 + 1.0
        h2 += h  # residual: c1 and c2 become one space
        h2 = h2 * self.scale
        g = h2.mean((2, 3), keepdim=True).sigmoid()  # squeeze-excite style gate: same space
        h2 = h2 * g
        t = h2.flatten(2).transpose(1, 2)  # (N, HW, C): a ViT-style token layout
        t = self.ln(t).mean(1)
        return self.fc2(F.gelu(self.fc1(t)))


def warm_bn(model, x, steps=3):
    "Train-mode passes on random data so BatchNorm running statistics are not trivial."
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train(); g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _ in range(steps): model(torch.randn(x.shape, generator=g) * 2 + 0.5)
    return model.eval()

C32 = (4, 3, 32, 32)
ARCHS = {  # name: (constructor, input shape, planted-permutation recovery)
    **{f'mlp-{n}': (lambda n=n: MLP(784, (64, 48, 32), 10, norm=n), (4, 1, 28, 28), True) for n in ('none', 'bn', 'ln')},
    **{f'vgg11-{n}': (lambda n=n: VGG('vgg11', width=0.25, norm=None if n == 'none' else n), C32, True) for n in ('none', 'bn', 'ln')},
    **{f'vgg16-{n}': (lambda n=n: VGG('vgg16', width=0.25, norm=None if n == 'none' else n), C32, True) for n in ('none', 'bn', 'ln')},
    **{f'resnet20-x{w}-{n}': (lambda w=w, n=n: ResNet20(width=w, norm=None if n == 'none' else n), C32, True) for w in (1, 2) for n in ('none', 'bn', 'ln')},
    'resnet20-x16-ln': (lambda: ResNet20(width=16, norm='ln'), (2, 3, 32, 32), False),
    'torchvision-resnet18': (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 64, 64), True),
    'torchvision-resnet50': (lambda: torchvision.models.resnet50(weights=None, num_classes=10), (2, 3, 64, 64), True),
    'torchvision-vgg11_bn': (lambda: torchvision.models.vgg11_bn(weights=None, num_classes=10), (2, 3, 64, 64), True),
    'concat': (CatNet, (4, 3, 16, 16), True),
    'concat-with-input': (CatInputNet, (4, 3, 16, 16), True),
    'gated-tokens': (Gated, (4, 3, 8, 8), True),
}

@pytest.mark.parametrize('name', list(ARCHS))
def test_derived_spec_verifies_and_planted_permutation_is_recovered(name):
    ctor, shape, recover = ARCHS[name]
    torch.manual_seed(0); model = ctor(); x = torch.randn(shape)
    warm_bn(model, x)
    spec = trace_spec(model, x)
    assert len(spec.groups) > 0
    verify_spec(model, spec, x)
    if not recover: return
    sd = model.state_dict(); planted = random_alignment(spec, seed=1)
    res = weight_matching([sd, apply(sd, spec, planted)], spec)
    for g, grp in spec.groups.items():
        assert torch.equal(planted[g].merge[res.alignments[1][g].merge], torch.arange(grp.size)), g

def test_resnet_groups_are_residual_streams():
    spec = trace_spec(torchvision.models.resnet18(weights=None), torch.randn(2, 3, 64, 64))
    assert len(spec.groups) == 12  # 4 residual streams + 8 inner block layers
    stream = spec.groups['conv1']
    assert {'bn1.weight', 'layer1.0.conv1.weight', 'layer1.1.bn2.running_var', 'layer2.0.downsample.0.weight'} <= {a.param for a in stream.axes}

def test_vgg11_bn_flatten_block():
    spec = trace_spec(torchvision.models.vgg11_bn(weights=None), torch.randn(2, 3, 64, 64))
    last = [g for g in spec.groups.values() if any(a.param == 'classifier.0.weight' and a.role == 'in' for a in g.axes)][0]
    assert [a.block for a in last.axes if a.param == 'classifier.0.weight'] == [49]

def test_a_broken_spec_is_caught():
    from modelfusion.spec import Spec, Group
    m = warm_bn(ResNet20(width=1, norm='bn'), torch.randn(C32)); x = torch.randn(C32)
    spec = trace_spec(m, x)
    g = spec.groups['layer2.0.conv1']
    broken = Spec({**spec.groups, g.name: Group(g.name, g.size, tuple(a for a in g.axes if 'bn1.running_var' not in a.param))})
    with pytest.raises(SpecError, match="permuting group 'layer2.0.conv1'"): verify_spec(m, broken, x)

class Branchy(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Linear(4, 8); self.b = nn.Linear(8, 2)
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0: h = F.relu(h)
        return self.b(h)

class MatmulNet(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Linear(4, 8); self.w = nn.Parameter(torch.randn(8, 8)); self.b = nn.Linear(8, 2)
    def forward(self, x): return self.b(F.relu(self.a(x)) @ self.w)

class GNNet(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Conv2d(3, 8, 3, padding=1); self.gn = nn.GroupNorm(2, 8); self.b = nn.Conv2d(8, 4, 1)
    def forward(self, x): return self.b(self.gn(self.a(x))).mean((2, 3))

def test_untraceable_and_channel_mixing_models_get_clear_errors():
    with pytest.raises(SpecError, match=r"cannot trace Branchy.*pass spec=Spec"): trace_spec(Branchy())
    with pytest.raises(SpecError, match=r"node 'matmul'.*pass spec=Spec"): trace_spec(MatmulNet())
    with pytest.raises(SpecError, match=r"node 'gn'"): trace_spec(GNNet(), torch.randn(2, 3, 8, 8))

def test_activation_matching_recovers_planted_permutation_on_a_conv_net():
    m = warm_bn(ResNet20(width=1, norm='bn'), torch.randn(C32)); x = torch.randn(256, 3, 32, 32)
    spec = spec_for(m, x[:2]); sd = m.state_dict(); planted = random_alignment(spec, seed=3)
    shuffled = apply(sd, spec, planted)
    res = activation_matching([sd, shuffled], spec, template=m, x=x)
    stats = activation_stats(m, [sd, shuffled], spec, x)
    for g, grp in spec.groups.items():  # every live unit is recovered; dead ReLU units (zero variance) are interchangeable
        live = stats[g]['std_a'] > 1e-6
        assert live.float().mean() > 0.8
        assert torch.equal(planted[g].merge[res.alignments[1][g].merge][live], torch.arange(grp.size)[live]), g

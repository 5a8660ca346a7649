"""The house for many methods: a method is one module that registers itself; method modules import nothing above the
contracts; no test pins the registries' complete contents; `merge()` runs any method on N models."""
import ast, json, os, re, sys, textwrap
from pathlib import Path
import pytest, torch
from torch import nn
from conftest import run, BIN, ROOT
import modelfusion.fusion as fusion
from modelfusion.fusion import MATCHERS, METHODS, FIXES, SELECTORS, merge, method_schema

METHOD_MODULES = sorted(p for p in (ROOT/'modelfusion'/'methods').glob('*.py') if p.name != '__init__.py')
# what a method module may import: the layers below the contracts, the contracts, its sibling method modules
ALLOWED = {'core', 'data', 'models', 'training', 'spec', 'trace', 'fusion', 'methods'}


def _imports(path: Path) -> set[str]:
    "The modelfusion modules a file imports (first component after the package), relative imports resolved."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: out.add('methods')  # from .sibling import ...
            elif node.level == 2: out.add(mod.split('.')[0])  # from ..core import ...
            elif mod.startswith('modelfusion.'): out.add(mod.split('.')[1])
            elif mod == 'modelfusion': out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split('.')[1] for a in node.names if a.name.startswith('modelfusion.'))
    return out


def test_there_are_method_modules():
    assert len(METHOD_MODULES) >= 8, METHOD_MODULES
    mods = {e.fn.__module__ for r in (MATCHERS, METHODS, FIXES, SELECTORS) for e in r.ready().entries.values()}
    assert len({m for m in mods if m.startswith('modelfusion.methods.')}) >= 8  # most modules register methods


@pytest.mark.parametrize('path', METHOD_MODULES, ids=lambda p: p.stem)
def test_method_modules_import_nothing_above_the_contracts(path):
    bad = _imports(path) - ALLOWED
    assert not bad, f"{path.name} imports {bad}: a method module may only import {sorted(ALLOWED)}"


@pytest.mark.parametrize('path', METHOD_MODULES, ids=lambda p: p.stem)
def test_every_method_module_registers_what_it_defines(path):
    mod = f'modelfusion.methods.{path.stem}'
    registered = {e.fn.__qualname__ for r in (MATCHERS, METHODS, FIXES, SELECTORS) for e in r.ready().entries.values() if e.fn.__module__ == mod}
    # every function it decorates with a registry's `register` is in that registry (a support module such as
    # `features`, shared by several methods, registers nothing and decorates nothing)
    tree = ast.parse(path.read_text())
    decorated = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 and any('register' in ast.unparse(d) for d in f.decorator_list)}
    assert decorated <= registered, decorated - registered
    assert registered or not decorated


def test_every_registered_function_lives_in_a_method_module_or_the_contracts():
    for r in (MATCHERS, METHODS, FIXES, SELECTORS):
        for e in r.ready().entries.values():
            assert e.fn.__module__.startswith('modelfusion.methods.') or e.fn.__module__ == 'modelfusion_plugin_toy', (r.kind, e.name, e.fn.__module__)


def test_every_matcher_is_a_method_and_every_method_documents_its_parameters():
    for m in MATCHERS: assert MATCHERS.method_of[m] in METHODS
    for name in METHODS:
        undocumented = [k for k, p in method_schema(name).items() if not p.doc]
        assert not undocumented, f"method {name}: parameters without a docments comment: {undocumented}"


def test_no_test_pins_the_complete_list_of_registered_names():
    pinned = re.compile(r"(test_eq|assert)\s*\(?\s*(sorted|list)\((MATCHERS|METHODS|FIXES|SELECTORS)\)\s*(,|==)")
    for p in [*ROOT.glob('tests/*.py'), *ROOT.glob('nbs/**/*.ipynb')]:
        assert not pinned.search(p.read_text()), f"{p} compares a whole registry with a fixed list: check that names are present instead"


# --- acceptance: a new method is one module, and nothing else changes -------------------------------------------

PLUGIN = textwrap.dedent('''
    """A toy method, as a user would write it: one module, registered next to its definition."""
    from modelfusion.core import StateDict, sd_combine
    from modelfusion.fusion import METHODS

    @METHODS.register('first_heavy_average', paper='https://example.org/toy')
    def first_heavy_average(sds: list[StateDict], # the models
                            w0: float=0.75, # the first model's weight; the others share the rest
                           ) -> StateDict:
        "An average that trusts the first model most."
        rest = (1 - w0) / (len(sds) - 1)
        return sd_combine(sds, [w0] + [rest] * (len(sds) - 1))
''')


def test_a_new_method_is_one_module(tmp_path, monkeypatch):
    plugin = tmp_path/'toy.py'; plugin.write_text(PLUGIN)
    env = {**os.environ, fusion.PLUGINS_ENV: str(plugin), 'MODELFUSION_CACHE': str(tmp_path/'cache')}
    out = run([str(BIN/'modelfusion'), 'list', 'methods'], env=env)
    assert out.returncode == 0 and 'first_heavy_average' in out.stdout and 'trusts the first model' in out.stdout, out.stderr
    out = run([str(BIN/'modelfusion'), 'show', 'method', 'first_heavy_average'], env=env)
    assert "the first model's weight; the others share the rest" in out.stdout and 'default 0.75' in out.stdout, out.stdout
    out = run([str(BIN/'modelfusion'), 'fuse', 'method=first_heavy_average', 'method.w0=0.5', 'modelpool=digits_mlp_seeds',
               'taskpool=digits', '--out', str(tmp_path/'run'), '--quiet'], env=env)
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path/'run'/'report.json').read_text())
    assert rep['method'] == 'first_heavy_average' and rep['config']['method'] == {'name': 'first_heavy_average', 'w0': 0.5}
    # and in this process, through merge(), once the plugin is loaded
    fusion.load_plugin(str(plugin))
    ms = [nn.Linear(3, 2) for _ in range(3)]
    r = merge(ms, 'first_heavy_average', w0=0.5)
    torch.testing.assert_close(r.model.weight, (0.5 * ms[0].weight + 0.25 * ms[1].weight + 0.25 * ms[2].weight).detach())


def test_merge_three_resnet18_with_bn_reset():
    import torchvision
    torch.manual_seed(0)
    models = [torchvision.models.resnet18(weights=None, num_classes=10).eval() for _ in range(3)]
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    r = merge(models, 'weight_matching', data=(x, y), fix='reset_bn', n_samples=48)
    assert [s['step'] for s in r.report['steps']] == ['match', 'match', 'average', 'fix']
    assert isinstance(r.model, torchvision.models.ResNet)
    with torch.no_grad(): assert torch.isfinite(r.model(x[:4])).all()
    # state dicts with a template give the same merge
    r2 = merge([m.state_dict() for m in models], 'weight_matching', template=models[0], data=(x, y), fix='reset_bn', n_samples=48)
    for k, v in r.state_dict.items(): torch.testing.assert_close(v, r2.state_dict[k])

"""The fusion pipeline: recombination, the task-vector family's identities, `modelfusion fuse` over the shipped configs, bad input."""
import json, sys
import pytest, torch
from conftest import run, BIN
from modelfusion.core import clone_sd, IncompatibleModels, UnknownName
from modelfusion.models import MLP, ResNet20
from modelfusion.fusion import METHODS, Pool, merge
from modelfusion.methods.fedmr import recombine, layers_of
from modelfusion.methods.taskvec import task_arithmetic, ties_merging, dare
from modelfusion.methods.averaging import simple_average
from modelfusion.pipeline import (load_modelpool, ConfigError, compose, fuse, list_configs, load_config,
                                  method_params)
from modelfusion.cli import main

TASK_METHODS = ['simple_average', 'weighted_average', 'task_arithmetic', 'ties_merging', 'dare_task_arithmetic',
                'dare_ties', 'fisher_merging', 'regmean']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def tasks_pool(cache):
    return load_modelpool(load_config('modelpool', 'digits_mlp_tasks'), device='cpu', cache=cache, verbose=False)


# --- FedMR recombination -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 7])
def test_recombination_is_an_exact_per_layer_permutation(seed):
    torch.manual_seed(seed)
    sds = []
    for i in range(5):
        m = ResNet20(width=0.25, norm='bn')
        for b in m.modules():  # distinct running statistics, so a buffer taken from the wrong source would show
            if isinstance(b, torch.nn.BatchNorm2d): b.running_mean.normal_(); b.running_var.uniform_(0.5, 1.5)
        sds.append(m.state_dict())
    before = [clone_sd(sd) for sd in sds]
    new, sources = recombine(sds, seed=seed)
    layers = layers_of(sds[0])
    assert set(sources) == set(layers) and len(new) == 5
    for layer, perm in sources.items():
        assert sorted(perm) == list(range(5)), (layer, perm)  # a permutation: no source duplicated, none lost
        for j, src in enumerate(perm):
            for k in layers[layer]:  # weight, bias and buffers of a layer come from one source
                assert torch.equal(new[j][k], sds[src][k]), k
    # every key of every new model is an exact copy of one source's tensor, no key duplicated across the new pool
    for k in sds[0]:
        got = sorted(next(i for i in range(5) if torch.equal(new[j][k], sds[i][k]) and sources[k.rsplit('.', 1)[0]][j] == i) for j in range(5))
        assert got == list(range(5))
    for a, b in zip(sds, before):  # inputs unchanged
        assert all(torch.equal(a[k], b[k]) for k in a)
    new[0][next(iter(new[0]))].add_(1.0)  # outputs do not share storage with the inputs
    assert all(torch.equal(a[k], b[k]) for a, b in zip(sds, before) for k in a)


def test_recombination_bad_input():
    a = MLP(4, (3,), 2).state_dict()
    with pytest.raises(ValueError, match='at least 2'): recombine([a])
    with pytest.raises(IncompatibleModels): recombine([a, MLP(4, (5,), 2).state_dict()])


# --- task-vector identities on real fine-tuned models ---------------------------------------------------------------

def test_task_arithmetic_with_lambda_one_over_n_is_simple_averaging(tasks_pool):
    sds, base = tasks_pool.sds, tasks_pool.base
    ta, avg = task_arithmetic(sds, base, lam=1 / len(sds)), simple_average(sds)
    for k in avg: torch.testing.assert_close(ta[k], avg[k], rtol=1e-5, atol=1e-6)


def test_ties_full_density_without_conflicts_is_task_arithmetic(tasks_pool):
    base = tasks_pool.base
    tv = {k: tasks_pool.sds[0][k] - base[k] for k in base}
    # two models whose task vectors agree in sign everywhere: τ and 0.5·τ (+ a same-signed perturbation)
    sds = [{k: base[k] + tv[k] for k in base}, {k: base[k] + 0.5 * tv[k] + 0.1 * tv[k].abs() * tv[k].sign() for k in base}]
    for lam in (0.3, 1.0):
        a, b = ties_merging(sds, base, k=1.0, lam=lam, merge_func='sum'), task_arithmetic(sds, base, lam=lam)
        for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_dare_with_p_zero_is_its_base_method(tasks_pool):
    sds, base = tasks_pool.sds, tasks_pool.base
    for merge, kw, ref in (('task_arithmetic', {'lam': 0.4}, task_arithmetic(sds, base, lam=0.4)),
                           ('ties_merging', {'k': 0.3, 'lam': 0.7}, ties_merging(sds, base, k=0.3, lam=0.7))):
        d = dare(sds, base, p=0.0, merge=merge, **kw)
        assert all(torch.equal(d[k], ref[k]) for k in ref), merge


def test_pipeline_methods_do_not_modify_the_pool(tasks_pool):
    before = {n: clone_sd(sd) for n, sd in tasks_pool.models.items()}
    for m in TASK_METHODS: merge(tasks_pool, m, **({'n_samples': 200} if 'n_samples' in method_params(m) else {}))
    for n, sd in tasks_pool.models.items(): assert all(torch.equal(sd[k], before[n][k]) for k in sd)


# --- every method through the CLI, by name ----------------------------------------------------------------------

def test_list_methods_names_every_method(capsys):
    assert main(['list', 'methods']) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS) and set(TASK_METHODS) | {'fedmr', 'weight_matching'} <= set(METHODS)
    assert all(load_config('method', m)['name'] == m for m in METHODS)  # every method runs by name, with no YAML file


@pytest.mark.parametrize('method', TASK_METHODS)
def test_fuse_task_vector_methods_by_name(method, tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv('MODELFUSION_CACHE', cache)
    rc = main(['fuse', f'method={method}', 'modelpool=digits_mlp_tasks', 'taskpool=digits_tasks', '--out', str(tmp_path/'run'), '--quiet'])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path/'run'/'report.json').read_text())
    assert r['method'] == method and r['config']['method']['name'] == method
    assert set(r['results']['merged']) == {'digits', 'digits_rot90', 'average'}
    assert 0.1 < r['results']['merged']['average']['acc'] <= 1 and set(r['inputs']) == {'digits', 'digits_rot90', 'base'}
    assert r['versions']['torch'] and r['seed'] == 0 and r['timings']['method_s'] >= 0


@pytest.mark.parametrize('mode', ['true', 'false'])
def test_fuse_fedmr_both_return_modes(mode, tmp_path, cache, monkeypatch):
    monkeypatch.setenv('MODELFUSION_CACHE', cache)
    r = run([str(BIN/'modelfusion'), 'fuse', 'method=fedmr', 'modelpool=digits_mlp_seeds', 'taskpool=digits',
             f'method.return_modelpool={mode}', '--out', str(tmp_path/'run'), '--save-model', str(tmp_path/'m.safetensors'), '--quiet'])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path/'run'/'report.json').read_text())
    if mode == 'true':
        assert sorted(rep['results']) == ['model_0', 'model_1', 'model_2'] and len(rep['saved_models']) == 3
    else:
        assert list(rep['results']) == ['merged'] and len(rep['saved_models']) == 1


def test_fuse_alignment_method_and_show(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv('MODELFUSION_CACHE', cache)
    assert main(['fuse', 'method=weight_matching', 'modelpool=digits_mlp_seeds', 'taskpool=digits', 'modelpool.models.2.seed=5',
                 '--out', str(tmp_path/'run'), '--quiet']) == 0
    rep = json.loads((tmp_path/'run'/'report.json').read_text())
    assert rep['config']['modelpool']['models'][2]['seed'] == 5 and rep['pool']['info']['seed2']['seed'] == 5
    assert main(['show', 'method', 'weight_matching']) == 0
    out = capsys.readouterr().out
    assert 'max_sweeps' in out and 'fix' in out and 'arxiv.org/abs/2209.04836' in out


# --- bad input ------------------------------------------------------------------------------------------------------

def _err(argv, capsys):
    rc = main(argv); return rc, capsys.readouterr().err


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv('MODELFUSION_CACHE', cache)
    out = tmp_path/'run'
    base = ['fuse', 'method=task_arithmetic', 'modelpool=digits_mlp_tasks', 'taskpool=digits_tasks', '--out', str(out), '--quiet']
    cases = [
        (base + ['method.lamda=0.5'], "override 'method.lamda=0.5': unknown key 'lamda'"),
        (base + ['modelpool.modles.0.seed=1'], "unknown key 'modles'"),
        (base + ['modelpool.models.7.seed=1'], "modelpool.models.7.seed=1"),
        (base + ['modelpool.models=[]'], 'has no models'),
        (base + ['modelpool.base=null'], 'has finetune: true but the pool has no base model'),
        (['fuse', 'method=ties_merging', 'modelpool=digits_mlp_seeds', 'taskpool=digits', '--out', str(out), '--quiet'],
             'TIES-merging needs a base model'),
        (['fuse', 'method=tsk_arithmetic', 'modelpool=digits_mlp_tasks', 'taskpool=digits_tasks'], 'known methods: '),
        (['fuse', 'method=task_arithmetic', 'modelpool=nope', 'taskpool=digits_tasks'], 'known modelpools: digits_mlp_bn_seeds, digits_mlp_seeds'),
        (['fuse', 'method=task_arithmetic'], 'missing modelpool=NAME, taskpool=NAME'),
        (base + ['modelpool.models=[{name: a, seed: 0}]'], 'fusing needs at least 2'),
        (['fuse', 'method=fedmr', 'modelpool=digits_mlp_seeds', 'taskpool=digits', 'method.index=9', '--out', str(out), '--quiet'], 'index must be in 0..2'),
        (['fuse', 'method=interpolate', 'modelpool=digits_mlp_seeds', 'taskpool=digits', '--out', str(out), '--quiet'], 'takes 2 models, got 3'),
    ]
    for argv, msg in cases:
        rc, err = _err(argv, capsys)
        assert rc == 2 and msg in err and err.count('\n') == 1, (argv, err)
        assert not out.exists(), argv
    bad = tmp_path/'broken.yaml'; bad.write_text('name: digits\ntasks: [{dataset: digits}\n')
    rc, err = _err(['fuse', 'method=simple_average', 'modelpool=digits_mlp_seeds', f'taskpool={bad}'], capsys)
    assert rc == 2 and 'cannot parse taskpool config' in err
    diff = tmp_path/'diff.yaml'
    diff.write_text('name: diff\nmodel: {name: mlp, widths: [16]}\ndata: {dataset: digits}\nmodels:\n'
                    '  - {name: a, init: true}\n  - {name: b, path: %s}\n' % (tmp_path/'b.safetensors'))
    from modelfusion.training import save_checkpoint
    save_checkpoint(tmp_path/'b.safetensors', MLP(64, (32,), 10).state_dict(), {})
    rc, err = _err(['fuse', 'method=simple_average', f'modelpool={diff}', 'taskpool=digits', '--out', str(out)], capsys)
    assert rc == 2 and 'differ in' in err and not out.exists()
    nan = MLP(64, (16,), 10).state_dict(); nan['layers.0.weight'][0, 0] = float('nan')
    from safetensors.torch import save_file
    save_file(nan, str(tmp_path/'b.safetensors'))  # a plain safetensors file (save_checkpoint itself refuses NaN)
    rc, err = _err(['fuse', 'method=simple_average', f'modelpool={diff}', 'taskpool=digits', '--out', str(out)], capsys)
    assert rc == 2 and 'NaN' in err and not out.exists()


def test_torchvision_pool_with_dummy_taskpool(tmp_path):
    "A pool of seeded torchvision constructors, merged and measured by the dummy task pool (parameter counts)."
    pool = {'name': 'tv', 'model': {'torchvision': 'resnet18', 'num_classes': 10},
            'models': [{'name': 'a', 'init': True, 'seed': 0}, {'name': 'b', 'init': True, 'seed': 1}]}
    r = fuse(compose('simple_average', pool, 'dummy'), out=tmp_path/'run', cache=False)
    d = r['results']['merged']['dummy']
    assert d['parameters'] == 11_181_642 and d['buffers'] > 0 and 0.99 < d['nonzero_fraction'] <= 1
    assert r['pool']['info']['a'] == {'source': 'init', 'seed': 0}
    with pytest.raises(UnknownName, match='no model'):
        fuse(compose('simple_average', {**pool, 'model': {'torchvision': 'resnet1800'}}, 'dummy'), out=tmp_path/'x')

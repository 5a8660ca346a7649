"""First contact, hardened: FusionBench's commands and Python shape, modules everywhere, all-or-nothing run folders,
checkpoints of other dtypes, one-line errors, and what users are told (the tests of the other `test_hardening_*` files
cover REPAIR/Fisher, the tracer and the matchers)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from torch import nn
from conftest import run, BIN, ROOT
from modelfusion.core import write_json, NotAModel
from modelfusion.data import load_dataset
from modelfusion.models import MLP
from modelfusion.spec import mlp_spec, apply, random_alignment
from modelfusion.trace import spec_for
from modelfusion.methods.weight_matching import weight_matching
from modelfusion.evaluation import evaluate, interpolation_curve
from modelfusion.training import train, model_config, TrainConfig, save_checkpoint, load_checkpoint
from modelfusion.fusion import Pool, Method, method_schema
from modelfusion.pipeline import load_modelpool, compose, load_config, ConfigError
from modelfusion.experiments import run_alignment
import modelfusion.experiments as experiments
from modelfusion.cli import main


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cache'))


def strict_json(path):
    "Parse a file as strict JSON (NaN, Infinity are errors)."
    def bad(c): raise ValueError(f"non-standard JSON constant {c} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


# --- FusionBench's commands and Python example, verbatim ---------------------------------------------------------

def test_fusionbench_commands_run_as_written(tmp_path, cache):
    env = {**os.environ, 'MODELFUSION_CACHE': cache}
    r = run([str(BIN/'modelfusion'), 'fuse', 'method=model_recombination', 'method.return_modelpool=false',
             'modelpool=digits_mlp_seeds', 'taskpool=dummy', '--out', str(tmp_path/'a')], env=env)
    assert r.returncode == 0, r.stderr
    rep = strict_json(tmp_path/'a'/'report.json')
    assert rep['method'] == 'fedmr' and list(rep['results']) == ['merged'] and rep['results']['merged']['dummy']['parameters'] > 0
    r = run([str(BIN/'modelfusion'), 'fuse', 'method=model_recombination', 'method.return_modelpool=true',
             'modelpool=digits_mlp_seeds', 'taskpool=digits', '--out', str(tmp_path/'b')], env=env)
    assert r.returncode == 0, r.stderr
    rep = strict_json(tmp_path/'b'/'report.json')
    assert sorted(rep['results']) == ['model_0', 'model_1', 'model_2'] and all(0 <= v['digits']['acc'] <= 1 for v in rep['results'].values())
    out = run([str(BIN/'modelfusion'), 'list', 'methods']).stdout
    for name in ('model_recombination', 'dare/task_arithmetic', 'dare/ties_merging', 'regmean/regmean', 'fisher_merging/fisher_merging'):
        assert name in out


def test_fusionbench_parameter_names_are_translated():
    cfg = compose('ties_merging', 'digits_mlp_tasks', 'digits_tasks', ['method.scaling_factor=0.3', 'method.threshold=20'])
    assert (cfg['method']['lam'], cfg['method']['k']) == (0.3, 0.2)
    cfg = compose('dare/task_arithmetic', 'digits_mlp_tasks', 'digits_tasks', ['method.sparsity_ratio=0.1'])
    assert cfg['method']['name'] == 'dare_task_arithmetic' and cfg['method']['p'] == 0.1


def test_fusionbench_python_example():
    models = {"model_1": nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)),
              "model_2": nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)),
              "model_3": nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))}
    modelpool = Pool(models)
    recombined_pool = Method('model_recombination', return_modelpool=True).run(modelpool)
    assert len(modelpool) == len(recombined_pool) == 3
    for n in recombined_pool.names:  # every layer of every recombined model is one of the sources' layers
        m = recombined_pool.module(n)
        assert isinstance(m, nn.Sequential)
        assert any(torch.equal(m[0].weight, src[0].weight) for src in models.values())
    one = Method('model_recombination', return_modelpool=False).run(modelpool)
    assert isinstance(one, nn.Sequential)
    avg = Method('simple_average').run(models)
    torch.testing.assert_close(avg[2].bias, sum(m[2].bias for m in models.values()) / 3)


# --- modules everywhere ----------------------------------------------------------------------------------------

def test_modules_are_accepted_wherever_models_are():
    torch.manual_seed(0)
    m0, m1 = MLP(16, (8, 8), 4), MLP(16, (8, 8), 4)
    spec = mlp_spec(m0)
    a = weight_matching([m0, m1], spec).alignments[1]  # was: "'<' not supported between 'Linear' and 'ReLU'"
    b = weight_matching([dict(m0.named_parameters()), dict(m1.named_parameters())], spec).alignments[1]  # was: requires_grad
    assert all(torch.equal(a[g].merge, b[g].merge) for g in a)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    assert evaluate(MLP(16, (8, 8), 4), m0, x, y) == evaluate(MLP(16, (8, 8), 4), m0.state_dict(), x, y)
    with pytest.raises(NotAModel, match='needs the model as an nn.Module'): spec_for(m0.state_dict())


# --- run folders: all or nothing --------------------------------------------------------------------------------

def _align(out, cache, **kw):
    return run_alignment('mlp', {'widths': [16]}, 'digits', {'epochs': 2, 'batch_size': 64}, n_lams=3, out=out, cache=cache,
                         verbose=False, **kw)

def test_a_rerun_that_fails_leaves_the_previous_run_untouched(tmp_path, cache, monkeypatch):
    out = tmp_path/'run'
    _align(out, cache)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    m = strict_json(out/'metrics.json')
    assert m['computed_from']['seeds'] == [0, 1] and m['computed_from']['data']['name'] == 'digits'
    assert m['computed_from']['model']['widths'] == [16] and m['computed_from']['data']['fingerprint']
    def boom(*a, **k): raise RuntimeError('disk full while plotting')
    monkeypatch.setattr(experiments, 'plot_interpolation', boom)
    with pytest.raises(RuntimeError, match='disk full'): _align(out, cache, seeds=[2, 3])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a mix of two runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']  # and no temporary folder left
    monkeypatch.undo()
    _align(out, cache, seeds=[2, 3])
    assert strict_json(out/'metrics.json')['computed_from']['seeds'] == [2, 3]


def test_align_without_data_leaves_no_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'MODELFUSION_DATA'}
    r = run([str(BIN/'modelfusion'), 'align', '--dataset', 'cifar10', '--data-root', str(tmp_path/'nothing'),
             '--out', str(tmp_path/'run'), '--quiet'], env=env)
    assert r.returncode == 2 and "data set 'cifar10' not found" in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'run').exists()


def test_an_interrupted_demo_prints_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, 'MODELFUSION_CACHE': str(tmp_path/'cache'), 'PYTHONUNBUFFERED': '1'}
    # A child inherits an ignored SIGINT (POSIX; nohup relies on it), and Python then installs no KeyboardInterrupt
    # handler. In the full suite, SIGINT was found ignored in the pytest process by the time this test ran (something
    # earlier leaves it so; ipykernel's kernel app does that), and the demo then never stopped. The child gets the
    # default disposition, as a shell gives a program it starts in the foreground.
    p = subprocess.Popen([str(BIN/'modelfusion'), 'demo', '--dataset', 'digits', '--epochs', '2000', '--widths', '64',
                          '--out', str(tmp_path/'run')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stdout.readline()  # "data: ..." is printed right before training starts
        assert line.startswith('data:'), line
        time.sleep(1.0); p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ['modelfusion: interrupted; nothing was written']
    assert not (tmp_path/'run').exists() and not [q for q in tmp_path.iterdir() if q.name.startswith('.run')]


# --- checkpoints of other dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float64', 'mixed'])
def test_checkpoints_of_other_dtypes_merge(dtype, tmp_path, cache):
    digits = load_dataset('digits')
    mcfg = model_config('mlp', digits, widths=[32])
    files = []
    for i, s in enumerate((0, 1)):
        sd = train(mcfg, digits, TrainConfig(epochs=5, batch_size=64), s, cache=cache, verbose=False).state_dict
        dt = getattr(torch, dtype) if dtype != 'mixed' else (torch.float16, torch.float64)[i]
        files.append(save_checkpoint(tmp_path/f'm{i}.safetensors', {k: v.to(dt) for k, v in sd.items()}))
    pool = {'name': 'files', 'model': {'name': 'mlp', 'widths': [32]}, 'data': {'dataset': 'digits'},
            'models': [{'name': f'm{i}', 'path': str(f)} for i, f in enumerate(files)]}
    (tmp_path/'pool.yaml').write_text(json.dumps(pool))
    for method in ('simple_average', 'weight_matching'):
        r = run([str(BIN/'modelfusion'), 'fuse', f'method={method}', f'modelpool={tmp_path/"pool.yaml"}', 'taskpool=digits',
                 '--out', str(tmp_path/method), '--save-model', str(tmp_path/f'{method}.safetensors'), '--quiet'])
        assert r.returncode == 0, r.stderr
        rep = strict_json(tmp_path/method/'report.json')
        assert rep['results']['merged']['digits']['acc'] > (0.8 if method == 'weight_matching' else 0.1) and rep['pool']['computed_in'] == ['float32']
        saved, _ = load_checkpoint(tmp_path/f'{method}.safetensors')
        want = torch.float32 if dtype == 'mixed' else getattr(torch, dtype)
        assert {v.dtype for v in saved.values()} == {want}  # saved in the inputs' dtype when they share one


# --- one-line errors --------------------------------------------------------------------------------------------

def _fuse_err(*items, **kw):
    r = run([str(BIN/'modelfusion'), 'fuse', *items], **kw)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr

def test_wrong_type_overrides_are_one_line(tmp_path):
    assert 'method.lam must be a number' in _fuse_err('method=task_arithmetic', 'modelpool=digits_mlp_tasks', 'taskpool=digits_tasks', 'method.lam=abc')
    assert 'method.max_sweeps must be an integer' in _fuse_err('method=weight_matching', 'modelpool=digits_mlp_seeds', 'taskpool=digits', 'method.max_sweeps=abc')
    assert "one of 'none', 'repair', 'reset_bn'" in _fuse_err('method=weight_matching', 'modelpool=digits_mlp_seeds', 'taskpool=digits', 'method.fix=repiar')


def test_malformed_yaml_names_line_and_column(tmp_path):
    (tmp_path/'pool.yaml').write_text('name: p\nmodel: {name: mlp\nmodels: []\n')
    err = _fuse_err('method=simple_average', f'modelpool={tmp_path/"pool.yaml"}', 'taskpool=digits')
    assert 'line 3, column' in err


def test_a_pickle_is_called_one_with_how_to_convert(tmp_path):
    torch.save(MLP(64, (32,), 10).state_dict(), tmp_path/'m.pt')
    pool = {'name': 'p', 'model': {'name': 'mlp', 'widths': [32]}, 'data': {'dataset': 'digits'},
            'models': [{'path': str(tmp_path/'m.pt')}, {'path': str(tmp_path/'m.pt')}]}
    (tmp_path/'pool.yaml').write_text(json.dumps(pool))
    err = _fuse_err('method=simple_average', f'modelpool={tmp_path/"pool.yaml"}', 'taskpool=digits', '--quiet')
    assert 'is a torch.save pickle' in err and 'save_file(' in err


def test_save_model_errors_name_the_option_before_any_work(tmp_path):
    t = time.time()
    err = _fuse_err('method=simple_average', 'modelpool=digits_mlp_seeds', 'taskpool=digits', '--save-model', str(tmp_path/'merged.pt'))
    assert err.startswith('modelfusion: error: --save-model') and '.safetensors' in err
    assert time.time() - t < 30  # checked before any model is trained


def test_align_has_quiet_and_bars_stay_off_without_a_terminal():
    assert '--quiet' in run([str(BIN/'modelfusion'), 'align', '--help']).stdout
    env = {k: v for k, v in os.environ.items() if k != 'MODELFUSION_PROGRESS'}
    code = 'from modelfusion.core import progress_enabled as p; print(p())'
    assert run([sys.executable, '-c', code], env=env).stdout.strip() == 'False'  # stderr is a pipe here
    assert run([sys.executable, '-c', code], env={**env, 'MODELFUSION_PROGRESS': '1'}).stdout.strip() == 'True'


def test_reports_and_metrics_are_strict_json(tmp_path):
    write_json(tmp_path/'m.json', {'barrier': float('nan'), 'x': [float('inf'), 1.0]})
    assert strict_json(tmp_path/'m.json') == {'barrier': None, 'x': [None, 1.0]}


# --- what users are told ----------------------------------------------------------------------------------------

def test_pools_announce_training_time_on_first_use(tmp_path, capsys):
    cfg = {'name': 'fresh', 'model': {'name': 'mlp', 'widths': [16]}, 'data': {'dataset': 'digits'}, 'train': {'epochs': 1},
           'models': [{'seed': 0}, {'seed': 1}]}
    load_modelpool(cfg, device='cpu', cache=tmp_path)
    err = capsys.readouterr().err
    assert "model pool 'fresh': training 2 model(s) not in the cache yet, about" in err
    load_modelpool(cfg, device='cpu', cache=tmp_path)
    assert 'training' not in capsys.readouterr().err  # from the cache: nothing to announce


def test_show_documents_every_parameter_with_its_choices(capsys):
    assert main(['show', 'method', 'weight_matching']) == 0
    out = capsys.readouterr().out
    assert "one of 'none', 'repair', 'reset_bn'" in out and 'reference model' in out and 'BatchNorm reset' in out
    schema = method_schema('weight_matching')
    assert all(p.doc for p in schema.values()), [k for k, p in schema.items() if not p.doc]
    assert main(['show', 'method', 'model_recombination']) == 0
    out = capsys.readouterr().out
    assert 'method fedmr' in out and 'trained further' in out


def test_the_package_describes_only_what_exists():
    import configparser
    from modelfusion.fusion import MATCHERS
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    desc = cfg['DEFAULT']['description']
    for name, key in (('ZipIt', 'zipit'), ('CCA', 'cca'), ('OT Fusion', 'ot'), ('C2M3', 'c2m3')):
        assert name not in desc or key in MATCHERS, f"the description names {name}, which is not implemented"

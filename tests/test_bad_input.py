"""Bad input gets a clear error, and nothing is written."""
import json, gzip, pytest, torch
from pathlib import Path
from modelfusion.core import *
from modelfusion.data import load_dataset, read_idx
from modelfusion.models import MLP, build_model, make_norm
from modelfusion.spec import mlp_spec, SpecError, apply, random_alignment
from modelfusion.fusion import MATCHERS, METHODS, merge
from modelfusion.methods.weight_matching import weight_matching
from modelfusion.methods.averaging import weighted_average, interpolate
from modelfusion.training import save_checkpoint, load_checkpoint, TrainConfig, train, model_config
from modelfusion.evaluation import evaluate
from modelfusion.experiments import run_rebasin_mlp
from conftest import run, BIN

def sd(widths=(16, 16), seed=0, norm=None):
    torch.manual_seed(seed); return MLP(30, widths, 4, norm=norm).state_dict()

def test_mismatched_architectures():
    spec = mlp_spec(MLP(30, (16, 16), 4))
    with pytest.raises(IncompatibleModels, match="differ in .* tensor shape"): weight_matching([sd(), sd((16, 8))], spec)
    with pytest.raises(IncompatibleModels, match="different keys"): weight_matching([sd(), sd(norm='bn')], spec)
    with pytest.raises(IncompatibleModels): interpolate([sd(), sd((8, 16))])
    with pytest.raises(IncompatibleModels): weighted_average([sd(), sd((16,))])
    with pytest.raises(IncompatibleModels, match='template'): evaluate(MLP(30, (8, 16), 4), sd(), torch.randn(3, 30), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SpecError, match="size 8x1"): apply(sd(), mlp_spec(MLP(30, (8, 16), 4)), random_alignment(mlp_spec(MLP(30, (8, 16), 4))))

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_weights(bad, tmp_path):
    b = sd(seed=1); b['layers.2.weight'][3, 4] = bad
    spec = mlp_spec(MLP(30, (16, 16), 4))
    with pytest.raises(NonFiniteWeights, match="model B has NaN or Inf values in 1 tensor.*layers.2.weight"): weight_matching([sd(), b], spec)
    with pytest.raises(NonFiniteWeights): weighted_average([sd(), b])
    with pytest.raises(NonFiniteWeights): save_checkpoint(tmp_path/'m.safetensors', b)
    assert list(tmp_path.iterdir()) == []

def test_missing_dataset_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv('MODELFUSION_DATA', raising=False)
    for name in ['mnist', 'fashion_mnist', 'cifar10']:
        with pytest.raises(DataNotFound) as e: load_dataset(name, root=tmp_path)
        msg = str(e.value)
        assert str(tmp_path) in msg and 'MODELFUSION_DATA' in msg and 'not found' in msg, msg
        assert 'torchvision' not in ''.join(e.traceback.__str__())
    with pytest.raises(DataNotFound, match='neither root= nor MODELFUSION_DATA'): load_dataset('fashion_mnist')
    # with the sample allowed, MNIST falls back and says so
    with pytest.warns(UserWarning, match='embedded sample'): d = load_dataset('mnist', root=tmp_path, allow_sample=True)
    assert d.name == 'mnist_sample' and len(d.x_train) == 4000

def test_truncated_idx_file(tmp_path):
    (tmp_path/'mnist').mkdir()
    for f in ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']:
        hdr = bytes([0, 0, 8, 1]) + (10).to_bytes(4, 'big')
        (tmp_path/'mnist'/f).write_bytes(hdr + bytes(7))  # 7 of 10 bytes
    with pytest.raises(DataNotFound, match='truncated'): load_dataset('mnist', root=tmp_path)

def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownName, match='known data sets: cifar10, digits, fashion_mnist, mnist, mnist_sample'): load_dataset('imagenet')
    with pytest.raises(UnknownName, match='known models: mlp, resnet20, vgg11, vgg16'): build_model({'name': 'vit'})
    with pytest.raises(UnknownName, match='known matchers: .*activation.*weight'): MATCHERS['magic']
    with pytest.raises(UnknownName, match='known methods: .*task_arithmetic.*weight_matching'): METHODS['ties-ish']
    with pytest.raises(UnknownName, match='known norms'): make_norm('rms', 4, conv=False)
    with pytest.raises(UnknownName, match='known: adam, sgd'): TrainConfig(optimizer='lion')
    spec = mlp_spec(MLP(30, (16, 16), 4))
    with pytest.raises(UnknownName, match='known methods'): merge([sd(), sd(seed=1)], 'activation-ish', template=MLP(30, (16, 16), 4), spec=spec)

def test_corrupted_and_truncated_checkpoints(tmp_path):
    p = save_checkpoint(tmp_path/'m.safetensors', sd(), {'seed': 0})
    raw = p.read_bytes()
    bad = bytearray(raw); bad[len(raw) - 10] ^= 0x5A; p.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match='corrupted'): load_checkpoint(p)
    for n in (len(raw) - 1, len(raw) // 2, 20, 3, 0):
        p.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match='truncated'): load_checkpoint(p)
    p.write_bytes(b'{"not": "safetensors"}' * 10)
    with pytest.raises(CheckpointError): load_checkpoint(p)
    with pytest.raises(CheckpointError, match='does not exist'): load_checkpoint(tmp_path/'absent.safetensors')

def test_damaged_cache_entry_is_retrained(tmp_path, digits):
    mcfg = model_config('mlp', digits, widths=[16]); cfg = TrainConfig(epochs=1)
    a = train(mcfg, digits, cfg, seed=0, cache=tmp_path)
    a.path.write_bytes(a.path.read_bytes()[:100])
    with pytest.warns(UserWarning, match='damaged cache entry'): b = train(mcfg, digits, cfg, seed=0, cache=tmp_path)
    assert not b.from_cache and all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert train(mcfg, digits, cfg, seed=0, cache=tmp_path).from_cache

def test_unwritable_output_folder_writes_nothing(tmp_path):
    blocker = tmp_path/'a_file'; blocker.write_text('x')
    cache = tmp_path/'cache'
    with pytest.raises(OutputNotWritable, match='cannot write to the output folder'):
        run_rebasin_mlp('digits', widths=[8], epochs=1, out=blocker/'run', cache=str(cache), verbose=False)
    assert not cache.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['a_file']
    with pytest.raises(OutputNotWritable): save_checkpoint(blocker/'m.safetensors', sd())

def test_cli_reports_errors_without_traceback(tmp_path):
    r = run([str(BIN/'modelfusion'), 'demo', '--dataset', 'nope', '--out', str(tmp_path/'run')])
    assert r.returncode == 2 and 'known data sets' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run([str(BIN/'modelfusion'), 'demo', '--dataset', 'fashion_mnist', '--data-root', str(tmp_path/'none'), '--out', str(tmp_path/'run')],
            env={k: v for k, v in __import__('os').environ.items() if k != 'MODELFUSION_DATA'})
    assert r.returncode == 2 and 'not found' in r.stderr and str(tmp_path/'none') in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run([str(BIN/'modelfusion'), 'frobnicate'])
    assert r.returncode == 2 and 'invalid choice' in r.stderr

def test_empty_and_malformed_inputs():
    with pytest.raises(IncompatibleModels, match='empty'): weighted_average([])
    with pytest.raises(ValueError, match='2 models'): weight_matching([sd()], mlp_spec(MLP(30, (16, 16), 4)))
    with pytest.raises(ValueError, match='weights'): weighted_average([sd(), sd(seed=1)], [1.0])
    with pytest.raises(ValueError, match='non-negative'): weighted_average([sd(), sd(seed=1)], [1.0, -2.0])
    with pytest.raises(ValueError, match='two different seeds'): run_rebasin_mlp('digits', seeds=[3, 3], out='/tmp/never-used', verbose=False)

def test_matchers_that_need_data_say_so():
    from modelfusion.methods.activation import activation_matching, ste_matching
    from modelfusion.methods.sinkhorn import sinkhorn_matching
    spec = mlp_spec(MLP(30, (16, 16), 4)); sds = [sd(), sd(seed=1)]
    with pytest.raises(ValueError, match='activation matching needs data'): activation_matching(sds, spec)
    with pytest.raises(ValueError, match='STE matching needs data'): ste_matching(sds, spec, template=MLP(30, (16, 16), 4))
    with pytest.raises(ValueError, match="loss='midpoint' needs data"): sinkhorn_matching(sds, spec)
    with pytest.raises(UnknownName, match='known: corr, cov, dot'): activation_matching(sds, spec, template=MLP(30, (16, 16), 4), x=torch.randn(8, 30), stat='mi')
    # the data-free Sinkhorn loss needs none
    sinkhorn_matching(sds, spec, loss='distance', epochs=1)

def test_repair_rejects_mismatched_models():
    from modelfusion.methods.repair import repair
    m = MLP(30, (16, 16), 4); spec = mlp_spec(m)
    with pytest.raises(IncompatibleModels): repair(m, spec, [sd(), sd((16, 8))], sd(), torch.randn(10, 30))
    bad = sd(seed=2); bad['layers.0.bias'][0] = float('nan')
    with pytest.raises(NonFiniteWeights): repair(m, spec, [sd(), sd(seed=1)], bad, torch.randn(10, 30))

def test_cli_align_bad_arguments(tmp_path):
    r = run([str(BIN/'modelfusion'), 'align', '--model', 'mlp', '--model-kw', 'widths', '--dataset', 'digits', '--out', str(tmp_path/'r')])
    assert r.returncode == 2 and 'KEY=VALUE' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run([str(BIN/'modelfusion'), 'align', '--model', 'mlp', '--dataset', 'digits', '--matchers', 'psychic', '--out', str(tmp_path/'r')])
    assert r.returncode == 2 and 'known matchers' in r.stderr, r.stderr

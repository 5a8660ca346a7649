"""The model cache, atomic checkpoints and bit-identical seeded training."""
import os, sys, json, time, signal, dataclasses, subprocess
import pytest, torch
from pathlib import Path
from modelfusion.core import *
from modelfusion.data import class_split
from modelfusion.training import *
from conftest import ROOT

def test_cache_hit_returns_the_stored_model(tmp_path, digits):
    mcfg = model_config('mlp', digits, widths=[32]); cfg = TrainConfig(epochs=2, batch_size=64)
    a = train(mcfg, digits, cfg, seed=0, cache=tmp_path)
    t = time.time(); b = train(mcfg, digits, cfg, seed=0, cache=tmp_path)
    assert (a.from_cache, b.from_cache) == (False, True)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert b.meta['metrics'] == a.meta['metrics'] and b.meta['seed'] == 0
    # anything that determines the model changes the key
    assert not train(mcfg, digits, cfg, seed=1, cache=tmp_path).from_cache
    assert not train(mcfg, digits, dataclasses.replace(cfg, lr=2e-3), seed=0, cache=tmp_path).from_cache
    assert not train(model_config('mlp', digits, widths=[33]), digits, cfg, seed=0, cache=tmp_path).from_cache
    sub = class_split(digits, [0, 1, 2, 3, 4])
    assert not train(mcfg, sub, cfg, seed=0, cache=tmp_path).from_cache
    assert len(list(tmp_path.rglob('*.safetensors'))) == 5

def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import modelfusion.training as T
    p = save_checkpoint(tmp_path/'m.safetensors', {'w': torch.ones(3)}, {'v': 1})
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'partial'); raise KeyboardInterrupt  # killed half-way through
    monkeypatch.setattr(T, 'save_file', crash)
    with pytest.raises(KeyboardInterrupt): save_checkpoint(p, {'w': torch.zeros(3)}, {'v': 2})
    monkeypatch.undo()
    sd, meta = load_checkpoint(p)
    assert torch.equal(sd['w'], torch.ones(3)) and meta['v'] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ['m.json', 'm.safetensors']  # no temp files left

WRITER = r'''
import sys, torch
from modelfusion.training import save_checkpoint
p = sys.argv[1]; i = 0
print('ready', flush=True)
while True:
    i += 1
    save_checkpoint(p, {'w': torch.full((4_000_000,), float(i)), 'b': torch.full((10,), float(i))}, {'i': i})
'''

def test_checkpoint_survives_sigkill_at_any_moment(tmp_path):
    "A process killed while rewriting a checkpoint leaves a complete, verifiable checkpoint (the old or the new one)."
    p = tmp_path/'m.safetensors'
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, '-c', WRITER, str(p)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline(); time.sleep(delay); proc.send_signal(signal.SIGKILL); proc.wait()
        if p.exists():
            sd, meta = load_checkpoint(p)  # verifies the tensor hash
            assert sd['w'][0].item() == sd['b'][0].item() == meta['i']
    assert p.exists()

TRAINER = r'''
import sys, dataclasses
from modelfusion.data import load_dataset
from modelfusion.training import fit, model_config, TrainConfig, tensors_sha256
d = load_dataset('mnist', allow_sample=True)
d = dataclasses.replace(d, x_train=d.x_train[:3000], y_train=d.y_train[:3000])
sd, m = fit(model_config('mlp', d, widths=[128, 128]), d, TrainConfig(epochs=2, batch_size=64), seed=int(sys.argv[1]), device='cpu', verbose=False)
print(tensors_sha256(sd))
'''

def test_seeded_cpu_training_is_bit_identical_across_processes():
    runs = [subprocess.run([sys.executable, '-W', 'ignore', '-c', TRAINER, s], capture_output=True, text=True, timeout=300) for s in ('0', '0', '1')]
    for r in runs: assert r.returncode == 0, r.stderr
    h = [r.stdout.strip().splitlines()[-1] for r in runs]
    assert h[0] == h[1] and h[0] != h[2]

def test_training_learns_and_reports(mnist):
    small = dataclasses.replace(mnist, x_train=mnist.x_train[:4000], y_train=mnist.y_train[:4000])
    sd, m = fit(model_config('mlp', small, widths=[64]), small, TrainConfig(epochs=2), seed=0, verbose=False)
    assert m['test_acc'] > 0.85 and len(m['train_loss_history']) == 2 and m['samples_per_s'] > 0
    assert all(not v.requires_grad and v.device.type == 'cpu' for v in sd.values())

def test_schedules_and_sgd(digits):
    for cfg in [TrainConfig(epochs=3, optimizer='sgd', lr=0.05, schedule='onecycle', warmup=0.3, label_smoothing=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                TrainConfig(epochs=6, lr=3e-3, schedule='constant'), TrainConfig(epochs=6, lr=3e-3, schedule='cosine', warmup=0.2)]:
        _, m = fit(model_config('mlp', digits, widths=[64]), digits, cfg, seed=0, verbose=False)
        assert m['test_acc'] > 0.8, (cfg, m['test_acc'])

def test_batchnorm_vgg_and_resnet_train_a_step():
    "The conv models train (a couple of steps on real CIFAR-shaped data from digits upsampled)."
    from modelfusion.data import Data
    x = torch.randn(64, 3, 32, 32); y = torch.randint(0, 10, (64,))
    d = Data('rand', x, y, x[:16], y[:16], 10, 'random', augment='crop_flip')
    for name, kw in [('vgg11', {'width': 0.25}), ('resnet20', {'width': 1, 'norm': 'ln'}), ('vgg16', {'width': 0.125, 'norm': None})]:
        sd, m = fit(model_config(name, d, **kw), d, TrainConfig(epochs=1, batch_size=32, optimizer='sgd', lr=0.01), seed=0, verbose=False)
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


RACE = '''import sys, time
from pathlib import Path
from modelfusion.data import load_dataset
from modelfusion.training import train, model_config, TrainConfig
data = load_dataset('digits')
Path(sys.argv[2]).touch()  # ready: imports done
while not Path(sys.argv[3]).exists(): time.sleep(0.01)  # both start training at the same moment
t = train(model_config('mlp', data, widths=[64, 64]), data, TrainConfig(epochs=3, batch_size=64), seed=0,
          cache=sys.argv[1], verbose=False)
print('from_cache' if t.from_cache else 'trained', t.meta['key'], flush=True)
'''


def test_two_processes_asking_for_one_model_train_it_once(tmp_path):
    "Sweep workers share the model cache: two processes asking for the same model at once train it once."
    script = tmp_path/'race.py'
    script.write_text(RACE)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MODELFUSION_PROGRESS': '0'}
    ready, go = [tmp_path/f'ready{i}' for i in range(2)], tmp_path/'go'
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path/'cache'), str(r), str(go)],
                              stdout=subprocess.PIPE, text=True, env=env) for r in ready]
    t0 = time.time()
    while not all(r.exists() for r in ready) and time.time() - t0 < 240: time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ['from_cache', 'trained'], outs
    assert outs[0][1] == outs[1][1]
    assert len(list((tmp_path/'cache').rglob('*.safetensors'))) == 1

"""Real data sets, splits and loaders."""
import gzip, shutil, pickle, pytest, torch, numpy as np
from modelfusion.data import *
from conftest import has_full

@pytest.mark.skipif(not has_full('mnist'), reason='full MNIST not configured (MODELFUSION_DATA)')
def test_full_mnist_and_its_raw_torchvision_layout(tmp_path):
    d = load_dataset('mnist')
    assert d.name == 'mnist' and d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist()[:3] == [5923, 6742, 5958]  # the published class counts
    # the same files uncompressed in torchvision's ROOT/MNIST/raw/ layout give the same tensors
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    src = next(r for r in data_roots() if (r/'mnist').exists())/'mnist'
    for f in src.glob('*.gz'):
        with gzip.open(f) as i, open(raw/f.stem, 'wb') as o: shutil.copyfileobj(i, o)
    d2 = load_dataset('mnist', root=tmp_path)
    assert torch.equal(d.x_test, d2.x_test) and torch.equal(d.y_train, d2.y_train)

@pytest.mark.skipif(not has_full('fashion_mnist'), reason='Fashion-MNIST not configured')
def test_fashion_mnist():
    d = load_dataset('fashion_mnist')
    assert d.x_train.shape == (60000, 1, 28, 28) and torch.bincount(d.y_test).tolist() == [1000] * 10

@pytest.mark.skipif(not has_full('cifar10'), reason='CIFAR-10 not configured')
def test_cifar10_from_the_archive_without_unpacking():
    d = load_dataset('cifar10')
    assert d.x_train.shape == (50000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(d.y_train).tolist() == [5000] * 10 and torch.bincount(d.y_test).tolist() == [1000] * 10
    assert d.augment == 'crop_flip' and 'CIFAR-10' in d.source
    assert len(d.y_train[:1000].unique()) == 10 and len(d.y_test[:500].unique()) == 10  # a prefix holds every class
    if 'jpeg75' in d.source.lower() or 'jpg' in d.source.lower(): assert 'JPEG' in d.source

def test_cifar10_original_pickled_batches(tmp_path):
    "The original python batches (here with synthetic pixels in the real format) take the same path."
    d = tmp_path/'cifar-10-batches-py'; d.mkdir(); rng = np.random.default_rng(0)
    for name, n in [*[(f'data_batch_{i}', 20) for i in range(1, 6)], ('test_batch', 10)]:
        with open(d/name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': list(rng.integers(0, 10, n))}, f)
    data = load_dataset('cifar10', root=tmp_path)
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32) and 'original' in data.source

def test_embedded_sample_is_real_mnist():
    d = load_dataset('mnist_sample')
    assert len(d.x_train) == 4000 and len(d.x_test) == 1000 and torch.bincount(d.y_test).tolist() == [100] * 10
    assert not set(map(tuple, d.x_test.flatten(1)[:50].tolist())) & set(map(tuple, d.x_train.flatten(1)[:2000].tolist()))

def test_rotation(mnist):
    assert torch.allclose(rotate(mnist, 0).x_test, mnist.x_test, atol=1e-5)
    r = rotate(mnist, 90)
    torch.testing.assert_close(r.x_test[:20], mnist.x_test[:20].rot90(1, (2, 3)), atol=1e-4, rtol=0)
    r45 = rotate(mnist, 45)
    assert r45.x_train.shape == mnist.x_train.shape and 'rot45' in r45.name and r45.fingerprint != mnist.fingerprint

def test_class_splits(mnist):
    lo, hi = class_split(mnist, range(5)), class_split(mnist, range(5, 10))
    assert len(lo.y_train) + len(hi.y_train) == len(mnist.y_train)
    assert lo.y_train.max() == 4 and hi.y_train.min() == 5
    assert class_split(mnist, [5, 9], relabel=True).y_test.unique().tolist() == [0, 1]

def test_dirichlet_split_is_a_partition_and_non_iid(mnist):
    parts = dirichlet_split(mnist.y_train, 10, alpha=0.1, seed=0)
    allidx = torch.cat(parts)
    assert len(allidx) == len(mnist.y_train) and len(allidx.unique()) == len(allidx)
    props = torch.stack([torch.bincount(mnist.y_train[p], minlength=10).float() / len(p) for p in parts])
    iid = torch.stack([torch.bincount(mnist.y_train[p], minlength=10).float() / len(p) for p in dirichlet_split(mnist.y_train, 10, alpha=1000, seed=0)])
    assert props.max(1).values.mean() > 0.5 > iid.max(1).values.mean()

def test_loader_covers_the_data_once_per_epoch_and_is_seeded(mnist):
    dl = TensorLoader(mnist.x_test, mnist.y_test, batch_size=300, seed=3)
    e1 = torch.cat([y for _, y in dl]); e2 = torch.cat([y for _, y in dl])
    assert torch.equal(e1.sort().values, mnist.y_test.sort().values) and not torch.equal(e1, e2)
    assert torch.equal(e1, torch.cat([y for _, y in TensorLoader(mnist.x_test, mnist.y_test, batch_size=300, seed=3)]))
    assert len(TensorLoader(mnist.x_test, mnist.y_test, 300, drop_last=True)) == len(mnist.x_test) // 300
    with pytest.raises(ValueError, match='empty'): TensorLoader(mnist.x_test[:0], mnist.y_test[:0])

def test_crop_flip_on_cifar_shaped_batches():
    x = torch.randn(32, 3, 32, 32)
    y = crop_flip(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(32):  # each output is a 32x32 window of the zero-padded input, possibly flipped
        wins = [xp[i, :, r:r+32, c:c+32] for r in range(9) for c in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in wins)
    assert sum(torch.equal(y[i], x[i]) for i in range(32)) < 8  # most samples are shifted or flipped

"""Shared fixtures. Full data sets come from $MODELFUSION_DATA, defaulting to ../shared/data when present;
without them the tests fall back to data that ships with packages (the MNIST sample, scikit-learn digits)."""
import os, sys, subprocess
from pathlib import Path
import pytest

os.environ.setdefault('MODELFUSION_PROGRESS', '0')
ROOT = Path(__file__).resolve().parent.parent
_shared = ROOT.parent/'shared'/'data'
if 'MODELFUSION_DATA' not in os.environ and (_shared/'mnist').exists(): os.environ['MODELFUSION_DATA'] = str(_shared)

from modelfusion.core import DataNotFound
from modelfusion.data import load_dataset, load_idx_dataset

def has_full(name: str) -> bool:
    try:
        if name == 'cifar10':
            from modelfusion.data import data_roots
            return any((r/'cifar10_jpeg75').exists() or (r/'cifar-10-batches-py').exists() or (r/'cifar10').exists() for r in data_roots())
        load_idx_dataset(name); return True
    except DataNotFound: return False

@pytest.fixture(scope='session')
def digits(): return load_dataset('digits')

@pytest.fixture(scope='session')
def mnist():
    "Full MNIST when available, else the embedded 5,000-image sample."
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); return load_dataset('mnist', allow_sample=True)

def run(args, **kw):
    "Run a command with the test interpreter's environment; return the CompletedProcess."
    return subprocess.run(args, capture_output=True, text=True, cwd=kw.pop('cwd', ROOT), timeout=kw.pop('timeout', 600), **kw)

BIN = Path(sys.executable).parent

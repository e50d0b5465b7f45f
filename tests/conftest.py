"""Shared fixtures: the official reference data lives in tests/reference (see its README)."""
import os
from pathlib import Path

# The suite compiles many small programs: XLA's backend optimisation triples their compile time
# (≈10 s → 3 s for the tiny network) and buys nothing at these sizes. Set before jax initialises.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import numpy as np
import pytest

REFERENCE_DIR = Path(__file__).resolve().parent / 'reference'


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f'reference data not found at {REFERENCE_DIR} (tests/reference is part of the repository)')
    return REFERENCE_DIR


def torch_params(npz, prefix='param/'):
    """The torch-named state_dict stored under `prefix` in a reference .npz."""
    return {k[len(prefix):]: npz[k] for k in npz if k.startswith(prefix)}


def nchw_to_nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nhwc_to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope='session')
def tiny_cond(reference_dir):
    return dict(np.load(reference_dir / 'tiny_cond.npz'))


def random_network(config, seed=0):
    """A randomly initialised Network whose zero-initialised gains are set non-zero, so every
    block and the output actually depend on the input (a fresh EDM2 net outputs F = 0)."""
    import jax
    from edm2_jax import Network
    net = Network.init(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: (rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
                         if path[-1].key.endswith('_gain') else v), net.variables['params'])
    return net.replace(variables={**net.variables, 'params': params})

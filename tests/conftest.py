"""Shared fixtures (the official reference data lives in tests/reference, see its README); the shared
plain helpers live in tests/helpers.py."""
import os
from pathlib import Path

# The suite compiles many small programs: XLA's backend optimisation triples their compile time
# (≈10 s → 3 s for the tiny network) and buys nothing at these sizes. Set before jax initialises.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
# Under pytest-xdist (`make test`: one worker per core) torch's and BLAS's OpenMP pools would spin
# against the other workers; one thread each (set before torch or numpy load).
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')

import numpy as np
import pytest


REFERENCE_DIR = Path(__file__).resolve().parent / 'reference'


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f'reference data not found at {REFERENCE_DIR} (tests/reference is part of the repository)')
    return REFERENCE_DIR


@pytest.fixture(scope='session')
def tiny_cond(reference_dir):
    return dict(np.load(reference_dir / 'tiny_cond.npz'))


@pytest.fixture(scope='module')
def nets():
    """A micro network and a second one as its guide, both logging their passes (helpers.Recorded)."""
    from edm2_jax import EDM2Config
    from helpers import MICRO_CONFIG, Recorded, random_network
    config = EDM2Config(**MICRO_CONFIG)
    return (Recorded(random_network(config, 0, gains=(0.4, 1.3)), 'net'),
            Recorded(random_network(config, 1, gains=(0.4, 1.3)), 'gnet'))


@pytest.fixture(scope='module')
def batch(nets):
    """Sampler inputs of seeds 0 … 7 for the micro network."""
    from edm2_jax import sampling
    return sampling.network_inputs(nets[0], np.arange(8))


def pytest_collection_modifyitems(items):
    """Modules with slow (subprocess, end-to-end) tests first, each module's order kept: with
    `--dist loadfile` a long module handed out last would run alone while the other workers idle."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
    items.sort(key=lambda item: item.module.__name__ not in slow)

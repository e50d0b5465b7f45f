"""Shared fixtures (the official reference data lives in tests/reference, see its README); the shared
plain helpers live in tests/helpers.py."""
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


@pytest.fixture(scope='session')
def tiny_cond(reference_dir):
    return dict(np.load(reference_dir / 'tiny_cond.npz'))

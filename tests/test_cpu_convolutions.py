"""The XLA:CPU convolution switch of the CPU-bound scripts sets XLA_FLAGS only where it should."""
import os

import jaxlib.version
import pytest

from experiments import cpu_convolutions as C


@pytest.mark.parametrize('version, before, after', [
    ('0.10.2', None, C.CPU_CONV_FLAG),
    ('0.10.2', '--xla_foo=1', f'--xla_foo=1 {C.CPU_CONV_FLAG}'),
    ('0.10.2', '--xla_cpu_experimental_ynn_fusion_type=default', '--xla_cpu_experimental_ynn_fusion_type=default'),
    ('0.11.0', None, None),
])
def test_use_eigen_convolutions(monkeypatch, version, before, after):
    monkeypatch.setattr(jaxlib.version, '__version__', version)
    if before is None:
        monkeypatch.delenv('XLA_FLAGS', raising=False)
    else:
        monkeypatch.setenv('XLA_FLAGS', before)
    C.use_eigen_convolutions()
    assert os.environ.get('XLA_FLAGS') == after

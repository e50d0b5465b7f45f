"""The backend choice: Eigen convolutions on XLA:CPU where measured faster, overridable, recorded."""
import pytest

from edm2_jax import backend


@pytest.mark.parametrize('version, choice, flags, expected', [
    ('0.10.2', 'auto', '', 'eigen'),
    ('0.11.0', 'auto', '', 'default'),             # not measured: XLA's own choice
    ('0.10.2', 'default', '', 'default'),          # overridden
    ('0.11.0', 'eigen', '', 'eigen'),
    ('0.10.2', 'auto', '--xla_cpu_experimental_ynn_fusion_type=default', 'default'),  # XLA_FLAGS win
    ('0.11.0', 'auto', backend.EIGEN_FLAG, 'eigen'),
])
def test_choice(version, choice, flags, expected):
    assert backend.cpu_convolutions(version, choice, flags) == expected


def test_bad_choice_is_refused():
    with pytest.raises(ValueError, match=backend.ENV):
        backend.cpu_convolutions('0.10.2', 'fast', '')


def test_the_choice_is_in_effect_and_recorded():
    import os

    import jax
    info = backend.describe()
    assert info['platform'] == jax.devices()[0].platform
    if info['platform'] == 'cpu':
        assert info['cpu_convolutions'] == backend.CHOSEN
        assert (backend.EIGEN_FLAG in os.environ.get('XLA_FLAGS', '')) == (backend.CHOSEN == 'eigen')

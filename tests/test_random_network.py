"""Network.random and `python -m convert.random`: random networks whose output depends on x, σ and
the labels (Network.init's zero gains give F = 0, D(x) = c_skip·x)."""
import jax
import numpy as np
import pytest

from edm2_jax import Network, checkpoint
from edm2_jax.config import EDM2Config
from edm2_jax.errors import UserError

CONFIG = EDM2Config(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=8, logvar_channels=8)
SIGMA_DATA = 0.5


def c_skip(sigma):
    return SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    return x, np.eye(4, dtype=np.float32)[[0, 1]], np.eye(4, dtype=np.float32)[[2, 3]]


def test_init_outputs_c_skip_x():
    """The trap Network.random avoids: a fresh network's D is c_skip·x whatever the labels."""
    x, a, _ = inputs()
    net = Network.init(CONFIG, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(net(x, 1.3, a)), c_skip(1.3) * x, rtol=1e-5, atol=1e-6)


def test_random_output_depends_on_input_sigma_and_labels():
    x, a, b = inputs()
    net = Network.random(CONFIG, seed=1)
    d = np.asarray(net(x, 1.3, a))
    skip = c_skip(1.3) * x
    assert np.abs(d - skip).mean() > 1e-2                                     # F ≠ 0
    assert np.abs(np.asarray(net(x, 1.3, b)) - d).mean() > 1e-3               # labels matter
    assert np.abs(np.asarray(net(inputs(1)[0], 1.3, a)) - c_skip(1.3) * inputs(1)[0] - (d - skip)).mean() > 1e-3
    assert np.abs(np.asarray(net(x, 0.4, a)) - c_skip(0.4) * x - (d - skip)).mean() > 1e-3  # σ matters


def test_random_gains_and_seed():
    net = Network.random(CONFIG, seed=2, gains=(0.3, 0.4))
    flat = jax.tree_util.tree_flatten_with_path(net.variables['params'])[0]
    gains = [float(v) for p, v in flat if p[-1].key.endswith('_gain')]
    assert len(gains) > 5 and all(0.3 <= g <= 0.4 for g in gains)  # out_gain and every block's emb_gain
    same = Network.random(CONFIG, seed=2, gains=(0.3, 0.4))
    other = Network.random(CONFIG, seed=3, gains=(0.3, 0.4))
    leaves = lambda n: [np.asarray(v) for v in jax.tree.leaves(n.variables)]  # noqa: E731
    assert all(np.array_equal(u, v) for u, v in zip(leaves(net), leaves(same)))
    assert not all(np.array_equal(u, v) for u, v in zip(leaves(net), leaves(other)))
    with pytest.raises(ValueError, match='gains'):
        Network.random(CONFIG, gains=(0.0, 1.0))


def test_convert_random_writes_a_loadable_checkpoint(tmp_path):
    from convert.random import random_config, write_random
    config = random_config(None, dict(CONFIG.to_dict()))
    assert config == CONFIG
    out = write_random(tmp_path / 'net', config, seed=5)
    loaded = checkpoint.load(out)
    want = Network.random(CONFIG, seed=5)
    for u, v in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(want.variables)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert checkpoint.read_meta(out)['decoder'] == {'type': 'rgb'}


def test_convert_random_config_errors():
    from convert.random import random_config
    with pytest.raises(UserError, match='--img_channels'):
        random_config(None, {'img_resolution': 8})
    with pytest.raises(UserError, match='--preset'):
        random_config('img9-nope', {})
    assert random_config('img64-xs', {'label_dim': 0}).label_dim == 0

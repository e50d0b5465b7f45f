"""Presets and their parameter counts (spec §2.1 table), by jax.eval_shape — nothing is allocated."""
import math

import jax
import pytest

from edm2_jax import PRESETS, Network, block_specs, get_preset

# Parameter counts measured on the official code (spec §2.1), in millions.
SPEC_MILLIONS = {'img512-xs': 124.7, 'img512-s': 280.2, 'img512-m': 497.8, 'img512-l': 777.5,
                 'img512-xl': 1119.3, 'img512-xxl': 1523.2, 'img64-s': 280.2}


def count(config, collection='params'):
    shapes = jax.eval_shape(lambda k: Network.init(config, k).variables, jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes[collection]))


@pytest.mark.parametrize('name', sorted(SPEC_MILLIONS))
def test_parameter_counts_match_spec(name):
    assert round(count(PRESETS[name]) / 1e6, 1) == SPEC_MILLIONS[name]


def test_uncond_presets_lack_only_the_label_embedding():
    for size in ('xs', 's', 'm', 'l', 'xl', 'xxl'):
        cond, uncond = PRESETS[f'img512-{size}'], PRESETS[f'img512-{size}-uncond']
        assert uncond.label_dim == 0
        assert count(cond) - count(uncond) == cond.label_dim * cond.emb_channels


def test_s_preset_layer_table():
    """Spot checks of the img512-S layer table in spec §1.5."""
    specs = {s.name: s for s in block_specs(get_preset('img512-s'))}
    assert (specs['enc.64x64_conv'].in_channels, specs['enc.64x64_conv'].out_channels) == (5, 192)
    assert specs['enc.16x16_block0'][5:8] == (384, 576, 9) and specs['enc.16x16_block0'].has_conv_skip
    assert specs['dec.8x8_in0'].num_heads == 12 and specs['dec.8x8_in1'].num_heads == 0
    assert specs['dec.8x8_block3'].in_channels == 1344
    assert specs['dec.32x32_block0'][5:8] == (960, 384, 0)
    assert specs['dec.64x64_block3'].in_channels == 384
    assert len([s for s in specs if s.startswith('enc')]) == 1 + 4 * 3 + 3
    assert len([s for s in specs if 'dec' in s and 'block' in s]) == 4 * 4


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match='unknown preset'):
        get_preset('img512-huge')
    with pytest.raises(ValueError, match='divisible'):
        get_preset('img512-s').replace(img_resolution=60)
    with pytest.raises(ValueError, match='dropout'):
        get_preset('img512-s').replace(dropout=1.0)

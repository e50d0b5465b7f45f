"""Key-driven, per-example dropout: the properties in-situ guidance relies on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, random_network, torch_params
from convert.torch_names import torch_to_network
from edm2_jax import EDM2Config
from edm2_jax.layers import dropout
from edm2_jax import perturb as P
from edm2_jax.network import _apply

# Small enough to compile fast, big enough to have attention, skips, up/down sampling and labels.
CONFIG = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16)


@pytest.fixture(scope='module')
def setup():
    net = random_network(CONFIG, seed=3)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 2)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 2, 1, 1]]
    sigma = np.full(4, 1.3, np.float32)  # a mid noise level, where the U-Net output matters
    keys = jax.random.split(jax.random.key(7), 4)
    return net, x, sigma, labels, keys


def as_np(a):
    return np.asarray(a)


def test_rate_zero_is_bit_identical(setup):
    net, x, s, c, keys = setup
    plain = as_np(net(x, s, c))
    np.testing.assert_array_equal(as_np(net(x, s, c, dropout_rate=jnp.float32(0), keys=keys)), plain)
    np.testing.assert_array_equal(as_np(net(x, s, c, dropout_rate=jnp.zeros(4), keys=keys)), plain)


def test_fixed_key_fixed_output_and_keys_matter(setup):
    net, x, s, c, keys = setup
    a = as_np(net(x, s, c, dropout_rate=0.2, keys=keys))
    b = as_np(net(x, s, c, dropout_rate=0.2, keys=keys))
    other = as_np(net(x, s, c, dropout_rate=0.2, keys=jax.random.split(jax.random.key(8), 4)))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(a - other).reshape(4, -1).max(axis=1) > 1e-4)
    assert np.all(np.abs(a - as_np(net(x, s, c))).reshape(4, -1).max(axis=1) > 1e-4)


def test_examples_are_independent(setup):
    net, x, s, c, keys = setup
    a = as_np(net(x, s, c, dropout_rate=0.3, keys=keys))
    x2 = x.copy()
    x2[2] = -x2[2]
    keys2 = keys.at[2].set(jax.random.key(99))
    b = as_np(net(x2, s, c, dropout_rate=jnp.array([0.3, 0.3, 0.5, 0.3]), keys=keys2))
    for i in (0, 1, 3):
        np.testing.assert_array_equal(a[i], b[i])
    assert np.abs(a[2] - b[2]).max() > 1e-3


def test_single_key_is_folded_with_the_example_index(setup):
    net, x, s, c, _ = setup
    key = jax.random.key(3)
    folded = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(4))
    np.testing.assert_array_equal(as_np(net(x, s, c, dropout_rate=0.2, keys=key)),
                                  as_np(net(x, s, c, dropout_rate=0.2, keys=folded)))


def test_per_example_rates_on_a_doubled_batch(tiny_cond):
    """Bit-identical on the reference network. (On other shapes XLA:CPU may vectorise the softmax
    reduction differently for a different batch size, which moves results by ~1e-7.)"""
    net = torch_to_network(torch_params(tiny_cond))
    x, c = nchw_to_nhwc(tiny_cond['x']), tiny_cond['class_labels']
    s, keys, p = np.full(4, 1.3, np.float32), jax.random.split(jax.random.key(5), 4), 0.25
    both = as_np(net(np.concatenate([x, x]), np.concatenate([s, s]), np.concatenate([c, c]),
                     dropout_rate=jnp.array([0.0] * 4 + [p] * 4), keys=jnp.concatenate([keys, keys])))
    np.testing.assert_array_equal(both[:4], as_np(net(x, s, c)))
    np.testing.assert_array_equal(both[4:], as_np(net(x, s, c, dropout_rate=p, keys=keys)))


def test_keep_fraction_matches_rate():
    p, shape = 0.3, (4, 16, 16, 64)
    keys = jax.random.split(jax.random.key(0), 4)
    y = dropout(jnp.ones(shape), jnp.array([0.0, p, p, p]), keys)
    np.testing.assert_array_equal(as_np(y[0]), 1.0)
    kept = as_np(y[1:]) != 0
    n = kept.size
    assert abs(kept.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(as_np(y[1:])[kept], 1 / (1 - p), rtol=1e-6)


def dropout_rows(config, rates, blocks):
    """A resolved dropout perturbation with one rate per row."""
    return P.check_strengths(P.resolve(config, P.dropout(jnp.asarray(rates, jnp.float32), blocks)), len(rates))


def paired(net, x, s, c, p, keys, blocks, share_prefix=True):
    """(D_clean, D_dropout) from one stacked pass over [x; x] with rates [0…, p…]."""
    n = x.shape[0]
    rates = jnp.concatenate([jnp.zeros(n), jnp.full(n, p)])
    out = net.stacked(x, s, c, copies=2, perturbation=P.dropout(rates, blocks), keys=jnp.concatenate([keys, keys]),
                      share_prefix=share_prefix)
    return out[:n], out[n:]


def test_decoder_only_dropout_leaves_the_encoder_untouched(setup):
    net, x, s, c, keys = setup
    def acts(rate):
        _, state = net.module.apply(net.variables, jnp.asarray(x), jnp.asarray(s), jnp.asarray(c),
                                    dropout_rows(net.config, [rate] * 4, 'decoder'), keys,
                                    mutable=['intermediates'])
        return {k: as_np(v[0]) for k, v in state['intermediates']['unet'].items()}
    clean, dropped = acts(0.0), acts(0.4)
    for name in clean:
        if name.startswith('enc') or name == 'emb':
            np.testing.assert_array_equal(dropped[name], clean[name], err_msg=name)
        else:
            assert np.abs(dropped[name] - clean[name]).max() > 1e-4, name


def test_paired_pass_with_and_without_prefix_sharing(setup):
    net, x, s, c, keys = setup
    for blocks in ('decoder', ['dec.8x8_block0', 'dec.4x4_in1']):
        shared = paired(net, x, s, c, 0.2, keys, blocks)
        fused = paired(net, x, s, c, 0.2, keys, blocks, share_prefix=False)
        separate = (net(x, s, c), net(x, s, c, dropout_rate=0.2, keys=keys, blocks=blocks))
        for a, b, d in zip(shared, fused, separate):
            np.testing.assert_allclose(as_np(a), as_np(b), rtol=0, atol=1e-6)
            np.testing.assert_allclose(as_np(b), as_np(d), rtol=0, atol=1e-6)


def test_paired_pass_on_a_batch_of_one(setup):
    net, x, s, c, keys = setup
    clean, pert = paired(net, x[:1], 1.3, c[:1], 0.2, keys[:1], 'decoder')
    assert clean.shape == pert.shape == (1, 8, 8, 2)
    np.testing.assert_allclose(as_np(clean), as_np(net(x[:1], 1.3, c[:1])), atol=1e-6)
    np.testing.assert_allclose(as_np(pert), as_np(net(x[:1], 1.3, c[:1], dropout_rate=0.2, keys=keys[:1],
                                                      blocks='decoder')), atol=1e-6)


def test_prefix_sharing_compiles_a_smaller_program(setup):
    """The shared prefix really runs once: fewer FLOPs than the plain fused pass."""
    net, x, s, c, keys = setup
    args = (net.config, net.dtype, net.variables)
    drop = dropout_rows(net.config, [0.0] * 4 + [0.2] * 4, ['dec.8x8_block1'])  # the last block: a long prefix
    keys2 = jnp.concatenate([keys, keys])
    fork = P.first_index(net.config, drop)
    flops_shared = _apply.lower(*args, x, s, c, drop, keys2, fork).compile().cost_analysis()['flops']
    x2, s2, c2 = (np.concatenate([a, a]) for a in (x, s, c))
    flops_fused = _apply.lower(*args, x2, s2, c2, drop, keys2).compile().cost_analysis()['flops']
    assert flops_shared < 0.75 * flops_fused

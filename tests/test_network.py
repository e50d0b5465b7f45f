"""The Flax EDM2 network against the official PyTorch outputs in tests/reference/tiny_cond.npz."""
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.torch_names import torch_to_network
from edm2_jax import EDM2Config, Network
from helpers import nchw_to_nhwc, nhwc_to_nchw, random_network

TOL = 1e-4


@pytest.fixture(scope='module')
def ref(tiny_cond):
    r = tiny_cond
    params = {k[6:]: v for k, v in r.items() if k.startswith('param/')}
    return dict(net=torch_to_network(params), x=nchw_to_nhwc(r['x']), sigma=r['sigma'],
                labels=r['class_labels'], D=r['D'], logvar=r['logvar'], raw=r)


def test_denoiser_and_logvar_match_reference(ref):
    D, logvar = ref['net'](ref['x'], ref['sigma'], ref['labels'], return_logvar=True)
    assert D.dtype == jnp.float32
    assert np.abs(nhwc_to_nchw(D) - ref['D']).max() <= TOL
    assert np.abs(np.asarray(logvar) - ref['logvar']).max() <= TOL
    D_only = ref['net'](ref['x'], ref['sigma'], ref['labels'])
    np.testing.assert_array_equal(np.asarray(D_only), np.asarray(D))


def test_every_intermediate_matches_reference(ref):
    net = ref['net']
    _, state = net.module.apply(net.variables, jnp.asarray(ref['x']), jnp.asarray(ref['sigma']),
                                jnp.asarray(ref['labels']), mutable=['intermediates'])
    acts = {**state['intermediates'], **state['intermediates']['unet']}
    names = [k[4:] for k in ref['raw'] if k.startswith('act/')]
    assert len(names) == 20  # x_in, c_noise, emb, 6 enc + 10 dec modules, F
    for name in names:
        ours = np.asarray(acts[name][0])
        ours = nhwc_to_nchw(ours) if ours.ndim == 4 else ours
        err = np.abs(ours - ref['raw'][f'act/{name}']).max()
        assert err <= TOL, f'{name}: max abs error {err}'


def test_scalar_sigma_broadcasts(ref):
    for i, s in enumerate(ref['sigma']):
        D = ref['net'](ref['x'][i:i + 1], float(s), ref['labels'][i:i + 1])
        assert np.abs(nhwc_to_nchw(D)[0] - ref['D'][i]).max() <= TOL
    same = ref['net'](ref['x'], ref['sigma'][2], ref['labels'])
    per_example = ref['net'](ref['x'], np.full(4, ref['sigma'][2]), ref['labels'])
    np.testing.assert_allclose(np.asarray(same), np.asarray(per_example), atol=2e-5)


def test_labels_none_means_zero_labels(ref):
    net, x, s = ref['net'], ref['x'], ref['sigma']
    none = net(x, s, None)
    zeros = net(x, s, np.zeros((4, 10), np.float32))
    np.testing.assert_allclose(np.asarray(none), np.asarray(zeros), atol=1e-6)
    assert np.abs(np.asarray(none) - np.asarray(net(x, s, ref['labels']))).max() > 1e-3


def test_unconditional_network_ignores_labels():
    """Random weights with non-zero gains (a fresh init has a zero output gain: no input could matter).
    With the label embedding, these weights do depend on the labels; without it (label_dim = 0, the
    same weights less emb_label) the labels are ignored."""
    cond = EDM2Config(img_resolution=8, img_channels=3, label_dim=5, model_channels=16,
                      channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    conditional = random_network(cond, seed=1)
    uncond = cond.replace(label_dim=0)
    flat = flax.traverse_util.flatten_dict(conditional.variables)
    net = Network(uncond, flax.traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                                             if 'emb_label' not in k}))
    assert jax.tree.structure(net.variables) == jax.tree.structure(
        jax.eval_shape(lambda k: Network.init(uncond, k).variables, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    a, b = np.eye(5, dtype=np.float32)[[0, 1]], np.eye(5, dtype=np.float32)[[3, 4]]
    assert np.abs(np.asarray(conditional(x, 1.0, a)) - np.asarray(conditional(x, 1.0, b))).max() > 1e-2
    plain = np.asarray(net(x, 1.0))
    assert np.abs(plain).max() > 0.1  # not the zero output of a fresh init
    for labels in (a, b):
        np.testing.assert_array_equal(np.asarray(net(x, 1.0, labels)), plain)


def test_network_passes_through_jit(ref):
    f = jax.jit(lambda net, x, s, c: net(x, s, c))
    D = f(ref['net'], ref['x'], ref['sigma'], ref['labels'])
    assert np.abs(nhwc_to_nchw(D) - ref['D']).max() <= TOL


def test_bfloat16_compute_is_close(ref):
    D32 = ref['net'](ref['x'], ref['sigma'], ref['labels'])
    D16 = ref['net'].with_dtype(jnp.bfloat16)(ref['x'], ref['sigma'], ref['labels'])
    assert D16.dtype == jnp.float32
    err = np.abs(np.asarray(D16) - np.asarray(D32)).max()
    assert 0 < err < 0.05, err  # bf16 keeps ~3 significant digits; |D| is O(1)


def test_bad_inputs_are_refused(ref):
    net, x, s, c = ref['net'], ref['x'], ref['sigma'], ref['labels']
    with pytest.raises(ValueError, match='NHWC'):
        net(nhwc_to_nchw(x), s, c)
    with pytest.raises(ValueError, match='sigma'):
        net(x, s[:3], c)
    with pytest.raises(ValueError, match='class_labels'):
        net(x, s, c[:, :5])
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        net(x, s, c, dropout_rate=1.0, keys=jax.random.key(0))
    with pytest.raises(ValueError, match='need keys'):
        net(x, s, c, dropout_rate=0.1)
    with pytest.raises(ValueError, match='unknown blocks'):
        net(x, s, c, dropout_rate=0.1, keys=jax.random.key(0), blocks=['enc.99x99_block0'])

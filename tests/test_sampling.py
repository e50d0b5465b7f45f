"""EDM2's Heun sampler: against the official sampler (tests/reference/sampler_tiny.npz), against an
independent NumPy implementation with an analytic denoiser, seeds → inputs, and argument errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.torch_names import torch_to_network
from edm2_jax import sampling as S
from helpers import Recorded, nchw_to_nhwc, nhwc_to_nchw, numpy_heun, run_recorded, torch_params


@pytest.fixture(scope='session')
def sampler_ref(reference_dir):
    r = dict(np.load(reference_dir / 'sampler_tiny.npz'))
    r['net'] = torch_to_network(torch_params(r, 'param/'))
    r['gnet'] = torch_to_network(torch_params(r, 'gparam/'))
    return r


# ---------------------------------------------------------------------------------------------------
# σ steps.

def test_sigma_steps_match_reference(sampler_ref):
    t = S.sigma_steps(8)
    assert t.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(t), sampler_ref['t_steps'])  # incl. t_0 = 79.99998
    with jax.enable_x64(True):
        t64 = S.sigma_steps(8, dtype=jnp.float64)
        assert t64.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(t64), sampler_ref['t_steps_f64'])


def test_sigma_steps_32_match_spec_values():
    t = np.asarray(S.sigma_steps(32))
    assert t.shape == (33,) and t[-1] == 0 and np.all(np.diff(t) < 0)
    for i, value in [(13, 4.999), (17, 1.609), (19, 0.845), (22, 0.283), (23, 0.189)]:  # spec §2.3
        assert abs(t[i] - value) < 1e-3, (i, t[i])
    np.testing.assert_allclose(t[[0, 31]], [80, 0.002], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(S.sigma_steps(1, 0.01, 3.0)), np.float32([3.0, 0]))


# ---------------------------------------------------------------------------------------------------
# The loop against an independent NumPy implementation of spec §3.1, analytic Gaussian denoiser.

SD = 0.7  # data ~ N(0, SD² I): exact D(x, σ) = x·SD²/(SD² + σ²)


def gaussian_denoise(x, sigma, step, keys):
    return x * (SD ** 2 / (SD ** 2 + sigma ** 2))


def numpy_edm_sampler(noise, t, eps=None, gammas=None):
    """The NumPy Heun loop on the exact Gaussian denoiser."""
    return numpy_heun(lambda x, sigma, i: x * SD ** 2 / (SD ** 2 + sigma ** 2), noise, t, eps, gammas)


def test_heun_loop_matches_numpy_and_exact_ode():
    inputs = S.seed_inputs(np.arange(5), (3, 2))
    noise = np.asarray(inputs.noise)
    t = np.asarray(S.sigma_steps(16, 0.002, 20.0), np.float64)
    out = jax.jit(lambda n, k: S.heun_sampler(gaussian_denoise, n, k, num_steps=16, sigma_max=20.0))(
        inputs.noise, inputs.keys)
    assert out.shape == noise.shape and out.dtype == jnp.float32
    expected = numpy_edm_sampler(noise, t)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=1e-6)
    # The NumPy loop itself: a 2nd-order solver of the exact probability-flow ODE, which maps
    # x(σ_max) to x(σ_max)·SD/sqrt(SD² + σ_max²): the error falls 4× per doubling of the steps.
    errors = []
    for n in (32, 64):
        tn = np.asarray(S.sigma_steps(n, 0.002, 20.0), np.float64)
        errors.append(numpy_edm_sampler(np.ones(1), tn)[0] * np.sqrt(SD ** 2 + 20.0 ** 2) / (20 * SD) - 1)
    assert abs(errors[1]) < 3e-3 and 3.5 < errors[0] / errors[1] < 4.5, errors
    with jax.enable_x64(True):
        out64 = S.heun_sampler(gaussian_denoise, inputs.noise, inputs.keys, num_steps=16, sigma_max=20.0,
                               dtype=jnp.float64)
        assert out64.dtype == jnp.float64
        t64 = np.asarray(S.sigma_steps(16, 0.002, 20.0, dtype=jnp.float64))
        np.testing.assert_allclose(np.asarray(out64), numpy_edm_sampler(noise, t64), rtol=1e-12, atol=1e-13)


def test_trajectory_ends_at_the_sample_and_starts_at_the_noise():
    inputs = S.seed_inputs(np.arange(3), (2,))
    t = S.sigma_steps(6, sigma_max=5.0)
    path = S.heun_loop(gaussian_denoise, inputs.noise, inputs.keys, t, return_trajectory=True)
    assert path.shape == (7, 3, 2)
    np.testing.assert_array_equal(np.asarray(path[-1]),
                                  np.asarray(S.heun_loop(gaussian_denoise, inputs.noise, inputs.keys, t)))
    np.testing.assert_array_equal(np.asarray(path[0]), np.asarray(inputs.noise * t[0]))
    # x_3 = the end point of the same steps followed by zero-length steps at t_3
    padded = jnp.concatenate([t[:4], jnp.full((3,), t[3])])
    x3 = S.heun_loop(gaussian_denoise, inputs.noise, inputs.keys, padded)
    np.testing.assert_array_equal(np.asarray(path[3]), np.asarray(x3))
    assert np.abs(np.asarray(path[3] - path[4])).max() > 1e-3


def test_churn_matches_numpy_with_the_documented_key_streams():
    inputs = S.seed_inputs(np.arange(4), (2, 2))
    num_steps, S_churn, S_min, S_max = 6, 3.0, 0.05, 2.0
    t = np.asarray(S.sigma_steps(num_steps, sigma_max=5.0), np.float64)
    out = S.heun_sampler(gaussian_denoise, inputs.noise, inputs.keys, num_steps=num_steps,
                         sigma_max=5.0, S_churn=S_churn, S_min=S_min, S_max=S_max)
    gammas = [min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
              for i in range(num_steps)]
    # documented: churn noise of step i = normal(fold_in(fold_in(sampler_key, i), 2))
    draw = jax.vmap(lambda k, i: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, i), S.CHURN), (2, 2)), in_axes=(0, None))
    eps = np.stack([np.asarray(draw(inputs.keys, i)) for i in range(num_steps)])
    expected = numpy_edm_sampler(np.asarray(inputs.noise), t, eps, gammas)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    assert 0 < sum(g > 0 for g in gammas) < num_steps
    no_churn = numpy_edm_sampler(np.asarray(inputs.noise), t)
    assert np.abs(expected - no_churn).max() > 1e-2
    outside = S.heun_sampler(gaussian_denoise, inputs.noise, inputs.keys, num_steps=num_steps,
                             sigma_max=5.0, S_churn=S_churn, S_min=10.0, S_max=20.0)
    np.testing.assert_allclose(np.asarray(outside), no_churn, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Seeds → noise, labels, keys.

def test_seed_inputs_depend_only_on_the_seed():
    seeds = np.arange(200)
    seeds[[10, 20]] = [2**32 + 5, 7]
    big = S.seed_inputs(seeds, (4, 4, 2), label_dim=10)
    small = S.seed_inputs([7, 5], (4, 4, 2), label_dim=10)  # 5 ≡ 2**32 + 5 (EDM2: seed mod 2^32)
    for (i, j) in [(20, 0), (10, 1)]:
        np.testing.assert_array_equal(np.asarray(big.noise[i]), np.asarray(small.noise[j]))
        np.testing.assert_array_equal(np.asarray(big.class_labels[i]), np.asarray(small.class_labels[j]))
        np.testing.assert_array_equal(jax.random.key_data(big.keys[i]), jax.random.key_data(small.keys[j]))
    assert big.noise.shape == (200, 4, 4, 2) and big.class_labels.shape == (200, 10)
    np.testing.assert_array_equal(np.asarray(big.class_labels).sum(1), np.ones(200))
    noise = np.asarray(big.noise)
    assert abs(noise.mean()) < 0.04 and abs(noise.std() - 1) < 0.04
    assert len(set(np.asarray(big.class_labels).argmax(1))) == 10
    fixed = S.seed_inputs([7, 5], (4, 4, 2), 10, class_idx=4)  # class_idx is traced: no recompile
    np.testing.assert_array_equal(np.asarray(fixed.class_labels).argmax(1), [4, 4])
    np.testing.assert_array_equal(np.asarray(fixed.noise), np.asarray(small.noise))
    assert S.seed_inputs([1], (3,)).class_labels is None
    # the noise stream is not the seed's key itself
    raw = jax.random.normal(jax.random.key(7), (4, 4, 2))
    assert np.abs(np.asarray(raw) - np.asarray(small.noise[0])).max() > 0.1


# ---------------------------------------------------------------------------------------------------
# The official sampler: images, σ sequence and evaluation order.

@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('run', ['unguided', 'autoguided'])
def test_matches_official_sampler(sampler_ref, run, dtype):
    r = sampler_ref
    net, gnet = Recorded(r['net'], 'net'), Recorded(r['gnet'], 'gnet')
    kwargs = dict(method='autoguidance', guide=gnet, guidance=float(r['guidance'])) if run == 'autoguided' else {}
    suffix = '_f64' if dtype == 'float64' else ''
    with jax.enable_x64(dtype == 'float64'):
        out, calls = run_recorded(lambda: S.sample(net, nchw_to_nhwc(r['noise']), r['labels'],
                                                   num_steps=int(r['num_steps']), dtype=dtype, **kwargs))
    assert out.dtype == dtype
    err = np.abs(nhwc_to_nchw(out) - r[f'images_{run}{suffix}']).max()
    assert err <= (1e-5 if dtype == 'float64' else 2e-4), err
    assert [c[0] for c in calls] == list(r[f'net_calls_{run}{suffix}'])
    assert all(c[2] == 4 for c in calls)
    # the networks receive σ in float32 (as the official Precond casts it)
    np.testing.assert_allclose([c[1] for c in calls], r[f'sigma_calls_{run}{suffix}'], rtol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Errors before compiling.

def test_argument_errors(sampler_ref):
    net, gnet = sampler_ref['net'], sampler_ref['gnet']
    noise, labels = nchw_to_nhwc(sampler_ref['noise']), sampler_ref['labels']
    keys = S.seed_inputs(np.arange(4), (1,)).keys
    cases = [
        (dict(num_steps=0), 'num_steps'),
        (dict(sigma_min=80.0, sigma_max=80.0), 'sigma_min < sigma_max'),
        (dict(rho=0.0), 'rho'),
        (dict(dtype=jnp.float64), 'jax_enable_x64'),
        (dict(dtype=jnp.int32), 'float32 or float64'),
        (dict(class_labels=labels[:3]), 'class_labels must have shape'),
        (dict(noise=noise[..., :3]), 'NHWC'),
        (dict(method='insitu', guidance=2.0, strength=1.0, keys=keys), r'\[0, 1\)'),
        (dict(method='insitu', guidance=2.0, strength=-0.1, keys=keys), r'\[0, 1\)'),
        (dict(method='insitu', guidance=2.0, strength=0.1), 'keys'),
        (dict(method='insitu', guidance=2.0, strength=0.1, keys=keys[:2]), 'one per sample'),
        (dict(method='autoguidance', guidance=2.0), 'needs a guide'),
        (dict(method='autoguidance', guide=gnet.replace(config=gnet.config.replace(img_channels=3))),
         'images'),
        (dict(method='autoguidance', guide=gnet.replace(config=gnet.config.replace(label_dim=7))),
         'label_dim'),
        (dict(method='cfg', guide=gnet), 'unconditional'),
        (dict(method='none', guidance=2.0), 'needs a guidance method'),
        (dict(method='magic'), 'unknown guidance method'),
        (dict(method='insitu', strength=0.1, keys=keys, interval=(2.0, 1.0)), 'σ_lo < σ_hi'),
        (dict(method='insitu', strength=0.1, keys=keys, interval_steps=(3, 40)), 'step interval'),
        (dict(interval=(0.1, 1.0)), 'needs a guidance method'),
        (dict(fusion='half'), 'fusion'),
    ]
    for kwargs, message in cases:
        kwargs = {'noise': noise, 'class_labels': labels, **kwargs}
        with pytest.raises(ValueError, match=message):
            S.sample(net, kwargs.pop('noise'), kwargs.pop('class_labels'), **kwargs)
    with pytest.raises(ValueError, match='integers'):
        S.seed_inputs([0.5], (2,))
    with pytest.raises(ValueError, match='class_idx'):
        S.seed_inputs([0], (2,), label_dim=3, class_idx=3)

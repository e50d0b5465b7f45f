"""The self-guidance perturbations on the toy MLP (`toy.model`, `perturb.Perturbation` kinds dropout,
skip, sigma_shift): zero strength is the plain model bit for bit and a no-op as guidance; `skip` and
`sigma_shift` against an independent float64 NumPy forward pass; per-example strengths; errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import Term
from edm2_jax import perturb as P
from edm2_jax.toy import methods
from edm2_jax.toy import model as T
from helpers import toy_trained_like

denoise = jax.jit(T.denoise, static_argnums=1)
log_density = jax.jit(T.log_density, static_argnums=1)
N = 6


@pytest.fixture(scope='module', params=['energy', 'denoiser'])
def setup(request):
    c = T.ToyConfig(16, readout=request.param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, 2)) * 0.5, jnp.float32)
    s = jnp.asarray(rng.uniform(0.05, 2.0, N), jnp.float32)
    return c, toy_trained_like(c, 0), x, s


def np_features(params, c, x, sigma, skip=()):
    """Independent float64 forward pass: y_0 = [u, ln σ/4, 1] W_0, y_i = silu_mp(y_{i−1}) W_i, with
    y_i = y_{i−1} for a skipped layer i; weights normalised per output column (+1e-4), / sqrt(fan-in)."""
    x, sigma = np.asarray(x, np.float64), np.asarray(sigma, np.float64)
    u = x / np.sqrt(c.sigma_data ** 2 + sigma ** 2)[:, None]
    y = np.concatenate([u, np.log(sigma)[:, None] / 4, np.ones((len(x), 1))], axis=1)
    for i, v in enumerate(params['weights']):
        v = np.asarray(v, np.float64)
        w = v / (1e-4 + np.sqrt(np.mean(v ** 2, axis=0))) / np.sqrt(v.shape[0])
        if i in skip:
            continue
        if i > 0:
            y = y / (1 + np.exp(-y)) / 0.596
        y = y @ w
    return y, u


def np_denoise(params, c, x, sigma, skip=()):
    """D of the denoiser readout, or log p̂ of the energy readout."""
    y, u = np_features(params, c, x, sigma, skip)
    g, sigma = float(params['gain']), np.asarray(sigma, np.float64)
    if c.readout == 'energy':
        return g * np.mean(y ** 2, axis=1) / sigma - 0.5 * np.sum(u ** 2, axis=1)
    sd2 = c.sigma_data ** 2
    return (sd2 / (sigma ** 2 + sd2))[:, None] * np.asarray(x, np.float64) + \
        (sigma * c.sigma_data / np.sqrt(sigma ** 2 + sd2) * g)[:, None] * y


def model_output(params, c, x, s, **kw):
    """What np_denoise computes: log p̂ (energy readout) or D (denoiser readout)."""
    return (log_density if c.readout == 'energy' else denoise)(params, c, x, s, **kw)


def test_zero_strength_is_the_plain_model(setup):
    c, p, x, s = setup
    plain = np.asarray(denoise(p, c, x, s))
    keys = jax.random.split(jax.random.key(1), N)
    for pert, kw in [(P.skip(()), {}), (P.skip((1, 2, 3), 0.0), {}), (P.sigma_shift(0.0), {}),
                     (P.dropout(0.0), dict(keys=keys)), ([P.skip(2, 0.0), P.sigma_shift(0.0)], {})]:
        np.testing.assert_array_equal(np.asarray(denoise(p, c, x, s, perturbation=pert, **kw)), plain)


def test_skip_and_sigma_shift_match_the_formulas(setup):
    c, p, x, s = setup
    for layers in [(2,), (1, 3)]:
        got = np.asarray(model_output(p, c, x, s, perturbation=P.skip(layers)))
        ref = np_denoise(p, c, x, s, skip=layers)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
        assert np.abs(ref - np_denoise(p, c, x, s)).max() > 1e-2  # the skip changes the model
    # the default skip is the middle hidden layer (L // 2 = 2)
    np.testing.assert_array_equal(np.asarray(denoise(p, c, x, s, perturbation=P.skip())),
                                  np.asarray(denoise(p, c, x, s, perturbation=P.skip((2,)))))
    # sigma_shift: the whole denoiser at σ(1 + δ), per example
    delta = jnp.asarray([0.0, 0.5, 0.25, 0.0, 1.0, 0.1], jnp.float32)
    got = np.asarray(denoise(p, c, x, s, perturbation=P.sigma_shift(delta)))
    sd2, s2 = c.sigma_data ** 2, (np.asarray(s, np.float64) * (1 + np.asarray(delta, np.float64))) ** 2
    if c.readout == 'denoiser':
        y, _ = np_features(p, c, x, np.sqrt(s2))
        ref = (sd2 / (s2 + sd2))[:, None] * np.asarray(x) + (np.sqrt(s2) * c.sigma_data / np.sqrt(s2 + sd2)
                                                             * float(p['gain']))[:, None] * y
    else:  # D = x + σ'² ∇ log p̂(x; σ'), the gradient by central differences of the NumPy energy
        h, grads, x64 = 1e-4, [], np.asarray(x, np.float64)
        for j in range(2):
            e = np.zeros(2)
            e[j] = h
            grads.append((np_denoise(p, c, x64 + e, np.sqrt(s2)) - np_denoise(p, c, x64 - e, np.sqrt(s2))) / (2 * h))
        ref = x64 + s2[:, None] * np.stack(grads, axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_per_example_strengths(setup):
    c, p, x, s = setup
    on = jnp.asarray([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    mixed = np.asarray(denoise(p, c, x, s, perturbation=P.skip((1, 3), on)))
    full = np.asarray(denoise(p, c, x, s, perturbation=P.skip((1, 3))))
    plain = np.asarray(denoise(p, c, x, s))
    rows = np.asarray(on) > 0
    np.testing.assert_array_equal(mixed[~rows], plain[~rows])
    np.testing.assert_allclose(mixed[rows], full[rows], rtol=1e-6, atol=1e-7)
    keys = jax.random.split(jax.random.key(1), N)  # dropout as a perturbation = the dropout_rate path
    np.testing.assert_array_equal(
        np.asarray(denoise(p, c, x, s, perturbation=P.dropout(0.2), keys=keys)),
        np.asarray(denoise(p, c, x, s, dropout_rate=0.2, keys=keys)))


def test_zero_strength_guidance_is_a_no_op():
    """Guide = the main model with an empty skip set or δ = 0: D_main − D_guide = 0 exactly, so the
    sampled points equal the unguided ones bit for bit, whatever w."""
    c = T.ToyConfig(8)
    models = {'main': methods.Model(toy_trained_like(c, 0), c)}
    noise, keys = methods.start_points(jax.random.key(0), 32)
    t = methods.time_steps(num_steps=6)
    none = np.asarray(methods.sample(methods.Method('none'), models, noise, keys, t))
    for pert in (P.skip(()), P.sigma_shift(0.0)):
        m = methods.Method('zero', (Term(2.0, perturbation=pert),))
        np.testing.assert_array_equal(np.asarray(methods.sample(m, models, noise, keys, t)), none)
    for pert in (P.skip((2,)), P.sigma_shift(0.3)):  # and a real strength changes the samples
        m = methods.Method('on', (Term(1.0, perturbation=pert),))
        assert np.abs(np.asarray(methods.sample(m, models, noise, keys, t)) - none).max() > 1e-3


def test_errors():
    c = T.ToyConfig(8)
    p = toy_trained_like(c, 0)
    x, s = jnp.zeros((2, 2)), 0.5
    for pert, match in [(P.attention_identity(), 'supports'), (P.skip(4), r'\[4\] do not exist'),
                        (P.skip(0), r'\[0\] do not exist'), (P.skip('decoder'), "'all' or indices"),
                        (P.sigma_shift(-1.0), 'δ > -1'), (P.skip(2, 0.5), 'strength 1'),
                        (P.Perturbation('sigma_shift', 0.1, (1,)), 'no layers')]:
        with pytest.raises(ValueError, match=match):
            T.denoise(p, c, x, s, perturbation=pert)
    with pytest.raises(ValueError, match='keys'):
        T.denoise(p, c, x, s, perturbation=P.dropout(0.1))
    with pytest.raises(ValueError, match='not both'):
        T.denoise(p, c, x, s, dropout_rate=0.1, keys=jax.random.split(jax.random.key(0), 2),
                  perturbation=P.dropout(0.1))
    models = {'main': methods.Model(p, c)}
    with pytest.raises(ValueError, match='supports'):
        methods.check_method(methods.Method('bad', (Term(1.0, perturbation=P.window()),)), models)

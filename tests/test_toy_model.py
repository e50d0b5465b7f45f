"""Toy denoiser, its training pieces and the guided sampling wrapper (toy2d-spec §2–3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import Term, training
from edm2_jax import methods as registry
from edm2_jax.toy import metrics, methods
from edm2_jax.toy import fractal as M
from edm2_jax.toy import model as T
from edm2_jax.toy import train
from helpers import toy_trained_like

denoise = jax.jit(T.denoise, static_argnums=1)
log_density = jax.jit(T.log_density, static_argnums=1)


def test_parameter_counts():
    count = lambda c: sum(x.size for x in jax.tree.leaves(T.init(c, jax.random.key(0))))  # noqa: E731
    assert count(T.ToyConfig(64)) == 16641 and count(T.ToyConfig(32)) == 4225   # spec §2.1


def test_initial_model_is_gaussian_score():
    """gain 0: D = σ_d²/(σ² + σ_d²)·x (the exact denoiser of N(0, σ_d² I))."""
    c = T.ToyConfig(16)
    p = T.init(c, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (7, 2))
    s = jnp.array([0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(np.asarray(denoise(p, c, x, s)), np.asarray(x * 0.25 / (0.25 + s[:, None] ** 2)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('readout', ['energy', 'denoiser'])
def test_dropout_semantics(readout):
    c = T.ToyConfig(16, readout=readout)
    p = toy_trained_like(c, 0)
    x = jax.random.normal(jax.random.key(1), (6, 2)) * 0.5
    s = jnp.full((6,), 0.3)
    keys = jax.random.split(jax.random.key(2), 6)
    plain = denoise(p, c, x, s)
    np.testing.assert_array_equal(np.asarray(denoise(p, c, x, s, dropout_rate=0.0, keys=keys)),
                                  np.asarray(plain))
    drop = denoise(p, c, x, s, dropout_rate=0.3, keys=keys)
    assert np.all(np.abs(np.asarray(drop - plain)).max(axis=1) > 0)
    perm = jnp.array([3, 0, 5, 1, 2, 4])   # row i depends only on keys[i]
    np.testing.assert_allclose(np.asarray(denoise(p, c, x[perm], s[perm], dropout_rate=0.3,
                                                    keys=keys[perm])), np.asarray(drop[perm]), rtol=1e-5)
    rates = jnp.array([0.0, 0.3, 0.0, 0.3, 0.0, 0.3])   # per-example rates
    mixed = denoise(p, c, x, s, dropout_rate=rates, keys=keys)
    np.testing.assert_allclose(np.asarray(mixed[0::2]), np.asarray(plain[0::2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed[1::2]), np.asarray(drop[1::2]), rtol=1e-6)


def test_energy_dropout_mask_fixed_under_differentiation():
    """With dropout, D = x + σ² ∇ₓ log p̂ for the SAME masks (finite differences of the energy)."""
    c = T.ToyConfig(16)
    p = toy_trained_like(c, 3)
    x = jnp.array([[0.2, 0.4], [0.7, 1.0]])
    s = jnp.array([0.1, 0.4])
    keys = jax.random.split(jax.random.key(4), 2)
    d = denoise(p, c, x, s, dropout_rate=0.2, keys=keys)
    h = 1e-3
    grads = []
    for j in range(2):
        e = jnp.zeros(2).at[j].set(h)
        f = lambda y: log_density(p, c, y, s, dropout_rate=0.2, keys=keys)  # noqa: E731
        grads.append((f(x + e) - f(x - e)) / (2 * h))
    fd = x + s[:, None] ** 2 * jnp.stack(grads, axis=1)
    np.testing.assert_allclose(np.asarray(d), np.asarray(fd), rtol=2e-3, atol=2e-4)


def test_forced_weight_normalisation():
    p = T.normalize_weights(T.init(T.ToyConfig(16), jax.random.key(0)))
    for w in p['weights']:
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(w)), axis=0)), 1.0, atol=1e-3)


def test_bad_inputs():
    c = T.ToyConfig(8)
    p = T.init(c, jax.random.key(0))
    with pytest.raises(ValueError, match='readout'):
        T.init(T.ToyConfig(8, readout='bogus'), jax.random.key(0))
    with pytest.raises(ValueError, match=r'\[N, 2\]'):
        T.denoise(p, c, jnp.zeros((3, 3)), 0.1)
    with pytest.raises(ValueError, match='energy'):
        T.log_density(T.init(T.ToyConfig(8, readout='denoiser'), jax.random.key(0)),
                      T.ToyConfig(8, readout='denoiser'), jnp.zeros((2, 2)), 0.1)
    with pytest.raises(ValueError, match='steps'):
        train.train(train.TrainSpec(steps=0), jax.random.key(0))


def test_learning_rate_schedule():
    lr = training.inverse_sqrt_lr(0.01, 512)
    np.testing.assert_allclose([float(lr(t)) for t in (0, 511, 512, 2048, 4096)],
                               [0.01, 0.01, 0.01, 0.005, 0.01 / np.sqrt(8)], rtol=1e-6)
    warm = training.inverse_sqrt_lr(1.0, 10, warmup=4)
    np.testing.assert_allclose([float(warm(t)) for t in (1, 2, 40)], [0.25, 0.5, 0.5], rtol=1e-6)


def test_denoiser_loss_matches_score_form():
    """σ² · mean (s − ŝ)² = mean (D − D̂)² / σ² (spec §2.2)."""
    rng = np.random.default_rng(0)
    x, d1, d2 = (rng.normal(size=(5, 2)).astype(np.float32) for _ in range(3))
    s = rng.uniform(0.01, 2, 5).astype(np.float32)
    s1, s2 = (d1 - x) / s[:, None] ** 2, (d2 - x) / s[:, None] ** 2
    ref = np.mean(s ** 2 * np.mean((s1 - s2) ** 2, axis=1))
    np.testing.assert_allclose(float(training.denoiser_loss(jnp.asarray(d1), jnp.asarray(d2), 1 / s ** 2)), ref,
                               rtol=1e-4)


def test_edm_loss_pieces():
    """EDM weight λ(σ) = (σ² + σ_d²)/(σσ_d)² and EDM2's uncertainty-weighted loss λ/e^u (D − y)² + u."""
    s = jnp.array([0.1, 1.0, 10.0])
    np.testing.assert_allclose(np.asarray(training.edm_weight(s, 0.5)), [104.0, 5.0, 4.01], rtol=1e-5)
    d = jnp.ones((3, 2, 2)) * jnp.array([1.0, 2.0, 3.0])[:, None, None]
    y = jnp.zeros((3, 2, 2))
    u = jnp.array([0.0, 1.0, -1.0])
    w = jnp.array([1.0, 2.0, 0.5])
    ref = np.mean([1 * 1 / 1 + 0, 2 * 4 / np.e + 1, 0.5 * 9 * np.e - 1])
    np.testing.assert_allclose(float(training.denoiser_loss(d, y, w, logvar=u)), ref, rtol=1e-5)
    sig = training.sample_sigma(jax.random.key(0), 20000, -2.3, 1.5)
    np.testing.assert_allclose([float(jnp.mean(jnp.log(sig))), float(jnp.std(jnp.log(sig)))], [-2.3, 1.5], atol=0.03)


def test_short_training_learns():
    spec = train.TrainSpec('A', T.ToyConfig(16), steps=150, batch=512)
    params, losses, _ = train.train(spec, jax.random.key(0), progress=False)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and losses[-20:].mean() < 0.6 * losses[:5].mean()
    init = T.init(spec.config, jax.random.key(9))
    k = jax.random.key(1)
    assert train.heldout_loss(params, spec.config, 'A', 0.1, k, n=1024) < \
        0.8 * train.heldout_loss(init, spec.config, 'A', 0.1, k, n=1024)


@pytest.fixture(scope='module')
def start():
    return methods.start_points(jax.random.key(0), 2048)


def test_exact_ode_reproduces_exact_samples(start):
    """The sampler with the exact score lands within the exact-vs-exact noise floor."""
    noise, keys = start
    x = methods.sample(methods.Method('exact_ode'), {}, noise, keys)
    ref = M.draw(M.mixture('A'), jax.random.key(1), 2048)
    exact = M.draw(M.mixture('A'), jax.random.key(2), 2048)
    k = jax.random.key(3)
    got, floor = (metrics.evaluate(a, ref, tau=-1.84, key=k) for a in (x, exact))
    assert abs(got['logp_median'] - floor['logp_median']) < 0.1
    assert got['outlier'] < 0.03 and got['escape'] == 0.0
    assert got['branch_tv'] < floor['branch_tv'] + 0.03
    assert got['mmd_02'] < 3e-4 and got['mmd_10'] < 3e-4
    assert got['precision'] > 0.9 and got['recall'] > 0.9


def test_guided_sampling_and_trajectory(start):
    noise, keys = start
    c = T.ToyConfig(8)
    models = {'main': methods.Model(toy_trained_like(c, 0), c),
              'ag': methods.Model(toy_trained_like(c, 1), c)}
    n = 32
    m = methods.Method('mix', registry.terms('autoguidance', 1.0, guide='ag') + registry.terms('insitu', 0.5, 0.1))
    t = methods.time_steps(num_steps=8)
    x = methods.sample(m, models, noise[:n], keys[:n], t)
    traj = methods.sample(m, models, noise[:n], keys[:n], t, trajectory=True)
    assert traj.shape == (9, n, 2)
    np.testing.assert_allclose(np.asarray(traj[0]), np.asarray(noise[:n] * t[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(traj[-1]), np.asarray(x), rtol=1e-4, atol=1e-5)
    # w = 0 terms leave the unguided result
    none = methods.sample(methods.Method('none'), models, noise[:n], keys[:n], t)
    zero = methods.sample(methods.Method('z', (Term(0.0, 'ag'),)), models, noise[:n], keys[:n], t)
    np.testing.assert_allclose(np.asarray(zero), np.asarray(none), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='unknown guide'):
        methods.sample(methods.Method('bad', (Term(1.0, 'cfg'),)), models, noise[:n], keys[:n], t)
    with pytest.raises(ValueError, match='needs a perturbation'):
        methods.sample(methods.Method('bad', (Term(1.0),)), models, noise[:n], keys[:n], t)

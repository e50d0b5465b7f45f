"""The fractal 2-D mixture (edm2_jax.toy.fractal) against the facts measured on the official construction
(toy2d-spec §1), and its exact density/score against independent computations (scipy, autodiff, moments)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from edm2_jax.toy import fractal as M


def moments(mix):
    w = np.asarray(mix.weights, np.float64)
    mu = np.asarray(mix.means, np.float64)
    cov = np.asarray(mix.covs, np.float64)
    mean = w @ mu
    second = np.einsum('k,ki,kj->ij', w, mu, mu) + np.einsum('k,kij->ij', w, cov)
    return mean, second - np.outer(mean, mean)


def test_component_counts_and_order():
    a, b, ab = M.mixture('A'), M.mixture('B'), M.mixture('AB')
    assert a.weights.shape == (1016,) and b.means.shape == (1016, 2) and ab.covs.shape == (2032, 2, 2)
    np.testing.assert_allclose(float(ab.weights.sum()), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ab.means[:1016]), np.asarray(a.means))  # A first
    np.testing.assert_array_equal(np.asarray(ab.means[1016:]), np.asarray(b.means))
    # the class prior inside 'AB' (spec: 0.4770 / 0.5230)
    np.testing.assert_allclose(float(ab.weights[:1016].sum()), 0.4770, atol=5e-4)
    assert np.all(np.diff(a.branch.reshape(-1, 8), axis=1) == 0)   # 8 consecutive per branch
    assert a.branch.max() == 126 and ab.branch.max() == 253


@pytest.mark.parametrize('classes, mean, std', [
    ('A', (0.372, 0.365), (0.333, 0.341)),
    ('B', (-0.339, -0.331), (0.368, 0.375)),
    ('AB', (-0.0001, 0.0006), (0.4999, 0.4999)),
])
def test_class_moments(classes, mean, std):
    m, c = moments(M.mixture(classes))
    np.testing.assert_allclose(m, mean, atol=6e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(c)), std, atol=6e-4)


def test_ab_offdiagonal_covariance():
    np.testing.assert_allclose(moments(M.mixture('AB'))[1][0, 1], 0.088, atol=1e-3)


def test_branch_structure_facts():
    a = M.mixture('A')
    w = np.asarray(a.weights, np.float64)
    depth_mass = np.bincount(a.depth, weights=w)
    np.testing.assert_allclose(depth_mass, [.257, .151, .153, .162, .118, .087, .073], atol=6e-4)
    branch_mass = np.bincount(a.branch, weights=w)
    leaf = branch_mass[np.unique(a.branch[a.depth == 6])]
    assert len(leaf) == 64
    np.testing.assert_allclose([leaf.min(), np.median(leaf), leaf.max()], [7.5e-4, 1.15e-3, 1.57e-3], rtol=0.01)
    ev = np.linalg.eigvalsh(np.asarray(a.covs, np.float64))
    np.testing.assert_allclose([np.sqrt(ev.max()), np.sqrt(ev.min())], [0.0217, 0.0039], atol=6e-5)
    mu = np.asarray(a.means)
    np.testing.assert_allclose([mu[:, 0].min(), mu[:, 1].min(), mu[:, 0].max(), mu[:, 1].max()],
                               [-0.48, -0.61, 1.28, 1.45], atol=0.006)


def test_exact_sample_log_density_facts():
    a, b = M.mixture('A'), M.mixture('B')
    x = M.draw(a, jax.random.key(0), 1 << 16)
    lp = np.asarray(jax.jit(M.log_prob)(a, x))
    assert abs(lp.mean() - 1.352) < 0.03
    q = np.quantile(lp, [0.01, 0.05, 0.5, 0.95])
    np.testing.assert_allclose(q, [-1.84, -0.53, 1.45, 2.83], atol=0.08)
    wrong = np.mean(np.asarray(jax.jit(M.log_prob)(b, x)) > lp)
    assert abs(wrong - 0.0042) < 0.0015


@pytest.mark.parametrize('sigma', [0.0, 0.05, 0.7])
def test_log_prob_matches_scipy(sigma):
    mix = M.mixture('A')
    x = np.array([[0.3, 0.4], [0.9, 1.1], [-0.2, 0.1], [0.5, 0.5], [3.0, -2.0]], np.float32)
    w, mu, cov = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.covs))
    # independent float64 evaluation: numpy inverse/determinant of every noisy covariance
    c = cov + sigma ** 2 * np.eye(2)
    d = x[:4, None, :].astype(np.float64) - mu[None]
    q = np.einsum('nki,kij,nkj->nk', d, np.linalg.inv(c), d)
    ref = np.log(np.sum(w / (2 * np.pi * np.sqrt(np.linalg.det(c))) * np.exp(-0.5 * q), axis=1))
    k = int(np.argmax(w))
    np.testing.assert_allclose(np.exp(-0.5 * q[0, k]) / (2 * np.pi * np.sqrt(np.linalg.det(c[k]))),
                               multivariate_normal(mu[k], c[k]).pdf(x[0]), rtol=1e-9)
    got = np.asarray(M.log_prob(mix, jnp.asarray(x), sigma))
    np.testing.assert_allclose(got[:4], ref, rtol=2e-5, atol=2e-5)
    assert np.isfinite(got[4])   # far away: finite (log-sum-exp), not -inf


def test_score_equals_autodiff_of_log_density():
    mix = M.mixture('AB')
    key = jax.random.key(1)
    x = jax.random.normal(key, (300, 2)) * 0.6
    sigma = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1), (300,), minval=-5, maxval=1))
    # rows are independent, so the gradient of the sum is every row's own gradient
    auto = jax.jit(jax.grad(lambda p: jnp.sum(M.log_prob(mix, p, sigma))))(x)
    got = jax.jit(M.score)(mix, x, sigma)
    np.testing.assert_allclose(np.asarray(got), np.asarray(auto), rtol=2e-3, atol=2e-3 * float(jnp.abs(auto).max()))
    far = M.score(mix, jnp.array([[50.0, -40.0]]), 0.002)
    assert np.all(np.isfinite(np.asarray(far)))


def test_chunked_evaluation_matches_unchunked():
    mix = M.mixture('A')
    x = jax.random.normal(jax.random.key(2), (M.CHUNK * 2 + 37, 2))
    s = 0.1
    whole = jax.jit(lambda x: jax.nn.logsumexp(M._component_terms(mix, x, s)[0], axis=1))(x)
    np.testing.assert_allclose(np.asarray(jax.jit(M.log_prob)(mix, x, s)), np.asarray(whole), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('sigma', [0.0, 0.3])
def test_noisy_sampling_moments(sigma):
    mix = M.mixture('A')
    mean, cov = moments(mix)
    x = np.asarray(M.draw(mix, jax.random.key(3), 1 << 17, sigma), np.float64)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.006)
    np.testing.assert_allclose(np.cov(x.T), cov + sigma ** 2 * np.eye(2), atol=0.006)


def test_denoiser_is_posterior_mean():
    """E[x0 | x] by Monte Carlo: draw (x0, x = x0 + σε), bin by x; compare with the exact D on the bin."""
    mix = M.mixture('A')
    sigma = 0.2
    x0 = M.draw(mix, jax.random.key(4), 1 << 16)
    x = x0 + sigma * jax.random.normal(jax.random.key(5), x0.shape)
    d = jax.jit(M.denoise)(mix, x, sigma)
    # Tweedie: E[D(x)] = E[x0], E[(x0 − D)·D] = 0 and E[(x0 − D)·x] = 0 (D is the conditional mean)
    np.testing.assert_allclose(np.asarray(d.mean(0)), np.asarray(x0.mean(0)), atol=2e-3)
    assert abs(float(jnp.mean(jnp.sum((x0 - d) * d, axis=1)))) < 1e-3
    assert abs(float(jnp.mean(jnp.sum((x0 - d) * x, axis=1)))) < 1e-3
    # and a wrong denoiser (the exact one at another σ) fails the same check
    d_wrong = jax.jit(M.denoise)(mix, x, 0.1)
    assert abs(float(jnp.mean(jnp.sum((x0 - d_wrong) * x, axis=1)))) > 5e-3


def test_bad_classes():
    with pytest.raises(ValueError, match='classes'):
        M.mixture('C')


def test_package_level_api():
    import edm2_jax.toy as toy
    mix = toy.mixture('AB')
    assert mix.weights.shape == (2032,) and mix.means.shape == (2032, 2) and mix.covs.shape == (2032, 2, 2)
    np.testing.assert_array_equal(np.asarray(mix.covs), np.asarray(M.mixture('AB').covs))
    assert np.all(np.asarray(mix.covs)[:, 0, 1] == np.asarray(mix.covs)[:, 1, 0])   # symmetric
    assert np.all(np.linalg.eigvalsh(np.asarray(mix.covs, np.float64)) > 0)          # positive definite

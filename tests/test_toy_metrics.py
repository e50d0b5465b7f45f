"""Toy metrics against closed forms and brute-force computations."""
import math

import jax
import numpy as np
import pytest

from edm2_jax.metrics.prdc import precision_recall
from edm2_jax.toy import metrics as K
from edm2_jax.toy import fractal as M


def test_knn_entropy_closed_forms():
    rng = np.random.default_rng(0)
    assert abs(K.knn_entropy(rng.uniform(size=(8000, 2)))) < 0.05            # uniform unit square: 0
    s = 0.3
    gauss = rng.normal(scale=s, size=(8000, 2))
    assert abs(K.knn_entropy(gauss) - math.log(2 * math.pi * math.e * s * s)) < 0.05


def test_mmd_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2)).astype(np.float32) * 0.1
    y = (rng.normal(size=(40, 2)) * 0.1 + 0.05).astype(np.float32)
    for h, got in zip((0.02, 0.1), K.mmd2(x, y)):
        k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * h * h))  # noqa: E731
        n = len(x)
        kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
        np.testing.assert_allclose(got, kxx + kyy - 2 * kxy, rtol=1e-4, atol=1e-6)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    gen = rng.normal(size=(300, 2)) * 0.5 + 0.3
    ref = rng.normal(size=(250, 2)) * 0.4

    def covered(q, c, k=3):
        dc = np.linalg.norm(c[:, None] - c[None], axis=-1)
        rad = np.sort(dc, axis=1)[:, k]
        return np.mean(np.any(np.linalg.norm(q[:, None] - c[None], axis=-1) <= rad[None], axis=1))
    pr = precision_recall(ref, gen)
    p, r = pr['precision'], pr['recall']
    assert p == pytest.approx(covered(gen, ref)) and r == pytest.approx(covered(ref, gen))


def test_sliced_wasserstein_of_a_shift():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 2)).astype(np.float32)
    v = np.array([0.3, -0.4], np.float32)
    # W2 between projections of x and x + v is |v·d|; the mean of (v·d)² over directions is |v|²/2
    got = K.sliced_wasserstein(x, x + v, jax.random.key(0), num_directions=4096)
    assert abs(got - 0.5 / math.sqrt(2)) < 0.01


def test_degenerate_sample_sets():
    mix = M.mixture('A')
    ref = M.draw(mix, jax.random.key(0), 4096)
    means = np.asarray(mix.means)
    collapsed = np.repeat(means[:1], 4096, axis=0) + 1e-4 * np.random.default_rng(0).normal(size=(4096, 2))
    r = K.evaluate(collapsed, ref, tau=-1.84, key=jax.random.key(1))
    trunk_mass = float(np.asarray(mix.weights)[mix.branch == 0].sum())
    assert r['branch_tv'] == pytest.approx(1 - trunk_mass, abs=1e-6)
    assert r['leaf_recall'] == 0.0 and r['outlier'] == 0.0 and r['escape'] == 0.0
    assert r['kl_clip'] > 5 and r['recall'] < 0.05
    far = np.full((512, 2), 7.0, np.float32)
    far[0] = np.nan                                         # non-finite samples count as escapes
    r = K.evaluate(far, ref, tau=-1.84, key=jax.random.key(1))
    assert r['escape'] == 1.0 and r['outlier'] == 1.0 and r['far'] == 1.0
    assert r['logp_clip_mean'] == K.LOGP_CLIP
    with pytest.raises(ValueError, match=r'\[N, 2\]'):
        K.evaluate(np.zeros((5, 3)), ref, tau=-1.84, key=jax.random.key(1))

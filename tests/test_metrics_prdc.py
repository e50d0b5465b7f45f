"""k-NN precision/recall against a brute-force count written out from the definition."""
import numpy as np
import pytest

from edm2_jax.metrics.prdc import knn_radii, precision_recall


def brute_force(real, fake, k):
    def radius(points, i):
        d = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]
    def covered(q, points):
        return any(np.linalg.norm(q - p) <= radius(points, i) for i, p in enumerate(points))
    return (np.mean([covered(q, real) for q in fake]), np.mean([covered(r, fake) for r in real]))


def test_matches_brute_force_and_limits():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((40, 3)), 1.5 + 0.7 * rng.standard_normal((30, 3))
    pr = precision_recall(real, fake, k=3, block=7)
    assert (pr['precision'], pr['recall']) == pytest.approx(brute_force(real, fake, 3))
    assert 0 < pr['precision'] < 1 and 0 < pr['recall'] < 1
    assert precision_recall(real, real, k=2) == {'precision': 1.0, 'recall': 1.0}
    assert precision_recall(real, real + 100, k=2) == {'precision': 0.0, 'recall': 0.0}
    np.testing.assert_allclose(knn_radii(np.array([[0.], [1.], [3.]]), 1), [1., 1., 4.])
    with pytest.raises(ValueError, match='k must be'):
        knn_radii(real[:3], 3)

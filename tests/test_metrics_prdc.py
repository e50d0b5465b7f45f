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


@pytest.mark.parametrize('dim', [2, 16])   # the k-d tree and the blocked-distance search
def test_both_searches_match_brute_force(dim):
    rng = np.random.default_rng(dim)
    real, fake = rng.standard_normal((35, dim)), 0.5 + rng.standard_normal((25, dim))
    fake[3] = fake[4]                         # a duplicate is a neighbour at distance 0
    pr = precision_recall(real, fake, k=2, block=6)
    assert (pr['precision'], pr['recall']) == pytest.approx(brute_force(real, fake, 2))


def test_feature_shape_error_names_the_arguments():
    with pytest.raises(ValueError, match=r'real, fake: features must be \[N, D\] with equal D'):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))

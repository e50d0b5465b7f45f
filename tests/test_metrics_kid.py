"""KID against the MMD² formula written out here in NumPy, and its unbiasedness."""
import numpy as np
import pytest

from edm2_jax.metrics.kid import kid, mmd2_unbiased


def formula(x, y):
    """(1/(m(m−1)))Σ_{i≠j}k(x_i,x_j) + (1/(n(n−1)))Σ_{i≠j}k(y_i,y_j) − (2/(mn))Σ k(x_i,y_j)."""
    d = x.shape[1]
    k = lambda a, b: (np.einsum('id,jd->ij', a, b) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    off = lambda g: g[~np.eye(len(g), dtype=bool)].sum()  # noqa: E731
    return off(k(x, x)) / (m * (m - 1)) + off(k(y, y)) / (n * (n - 1)) - 2 * k(x, y).sum() / (m * n)


def test_matches_formula_with_blocks_and_unequal_sizes():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((37, 5)), 0.3 + rng.standard_normal((23, 5))
    assert mmd2_unbiased(x, y, block=4) == pytest.approx(formula(x, y), rel=1e-12)
    # one subset holding every row: a permutation of the sets, the same estimate
    assert kid(x[:23], y, num_subsets=1, subset_size=100)['kid'] == pytest.approx(formula(x[:23], y), rel=1e-12)


def test_subsets_are_seeded_and_averaged():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((60, 4)).astype(np.float32), 0.5 + rng.standard_normal((50, 4))
    a, b = kid(x, y, num_subsets=7, subset_size=20, seed=3), kid(x, y, num_subsets=7, subset_size=20, seed=3)
    assert a == b and a != kid(x, y, num_subsets=7, subset_size=20, seed=4)
    r = np.random.default_rng(3)                     # the documented draw, replayed
    vals = [formula(x[r.choice(60, 20, replace=False)].astype(np.float64), y[r.choice(50, 20, replace=False)])
            for _ in range(7)]
    assert a['kid'] == pytest.approx(np.mean(vals), rel=1e-10)
    assert a['kid_std'] == pytest.approx(np.std(vals, ddof=1), rel=1e-10)
    assert a['kid'] > 5 * a['kid_std'] / np.sqrt(7)   # a shifted set is detected


def test_identical_sets_score_about_zero():
    x = np.random.default_rng(2).standard_normal((400, 8))
    r = kid(x, x, num_subsets=50, subset_size=100)
    shifted = kid(x, x + 0.5, num_subsets=50, subset_size=100)
    assert abs(r['kid']) < r['kid_std']     # subsets sharing rows lean slightly negative
    assert kid(x, x, num_subsets=1, subset_size=400)['kid'] == pytest.approx(formula(x, x), rel=1e-12)
    assert abs(r['kid']) < 0.05 * shifted['kid']


def test_unbiased_for_two_samples_of_one_distribution():
    """E[MMD²_u] = 0: the mean over independent replicates is within 4 standard errors of 0, while
    the biased (V-statistic) estimate, diagonal included, is not — so this test can fail."""
    rng = np.random.default_rng(3)
    m, reps = 30, 400
    pairs = [(rng.standard_normal((m, 3)), rng.standard_normal((m, 3))) for _ in range(reps)]
    unbiased = np.array([mmd2_unbiased(x, y) for x, y in pairs])
    assert abs(unbiased.mean()) < 4 * unbiased.std(ddof=1) / np.sqrt(reps)
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    biased = np.array([k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean() for x, y in pairs])
    assert biased.mean() > 4 * biased.std(ddof=1) / np.sqrt(reps)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r'real, fake: features must be \[N, D\]'):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match='fake: features contain NaN'):
        kid(np.zeros((5, 3)), np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match='num_subsets'):
        kid(np.zeros((5, 3)), np.zeros((5, 3)), num_subsets=0)

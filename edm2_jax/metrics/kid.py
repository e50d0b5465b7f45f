"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² between two feature sets under
the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, averaged over random subsets.

  MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_{i,j} k(x_i, y_j)/(mn)

Subsets (the common practice): `num_subsets` (100) pairs of `subset_size` (1,000, or the smaller set's
size) rows, each drawn without replacement from its set by np.random.default_rng(seed). Returned: the
mean over subsets ('kid') and their standard deviation ('kid_std', ddof = 1: the spread of one subset's
estimate; the standard error of the mean is kid_std/√num_subsets). Its expectation is 0 for two samples
of one distribution, so small negative values are normal.

Memory: only a subset's rows are cast to float64, and the kernel sums run over `block` rows at a
time (O(block · subset_size)), so 50,000 × 2,048 features cost little beyond the inputs.
"""
from __future__ import annotations

import numpy as np

from edm2_jax.errors import UserError


def kernel(a, b) -> np.ndarray:
    """[len(a), len(b)] matrix of (a_i·b_j/d + 1)³ in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g = a @ b.T
    g /= a.shape[1]
    g += 1.0
    return g * g * g


def kernel_diagonal(a) -> np.ndarray:
    """k(a_i, a_i) = (|a_i|²/d + 1)³."""
    a = np.asarray(a, np.float64)
    return (np.einsum('ij,ij->i', a, a) / a.shape[1] + 1.0) ** 3


def kernel_row_sums(a, b, block: int = 1024) -> np.ndarray:
    """Σ_j k(a_i, b_j) for every i, `block` rows of a at a time."""
    return np.concatenate([kernel(a[s:s + block], b).sum(axis=1) for s in range(0, len(a), block)])


def within_mean(a, block: int = 1024) -> float:
    """Σ_{i≠j} k(a_i, a_j) / (m(m − 1)): the mean kernel over pairs of distinct rows of one set."""
    a = np.asarray(a, np.float64)
    m = len(a)
    return float((kernel_row_sums(a, a, block).sum() - kernel_diagonal(a).sum()) / (m * (m - 1)))


def mmd2_unbiased(x, y, block: int = 1024) -> float:
    """The unbiased MMD² estimate between all rows of x and all rows of y (formula above)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    kxy = kernel_row_sums(x, y, block).sum() / (len(x) * len(y))
    return within_mean(x, block) + within_mean(y, block) - 2 * kxy


def standardize(features, mu, sigma) -> np.ndarray:
    """(x − μ)/√diag Σ per dimension, (μ, Σ) the reference statistics: for feature spaces far from the
    scale the kernel's /d assumes (Inception's pooled features, x·y/d ≲ 1). A classifier's signed
    penultimate features (|x|²/d ≈ 15 for the Fashion-MNIST evaluator) make the cube's tails dominate:
    KID's spread over subsets then swamps every difference between methods."""
    scale = np.sqrt(np.maximum(np.diagonal(np.asarray(sigma, np.float64)), 1e-12))
    return (np.asarray(features, np.float64) - np.asarray(mu, np.float64)) / scale


def check_features(real, fake) -> tuple[np.ndarray, np.ndarray]:
    """Both [N ≥ 2, D] with the same D and finite (returned as arrays, not copied), or a UserError."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < 2:
        raise UserError(f'features must be [N, D] with equal D and N ≥ 2, got {real.shape} and {fake.shape}',
                        where='real, fake')
    for name, f in (('real', real), ('fake', fake)):
        if not np.isfinite(f).all():
            raise UserError('features contain NaN or inf', where=name, fix='check the images and the detector')
    return real, fake


def kid(real, fake, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        block: int = 1024) -> dict[str, float]:
    """{'kid': mean, 'kid_std': std} of MMD²_u over seeded random subsets (module docstring)."""
    real, fake = check_features(real, fake)
    if num_subsets < 1 or subset_size < 2:
        raise UserError(f'need num_subsets ≥ 1 and subset_size ≥ 2, got {num_subsets} and {subset_size}',
                        where='num_subsets, subset_size')
    size = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                                     fake[rng.choice(len(fake), size, replace=False)], block)
                       for _ in range(num_subsets)])
    return {'kid': float(values.mean()), 'kid_std': float(values.std(ddof=1)) if num_subsets > 1 else 0.0}

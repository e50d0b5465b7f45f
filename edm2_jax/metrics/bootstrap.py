"""Percentile bootstrap 95 % intervals for statistics of a set of generated-image features, and for
the paired difference of two methods evaluated on the same seeds.

A resample draws the n generated rows with replacement, as multiplicities c (Σ c_i = n, the original
set being c = 1) from np.random.default_rng(seed); the reference set and its statistics stay fixed.
A statistic is a function of c, so the common ones need no copies of the rows:
  FD         mean Σ c_i x_i / n, covariance (Σ c_i x_i x_iᵀ − n·μμᵀ)/(n − 1); tr √(S·S_ref) as
             Σ √eig(A·S·A) with A = √S_ref computed once (scipy's sqrtm costs seconds at d = 128)
  KID        MMD²_u over pairs of distinct original rows, Σ_{i≠j} c_i c_j k_ij / Σ_{i≠j} c_i c_j for
             the generated term (copies of one row are not a pair: no upward bias), all rows of the
             reference; from the generated kernel matrix (n ≤ MAX_ROWS) and reference row sums
  precision  Σ c_i·[x_i in the real manifold] / n
  recall     real points inside the manifold of the distinct resampled rows (a copy adds no volume;
             each radius is the k-th nearest other distinct resampled row). Counting copies as
             neighbours at distance 0 would shrink the radii and bias recall by −0.1 (measured,
             1,000 × 64-d normal features); the distinct-row form was within +0.01.
Paired: the same c for both methods, row i of each being the image of seed i; the interval of
a(c) − b(c) is narrower than the unpaired one when the methods are positively correlated.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np

from edm2_jax.errors import UserError
from edm2_jax.metrics import kid as kid_lib
from edm2_jax.metrics import prdc

MAX_ROWS = 10_000          # generated rows for the n × n kernel / distance matrices (0.8 GB each in float64)
Statistic = Callable[[np.ndarray], float]


class Interval(NamedTuple):
    value: float           # the statistic of the original set (c = 1)
    low: float
    high: float


def replicates(statistics: Mapping[str, Statistic], n: int, num_resamples: int = 1000,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Each statistic on the same `num_resamples` resamples of n rows: name → float64 [num_resamples]."""
    if n < 2 or num_resamples < 2:
        raise UserError(f'need n ≥ 2 rows and num_resamples ≥ 2, got {n} and {num_resamples}',
                        where='num_resamples')
    rng = np.random.default_rng(seed)
    out = {name: np.empty(num_resamples) for name in statistics}
    for b in range(num_resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        for name, statistic in statistics.items():
            out[name][b] = statistic(counts)
    return out


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    low, high = np.quantile(np.asarray(values), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap(statistics: Mapping[str, Statistic], n: int, *, num_resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Interval]:
    """name → Interval(value, low, high) of each statistic over the same resamples."""
    reps = replicates(statistics, n, num_resamples, seed)
    ones = np.ones(n, np.int64)
    return {name: Interval(float(f(ones)), *percentile_interval(reps[name], level))
            for name, f in statistics.items()}


def paired_difference(statistics_a: Mapping[str, Statistic], statistics_b: Mapping[str, Statistic],
                      n: int, *, num_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Interval]:
    """name → Interval of a − b, both methods resampled with the same rows (the same seeds)."""
    if set(statistics_a) != set(statistics_b):
        raise UserError(f'the methods have different statistics: {sorted(statistics_a)} vs '
                        f'{sorted(statistics_b)}', where='statistics_b')
    diffs = {name: (lambda c, a=statistics_a[name], b=statistics_b[name]: a(c) - b(c)) for name in statistics_a}
    return bootstrap(diffs, n, num_resamples=num_resamples, seed=seed, level=level)


# ------------------------------------------------------------------------------------ statistics

def fd_statistic(features, ref_mu, ref_sigma) -> Statistic:
    """|μ − μ_ref|² + tr S + tr S_ref − 2 Σ √eig(A·S·A), A = √S_ref (eig(A·S·A) = eig(S·S_ref)).
    With y_i = A x_i computed once, A·S·A is the weighted covariance of the y_i: one d×d product and
    one symmetric eigendecomposition per resample."""
    f = np.asarray(features, np.float64)
    ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    w, v = np.linalg.eigh(ref_sigma)
    y = f @ ((v * np.sqrt(np.maximum(w, 0))) @ v.T)
    sq_norms = np.einsum('ij,ij->i', f, f)
    trace_ref = np.trace(ref_sigma)

    def fd(c):
        c = np.asarray(c, np.float64)
        n = c.sum()
        mu, y_mean = c @ f / n, c @ y / n
        trace = (c @ sq_norms - n * mu @ mu) / (n - 1)
        eig = np.linalg.eigvalsh(((y * c[:, None]).T @ y - n * np.outer(y_mean, y_mean)) / (n - 1))
        return float(np.sum(np.square(mu - ref_mu)) + trace + trace_ref - 2 * np.sqrt(np.maximum(eig, 0)).sum())
    return fd


def _check_rows(features, what: str):
    if len(features) > MAX_ROWS:
        raise UserError(f'{len(features)} generated rows need a {len(features)}² matrix for the {what} '
                        f'bootstrap', where='features', fix=f'bootstrap a subset of at most {MAX_ROWS} rows')


def kid_statistic(real, fake, block: int = 1024) -> Statistic:
    """MMD²_u of the resampled generated rows (pairs of distinct original rows) against all reference
    rows. Set-up cost O((n² + nm + m²)·d) once: keep the reference to about 10,000 rows."""
    y, x = kid_lib.check_features(real, fake)
    _check_rows(x, 'KID')
    n, m = len(x), len(y)
    gram = np.empty((n, n))
    for s in range(0, n, block):
        gram[s:s + block] = kid_lib.kernel(x[s:s + block], x)
    diag = np.diagonal(gram).copy()
    kxy = kid_lib.kernel_row_sums(x, y, block) / (n * m)
    kyy = (kid_lib.kernel_row_sums(y, y, block).sum() - kid_lib.kernel_diagonal(y).sum()) / (m * (m - 1))
    return lambda c: float((c @ gram @ c - c * c @ diag) / (n * n - c @ c) + kyy - 2 * c @ kxy)


def precision_recall_statistics(real, fake, k: int = 3, block: int = 1024) -> dict[str, Statistic]:
    """{'precision', 'recall'} of the resampled fake set against the fixed real set. Holds m×n and
    two n×n matrices (≈ 8·(m + 2n)·n bytes); the blocked distances are prdc's, so above
    prdc.KD_TREE_MAX_DIM dimensions c = 1 gives prdc.precision_recall exactly."""
    real, fake = prdc.check_features(real, fake)
    _check_rows(fake, 'precision/recall')
    if not 1 <= k < len(fake):
        raise UserError(f'k must be in [1, {len(fake) - 1}] for {len(fake)} points, got {k}', where='k')
    fake_in_real = prdc.inside(fake, real, prdc.knn_radii(real, k, block), block)
    to_fake = prdc.sq_dists(real, fake, block)       # blocked as in prdc: the same floats
    between = prdc.sq_dists(fake, fake, block)
    np.fill_diagonal(between, -1.0)           # each row's own point first, then its neighbours
    order = np.argsort(between, axis=1)[:, 1:].astype(np.int32)
    sorted_dists = np.take_along_axis(between, order, axis=1)

    def recall(c):
        used = c > 0           # radius: the k-th nearest other used row along each sorted row
        position = np.argmax(np.cumsum(used[order[used]], axis=1) >= k, axis=1)
        radii = sorted_dists[used][np.arange(used.sum()), position]
        return float((to_fake[:, used] <= radii).any(axis=1).mean())

    return {'precision': lambda c: float(c @ fake_in_real / c.sum()), 'recall': recall}


def feature_statistics(real, fake, *, k: int = 3, ref_mu=None, ref_sigma=None,
                       block: int = 1024) -> dict[str, Statistic]:
    """{'fd', 'kid', 'precision', 'recall'} of the generated rows `fake` against the reference rows
    `real`; FD against (ref_mu, ref_sigma) when given (e.g. EDM2 refs), else the real rows' own."""
    real, fake = prdc.check_features(real, fake)
    if ref_mu is None:
        ref_mu, ref_sigma = real.mean(axis=0), np.cov(real, rowvar=False)
    return {'fd': fd_statistic(fake, ref_mu, ref_sigma), 'kid': kid_statistic(real, fake, block),
            **precision_recall_statistics(real, fake, k, block)}

"""Percentile bootstrap 95 % intervals for statistics of a set of generated-image features, and for
the paired difference of two methods evaluated on the same seeds.

A resample draws the n generated rows with replacement, as multiplicities c (Σ c_i = n, the original
set being c = 1) from np.random.default_rng(seed); the reference set and its statistics stay fixed.
A statistic is a function of c, so the common ones need no copies of the rows:
  FD         mean Σ c_i x_i / n, covariance Σ c_i (x_i − μ)(x_i − μ)ᵀ/(n − 1); tr √(S·S_ref) as
             Σ √eig(A·S·A) with A = √S_ref computed once (scipy's sqrtm costs seconds at d = 128)
  KID        MMD²_u over pairs of distinct original rows, Σ_{i≠j} c_i c_j k_ij / Σ_{i≠j} c_i c_j for
             the generated term (copies of one row are not a pair: no upward bias), all rows of the
             reference; from the generated kernel matrix (n ≤ MAX_ROWS) and reference row sums
  precision  Σ c_i·[x_i in the real manifold] / n
  recall     real points inside the manifold of the distinct resampled rows (a copy adds no volume;
             each radius is the k-th nearest other distinct resampled row). Counting copies as
             neighbours at distance 0 would shrink the radii and bias recall by −0.1 (measured,
             1,000 × 64-d normal features); the distinct-row form was within +0.01. A radius is
             the p-th nearest other row for a small p (about k/0.63), so the (real, fake) pairs
             inside fake i's ball at its RADIUS_POSITIONS nearest radii are listed once with the
             smallest p that contains them; a resample then only compares p_i with those ranks
             (the full m × n check when a row's radius lies beyond them): 40 → 4 ms per resample
             of 2,000 rows against 2,000 reference rows.
Paired: the same c for both methods, row i of each being the image of seed i; the interval of
a(c) − b(c) is narrower than the unpaired one when the methods are positively correlated.
Stratified: with n = (n_1, …, n_S), e.g. S seed sets, each resample draws n_s rows within set s
(c is the sets' multiplicities, concatenated), and `mean_over_strata` makes the statistic the mean
of a per-set statistic over the sets. With a fixed seed every caller draws the same c sequence.
The reference terms every generated set shares (k-NN radii, the KID reference term) are computed
once per reference set (`reference`), not per generated set.
"""
from __future__ import annotations

import statistics as statistics_lib
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from edm2_jax.errors import UserError
from edm2_jax.metrics import kid as kid_lib
from edm2_jax.metrics import prdc

MAX_ROWS = 10_000          # generated rows for the n × n kernel / distance matrices (0.8 GB each in float64)
RADIUS_POSITIONS = 64      # recall: ranks listed for radii up to the 64th nearest other row
Statistic = Callable[[np.ndarray], float]


class Interval(NamedTuple):
    value: float           # the statistic of the original set (c = 1)
    low: float
    high: float


def _strata(n) -> tuple[int, ...]:
    return tuple(int(v) for v in np.atleast_1d(n))


def resample_counts(rng: np.random.Generator, n) -> np.ndarray:
    """Multiplicities of one resample: n_s rows drawn with replacement within each stratum s."""
    return np.concatenate([np.bincount(rng.integers(0, m, m), minlength=m) for m in _strata(n)])


def replicates(statistics: Mapping[str, Statistic], n: int | Sequence[int], num_resamples: int = 1000,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Each statistic on the same `num_resamples` resamples of n rows (or of strata of n_s rows):
    name → float64 [num_resamples]."""
    if min(_strata(n)) < 2 or num_resamples < 2:
        raise UserError(f'need n ≥ 2 rows per stratum and num_resamples ≥ 2, got {n} and {num_resamples}',
                        where='num_resamples')
    rng = np.random.default_rng(seed)
    out = {name: np.empty(num_resamples) for name in statistics}
    for b in range(num_resamples):
        counts = resample_counts(rng, n)
        for name, statistic in statistics.items():
            out[name][b] = statistic(counts)
    return out


def mean_over_strata(per_stratum: Sequence[Statistic], n: Sequence[int]) -> Statistic:
    """c → the mean over strata s of per_stratum[s](c_s), c_s being stratum s's part of c."""
    edges = np.cumsum((0,) + _strata(n))
    if len(per_stratum) != len(edges) - 1:
        raise UserError(f'{len(per_stratum)} statistics for {len(edges) - 1} strata', where='per_stratum')
    return lambda c: float(np.mean([f(c[a:b]) for f, a, b in zip(per_stratum, edges[:-1], edges[1:])]))


def normal_interval(value: float, values, level: float = 0.95) -> tuple[float, float]:
    """value ∓ z·(the replicates' standard deviation): for a statistic whose bootstrap distribution
    is shifted by its own small-sample bias (FD's is upward, by about its value at n = 500), where the
    percentile interval need not contain the value."""
    z = statistics_lib.NormalDist().inv_cdf((1 + level) / 2)
    half = z * float(np.std(np.asarray(values), ddof=1))
    return value - half, value + half


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    low, high = np.quantile(np.asarray(values), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap(statistics: Mapping[str, Statistic], n: int | Sequence[int], *, num_resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """name → Interval(value, low, high) of each statistic over the same resamples."""
    reps = replicates(statistics, n, num_resamples, seed)
    ones = np.ones(sum(_strata(n)), np.int64)
    return {name: Interval(float(f(ones)), *percentile_interval(reps[name], level))
            for name, f in statistics.items()}


def paired_difference(statistics_a: Mapping[str, Statistic], statistics_b: Mapping[str, Statistic],
                      n: int | Sequence[int], *, num_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Interval]:
    """name → Interval of a − b, both methods resampled with the same rows (the same seeds)."""
    if set(statistics_a) != set(statistics_b):
        raise UserError(f'the methods have different statistics: {sorted(statistics_a)} vs '
                        f'{sorted(statistics_b)}', where='statistics_b')
    diffs = {name: (lambda c, a=statistics_a[name], b=statistics_b[name]: a(c) - b(c)) for name in statistics_a}
    return bootstrap(diffs, n, num_resamples=num_resamples, seed=seed, level=level)


# ------------------------------------------------------------------------------------ statistics

def sqrt_psd(sigma) -> np.ndarray:
    """The symmetric square root of a covariance (negative eigenvalues from rounding clipped to 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.maximum(w, 0))) @ v.T


def fd_statistic(features, ref_mu, ref_sigma, *, ref_sqrt=None) -> Statistic:
    """|μ − μ_ref|² + tr S + tr S_ref − 2 Σ √eig(A·S·A), A = √S_ref (eig(A·S·A) = eig(S·S_ref); ref_sqrt:
    A when already known). With y_i = A x_i computed once, A·S·A = MᵀM, M's rows √(c_i/(n−1))·(y_i − ȳ)
    over the drawn rows: one symmetric eigendecomposition of MᵀM, or of the smaller M·Mᵀ (the same
    nonzero eigenvalues) when fewer rows than dimensions are drawn."""
    f = np.asarray(features, np.float64)
    ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    y = f @ (sqrt_psd(ref_sigma) if ref_sqrt is None else ref_sqrt)
    sq_norms = np.einsum('ij,ij->i', f, f)
    trace_ref = np.trace(ref_sigma)

    def fd(c):
        c = np.asarray(c, np.float64)
        n = c.sum()
        mu = c @ f / n
        trace = (c @ sq_norms - n * mu @ mu) / (n - 1)
        used = c > 0
        m = (y[used] - c @ y / n) * np.sqrt(c[used] / (n - 1))[:, None]
        eig = np.linalg.eigvalsh(m @ m.T if len(m) < m.shape[1] else m.T @ m)
        return float(np.sum(np.square(mu - ref_mu)) + trace + trace_ref - 2 * np.sqrt(np.maximum(eig, 0)).sum())
    return fd


def _check_rows(features, what: str):
    if len(features) > MAX_ROWS:
        raise UserError(f'{len(features)} generated rows need a {len(features)}² matrix for the {what} '
                        f'bootstrap', where='features', fix=f'bootstrap a subset of at most {MAX_ROWS} rows')


def kid_statistic(real, fake, block: int = 1024, *, kyy: float | None = None) -> Statistic:
    """MMD²_u of the resampled generated rows (pairs of distinct original rows) against all reference
    rows. Set-up cost O((n² + nm)·d), plus O(m²·d) for the reference term unless given (`kyy`, from
    `kid.within_mean`): keep the reference to about 10,000 rows."""
    y, x = kid_lib.check_features(real, fake)
    _check_rows(x, 'KID')
    n, m = len(x), len(y)
    gram = np.empty((n, n))
    for s in range(0, n, block):
        gram[s:s + block] = kid_lib.kernel(x[s:s + block], x)
    diag = np.diagonal(gram).copy()
    kxy = kid_lib.kernel_row_sums(x, y, block) / (n * m)
    kyy = kid_lib.within_mean(y, block) if kyy is None else kyy
    return lambda c: float((c @ gram @ c - c * c @ diag) / (n * n - c @ c) + kyy - 2 * c @ kxy)


def precision_recall_statistics(real, fake, k: int = 3, block: int = 1024, *,
                                radii=None) -> dict[str, Statistic]:
    """{'precision', 'recall'} of the resampled fake set against the fixed real set. Holds m×n and
    two n×n matrices (≈ 8·(m + 2n)·n bytes); the blocked distances are prdc's, so above
    prdc.KD_TREE_MAX_DIM dimensions c = 1 gives prdc.precision_recall exactly. radii: the real set's
    `prdc.knn_radii(real, k)` when already known (O(m²·d) otherwise)."""
    real, fake = prdc.check_features(real, fake)
    _check_rows(fake, 'precision/recall')
    if not 1 <= k < len(fake):
        raise UserError(f'k must be in [1, {len(fake) - 1}] for {len(fake)} points, got {k}', where='k')
    radii = prdc.knn_radii(real, k, block) if radii is None else radii
    fake_in_real = prdc.inside(fake, real, radii, block)
    to_fake = prdc.sq_dists(real, fake, block)       # blocked as in prdc: the same floats
    between = prdc.sq_dists(fake, fake, block)
    np.fill_diagonal(between, -1.0)           # each row's own point first, then its neighbours
    order = np.argsort(between, axis=1)[:, 1:].astype(np.int32)
    sorted_dists = np.take_along_axis(between, order, axis=1)
    positions = min(RADIUS_POSITIONS, len(fake) - 1)
    pair_real, pair_fake, pair_rank = _ball_ranks(to_fake, sorted_dists[:, :positions])

    def recall(c):
        used = c > 0           # radius: the k-th nearest other used row along each sorted row
        rows = np.flatnonzero(used)
        found = np.cumsum(used[order[rows, :positions]], axis=1) >= k
        if found[:, -1].all():
            position = np.full(len(c), -1)
            position[rows] = np.argmax(found, axis=1)
            covered = np.zeros(len(to_fake), bool)
            covered[pair_real[position[pair_fake] >= pair_rank]] = True
            return float(covered.mean())
        position = np.argmax(np.cumsum(used[order[used]], axis=1) >= k, axis=1)
        radii = sorted_dists[used][np.arange(len(rows)), position]
        return float((to_fake[:, used] <= radii).any(axis=1).mean())

    return {'precision': lambda c: float(c @ fake_in_real / c.sum()), 'recall': recall}


def _ball_ranks(to_fake, head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real j, fake i, rank) of every pair with d_ji ≤ head[i, −1], rank being the smallest p with
    d_ji ≤ head[i, p] (head: each fake row's sorted squared distances to its nearest other rows), so
    that real j lies in the ball of fake i at radius head[i, p] exactly when p ≥ rank."""
    fake, real = np.nonzero(to_fake.T <= head[:, -1:])        # sorted by fake row
    starts = np.searchsorted(fake, np.arange(len(head) + 1))
    rank = np.concatenate([np.searchsorted(head[i], to_fake[real[a:b], i]) for i, (a, b)
                           in enumerate(zip(starts[:-1], starts[1:]))] + [np.zeros(0, np.int64)])
    return real, fake, rank


class Reference(NamedTuple):
    """A fixed reference set and the terms that every generated set's statistics share."""
    features: np.ndarray   # float64 [m, d]
    mu: np.ndarray         # FD's reference mean and covariance, and the covariance's square root
    sigma: np.ndarray
    sqrt_sigma: np.ndarray
    k: int                 # the neighbourhood size of precision and recall
    radii: np.ndarray      # squared k-NN radii of the reference rows (precision)
    kid_rows: np.ndarray   # the reference rows KID compares with: `kid.standardize`d when kid_standardize
    kyy: float             # the reference term of KID (`kid.within_mean` of kid_rows)
    kid_standardize: bool  # KID on `kid.standardize`d rows (generated rows standardized alike)


def reference(real, *, k: int = 3, ref_mu=None, ref_sigma=None, kid_standardize: bool = False,
              block: int = 1024) -> Reference:
    """The reference rows `real` prepared once; FD against (ref_mu, ref_sigma) when given (e.g. EDM2
    refs), else the real rows' own; KID on rows standardized by them when kid_standardize."""
    real = prdc.check_features(real, real)[0]
    if ref_mu is None:
        ref_mu, ref_sigma = real.mean(axis=0), np.cov(real, rowvar=False)
    mu, sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    kid_rows = kid_lib.standardize(real, mu, sigma) if kid_standardize else np.asarray(real, np.float64)
    return Reference(real, mu, sigma, sqrt_psd(sigma), k, prdc.knn_radii(real, k, block),
                     kid_rows, kid_lib.within_mean(kid_rows, block), kid_standardize)


def statistics(ref: Reference, fake, block: int = 1024) -> dict[str, Statistic]:
    """{'fd', 'kid', 'precision', 'recall'} of the generated rows `fake` against a prepared reference."""
    prdc.check_features(ref.features, fake)
    kid_fake = kid_lib.standardize(fake, ref.mu, ref.sigma) if ref.kid_standardize else fake
    return {'fd': fd_statistic(fake, ref.mu, ref.sigma, ref_sqrt=ref.sqrt_sigma),
            'kid': kid_statistic(ref.kid_rows, kid_fake, block, kyy=ref.kyy),
            **precision_recall_statistics(ref.features, fake, ref.k, block, radii=ref.radii)}


def feature_statistics(real, fake, *, k: int = 3, ref_mu=None, ref_sigma=None,
                       block: int = 1024) -> dict[str, Statistic]:
    """{'fd', 'kid', 'precision', 'recall'} of the generated rows `fake` against the reference rows
    `real` (`reference` + `statistics`)."""
    return statistics(reference(real, k=k, ref_mu=ref_mu, ref_sigma=ref_sigma, block=block), fake, block)

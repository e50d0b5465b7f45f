"""Bootstrap intervals: reproducible, the analytic interval of a mean, paired narrower than unpaired,
and every statistic's multiplicity form equal to the statistic of the explicitly repeated rows."""
import numpy as np
import pytest

from edm2_jax.metrics import bootstrap as B
from edm2_jax.metrics.frechet import frechet_distance
from edm2_jax.metrics.kid import mmd2_unbiased
from edm2_jax.metrics.prdc import precision_recall


def mean_of(x):
    return lambda c: float(c @ x / c.sum())


def test_reproducible_for_a_seed():
    x = np.random.default_rng(0).standard_normal(50)
    a = B.bootstrap({'mean': mean_of(x)}, 50, num_resamples=200, seed=5)
    assert a == B.bootstrap({'mean': mean_of(x)}, 50, num_resamples=200, seed=5)
    assert a != B.bootstrap({'mean': mean_of(x)}, 50, num_resamples=200, seed=6)
    assert a['mean'].value == pytest.approx(x.mean()) and a['mean'].low < x.mean() < a['mean'].high


def test_interval_of_a_mean_is_the_normal_interval_and_covers():
    rng = np.random.default_rng(1)
    n = 200
    x = rng.standard_normal(n)
    got = B.bootstrap({'mean': mean_of(x)}, n, num_resamples=4000)['mean']
    se = x.std() / np.sqrt(n)                 # the bootstrap's plug-in standard error
    assert got.low == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se)
    assert got.high == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se)
    # coverage of the true mean 0 over independent data sets: 95 % ± binomial noise
    hits = []
    for trial in range(200):
        y = rng.standard_normal(60)
        i = B.bootstrap({'mean': mean_of(y)}, 60, num_resamples=300, seed=trial)['mean']
        hits.append(i.low <= 0 <= i.high)
    assert 0.88 <= np.mean(hits) <= 0.99


def test_paired_difference_narrower_than_unpaired():
    rng = np.random.default_rng(2)
    n, d = 300, 4
    a = rng.standard_normal((n, d))
    b = a + 0.1 * rng.standard_normal((n, d)) + 0.2   # the same seeds: strongly correlated
    mu, sigma = np.full(d, 0.5), 2 * np.eye(d)   # away from both: FD moves with the sets' moments
    fa, fb = {'fd': B.fd_statistic(a, mu, sigma)}, {'fd': B.fd_statistic(b, mu, sigma)}
    paired = B.paired_difference(fa, fb, n, num_resamples=300, seed=0)['fd']
    unpaired = B.percentile_interval(B.replicates(fa, n, 300, seed=1)['fd'] - B.replicates(fb, n, 300, seed=2)['fd'])
    assert paired.value == pytest.approx(fa['fd'](np.ones(n)) - fb['fd'](np.ones(n)))
    assert paired.high - paired.low < 0.5 * (unpaired[1] - unpaired[0])


def repeated(x, counts):
    return np.repeat(x, counts, axis=0)


def test_fd_and_kid_of_multiplicities_are_those_of_the_repeated_rows():
    rng = np.random.default_rng(3)
    fake, real = rng.standard_normal((40, 3)), 0.4 + rng.standard_normal((30, 3))
    counts = np.bincount(rng.integers(0, 40, 40), minlength=40)
    r = repeated(fake, counts)
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    fd = np.sum((r.mean(0) - mu) ** 2) + np.trace(np.cov(r, rowvar=False) + sigma) - 2 * np.sum(
        np.sqrt(np.clip(np.linalg.eigvals(np.cov(r, rowvar=False) @ sigma).real, 0, None)))
    assert B.fd_statistic(fake, mu, sigma)(counts) == pytest.approx(fd, rel=1e-8)
    assert B.fd_statistic(fake, mu, sigma)(np.ones(40)) == pytest.approx(
        frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), mu, sigma), rel=1e-8)
    kid = B.kid_statistic(real, fake, block=7)
    assert kid(np.ones(40, np.int64)) == pytest.approx(mmd2_unbiased(fake, real), rel=1e-10)
    # generated term over pairs of positions holding different original rows
    origin = np.repeat(np.arange(40), counts)
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    kxx = k(r, r)[origin[:, None] != origin[None]].mean()
    kyy = k(real, real)[~np.eye(30, dtype=bool)].mean()
    assert kid(counts) == pytest.approx(kxx + kyy - 2 * k(r, real).mean(), rel=1e-10)


def test_precision_recall_of_multiplicities_are_those_of_the_repeated_rows():
    rng = np.random.default_rng(4)
    d, k = 16, 3
    real, fake = rng.standard_normal((50, d)), 0.3 + rng.standard_normal((40, d))
    stats = B.precision_recall_statistics(real, fake, k, block=9)
    ones = np.ones(40, np.int64)
    assert {n: f(ones) for n, f in stats.items()} == precision_recall(real, fake, k)   # exactly

    def brute(real, fake):                   # the definition
        dist = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
        rr, rf = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
        return ((dist(fake, real) <= rr[None] + 1e-12).any(1).mean(),
                (dist(real, fake) <= rf[None] + 1e-12).any(1).mean())
    for trial in range(5):
        draws = rng.integers(0, 40, 40)
        draws[:k + trial] = trial             # many copies of one row
        counts = np.bincount(draws, minlength=40)
        # precision: a mean over the resampled images; recall: the manifold of the distinct rows
        assert stats['precision'](counts) == pytest.approx(brute(real, repeated(fake, counts))[0])
        assert stats['recall'](counts) == pytest.approx(brute(real, fake[counts > 0])[1])


def test_bad_input_is_one_clear_error(monkeypatch):
    x = np.zeros((20, 3))
    with pytest.raises(ValueError, match='different statistics'):
        B.paired_difference({'fd': mean_of(x[:, 0])}, {'kid': mean_of(x[:, 0])}, 20)
    monkeypatch.setattr(B, 'MAX_ROWS', 10)
    with pytest.raises(ValueError, match='at most 10 rows'):
        B.kid_statistic(x, x)
    with pytest.raises(ValueError, match='num_resamples'):
        B.bootstrap({'mean': mean_of(x[:, 0])}, 20, num_resamples=1)


def test_feature_statistics_at_the_original_set():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((60, 12)), 0.2 + rng.standard_normal((30, 12))
    stats = B.feature_statistics(real, fake, k=2)
    ones = np.ones(30, np.int64)
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    assert stats['fd'](ones) == pytest.approx(
        frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), mu, sigma), rel=1e-8)
    assert stats['kid'](ones) == pytest.approx(mmd2_unbiased(fake, real), rel=1e-10)
    assert {n: stats[n](ones) for n in ('precision', 'recall')} == precision_recall(real, fake, 2)
    intervals = B.bootstrap(stats, 30, num_resamples=50)
    assert all(i.low <= i.high for i in intervals.values()) and set(intervals) == set(stats)


def test_stratified_resamples_stay_within_their_sets_and_give_the_normal_interval():
    """Strata (report seed sets): each resample draws n_s rows within set s; the interval of the mean
    over the sets of each set's mean is the normal one with variance Σ σ_s²/n_s / S²."""
    rng = np.random.default_rng(6)
    sizes = (150, 100, 250)
    sets = [rng.normal(loc, scale, n) for loc, scale, n in zip((0.0, 3.0, -1.0), (1.0, 2.0, 0.5), sizes)]
    edges = np.cumsum((0,) + sizes)
    within = {f'sum{s}': (lambda c, a=a, b=b: float(c[a:b].sum())) for s, (a, b) in
              enumerate(zip(edges[:-1], edges[1:]))}
    reps = B.replicates(within, sizes, num_resamples=50, seed=1)
    assert all(np.all(reps[f'sum{s}'] == n) for s, n in enumerate(sizes))
    stat = B.mean_over_strata([mean_of(x) for x in sets], sizes)
    got = B.bootstrap({'m': stat}, sizes, num_resamples=4000, seed=2)['m']
    mean = np.mean([x.mean() for x in sets])
    se = np.sqrt(sum(x.var() / len(x) for x in sets)) / len(sets)
    assert got.value == pytest.approx(mean)
    assert got.low == pytest.approx(mean - 1.96 * se, abs=0.15 * se)
    assert got.high == pytest.approx(mean + 1.96 * se, abs=0.15 * se)
    # one stratum is the plain bootstrap, draw for draw
    x = sets[0]
    assert B.bootstrap({'m': mean_of(x)}, (150,), num_resamples=100, seed=3) == \
        B.bootstrap({'m': mean_of(x)}, 150, num_resamples=100, seed=3)
    with pytest.raises(ValueError, match='strata'):
        B.mean_over_strata([mean_of(x)], sizes)


@pytest.mark.parametrize('positions', [3, 12, 64])
def test_recall_with_few_listed_radii_falls_back_exactly(monkeypatch, positions):
    """The listed-rank recall and its full m × n fallback (taken whenever a radius lies beyond the
    listed positions: nearly always at positions = k, rarely at 12) both equal the definition."""
    monkeypatch.setattr(B, 'RADIUS_POSITIONS', positions)
    rng = np.random.default_rng(7)
    d, k, n = 16, 3, 60
    real, fake = rng.standard_normal((80, d)), 0.3 + rng.standard_normal((n, d))
    recall = B.precision_recall_statistics(real, fake, k, block=13)['recall']
    dist = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    for trial in range(12):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        kept = fake[counts > 0]
        radius = np.sort(dist(kept, kept), 1)[:, k]
        assert recall(counts) == pytest.approx((dist(real, kept) <= radius[None] + 1e-12).any(1).mean())


def test_prepared_reference_gives_the_same_statistics():
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((70, 10)), 0.2 + rng.standard_normal((40, 10))
    mu, sigma = np.zeros(10), np.eye(10)
    ref = B.reference(real, k=2, ref_mu=mu, ref_sigma=sigma)
    got = B.statistics(ref, fake)
    want = {'fd': B.fd_statistic(fake, mu, sigma), 'kid': B.kid_statistic(real, fake),
            **B.precision_recall_statistics(real, fake, 2)}
    for _ in range(3):
        counts = np.bincount(rng.integers(0, 40, 40), minlength=40)
        for name in want:
            assert got[name](counts) == pytest.approx(want[name](counts), rel=1e-12), name
    with pytest.raises(ValueError, match='equal D'):
        B.statistics(ref, fake[:, :5])


def test_standardized_kid_is_the_mmd_of_the_standardized_rows():
    """KID on rows standardized by the reference statistics, (x − μ)/√diag Σ, written here: at c = 1
    the unbiased MMD² with the cubic kernel, all rows; the other statistics as without it."""
    rng = np.random.default_rng(9)
    real, fake = 5 + 3 * rng.standard_normal((60, 6)), 5.5 + 3 * rng.standard_normal((30, 6))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    ref = B.reference(real, k=2, ref_mu=mu, ref_sigma=sigma, kid_standardize=True)
    x, y = ((a - mu) / np.sqrt(np.diag(sigma)) for a in (fake, real))
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3   # noqa: E731
    off = lambda g: (g.sum() - np.trace(g)) / (len(g) * (len(g) - 1))   # noqa: E731
    want = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    got = B.statistics(ref, fake)
    ones = np.ones(30, np.int64)
    assert got['kid'](ones) == pytest.approx(want, rel=1e-9)
    raw = B.statistics(B.reference(real, k=2, ref_mu=mu, ref_sigma=sigma), fake)
    assert abs(raw['kid'](ones) - want) > 1e-3 * abs(want)
    for name in ('fd', 'precision', 'recall'):
        assert got[name](ones) == raw[name](ones)


def test_normal_interval():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    half = 1.959963984540054 * np.std(values, ddof=1)
    assert B.normal_interval(3.0, values) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12)

"""Fréchet distance, float64 feature statistics and EDM2's reference-statistics format."""
import pickle

import numpy as np
import pytest

from edm2_jax.metrics.frechet import FeatureStats, frechet_distance, load_refs, save_refs


def test_statistics_match_numpy_and_merge_across_batches():
    f = np.random.default_rng(0).standard_normal((500, 6)) @ np.diag([1, 2, 3, 0.5, 1, 4])
    whole = FeatureStats(6).add(f.astype(np.float32))
    parts = FeatureStats(6).add(f[:123]).merge(FeatureStats(6).add(f[123:300]).add(f[300:]))
    for stats in (whole, parts):
        mu, sigma = stats.mu_sigma()
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='shape'):
        FeatureStats(6).add(f[:, :5])


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: FD = |mu1-mu2|² + Σ (sqrt(a) - sqrt(b))².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # A general SPD pair, with sqrtm(S1 S2) checked independently: for S2 = c² S1, tr term = (1 - c)² tr S1.
    m = np.random.default_rng(1).standard_normal((5, 5))
    s1 = m @ m.T + np.eye(5)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), 9 * s1) == pytest.approx(4 * np.trace(s1), rel=1e-8)


def test_a_set_with_itself_is_zero():
    f = np.random.default_rng(2).standard_normal((300, 8))
    mu, sigma = FeatureStats(8).add(f).mu_sigma()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_refs_round_trip_and_numpy_only_loading(tmp_path):
    rng = np.random.default_rng(3)
    refs = {'num_images': 50000,
            'fid': {'mu': rng.standard_normal(4), 'sigma': np.eye(4)},
            'fd_dinov2': {'mu': rng.standard_normal(3), 'sigma': 2 * np.eye(3)}}
    save_refs(tmp_path / 'refs.pkl', refs)
    back = load_refs(tmp_path / 'refs.pkl')
    assert back['num_images'] == 50000 and [p.name for p in tmp_path.iterdir()] == ['refs.pkl']
    for metric in ('fid', 'fd_dinov2'):
        for k in ('mu', 'sigma'):
            np.testing.assert_array_equal(back[metric][k], refs[metric][k])
    np.savez(tmp_path / 'legacy.npz', mu=refs['fid']['mu'], sigma=refs['fid']['sigma'])
    np.testing.assert_array_equal(load_refs(tmp_path / 'legacy.npz')['fid']['mu'], refs['fid']['mu'])


def test_malicious_refs_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / 'pwned'), 'w'))
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'fid': Evil()}))
    with pytest.raises(ValueError, match='refusing global'):
        load_refs(tmp_path / 'evil.pkl')
    assert not (tmp_path / 'pwned').exists()
    (tmp_path / 'obj.pkl').write_bytes(pickle.dumps({'fid': {'mu': np.array([None]), 'sigma': np.eye(1)}}))
    with pytest.raises(ValueError, match='object dtype|refusing'):
        load_refs(tmp_path / 'obj.pkl')

"""Power-function EMA: σ_rel ↔ γ check values (edm2-spec §6.1, toy2d-spec §2.3), tracking against the
continuous profile's moments, profile inner products against numerical integration, and post-hoc
reconstruction against a directly tracked EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

from edm2_jax import ema as E


@pytest.mark.parametrize('sigma_rel, gamma', [(0.050, 16.9722), (0.075, 10.2891), (0.100, 6.9372),
                                              (0.130, 4.6036), (0.010, 96.995)])
def test_sigma_rel_to_gamma_check_values(sigma_rel, gamma):
    assert abs(E.sigma_rel_to_gamma(sigma_rel) - gamma) < 1e-3
    assert abs(float(E.gamma_to_sigma_rel(E.sigma_rel_to_gamma(sigma_rel))) - sigma_rel) < 1e-12


def test_sigma_rel_out_of_range():
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match='sigma_rel'):
            E.sigma_rel_to_gamma(bad)


def test_toy_beta_values():
    """toy2d-spec §2.3: β at (0-based) steps 1, 10, 100, 512, 4096 ≈ 0, 8.8e-5, 0.377, 0.826, 0.976."""
    gamma = E.sigma_rel_to_gamma(0.010)
    betas = [float(E.power_beta(t + 1, 1, gamma)) for t in (1, 10, 100, 512, 4096)]
    np.testing.assert_allclose(betas, [0.0, 8.8e-5, 0.377, 0.826, 0.976], atol=2e-3, rtol=0.02)
    assert float(E.power_beta(1, 1, gamma)) == 0.0   # first step: EMA = weights


@pytest.mark.parametrize('sigma_rel', [0.05, 0.1])
def test_tracking_reproduces_profile_moments(sigma_rel):
    """Averaging θ(τ) = τ/T and (τ/T)² gives the profile's mean (γ+1)/(γ+2) and relative std σ_rel."""
    steps = 4000
    gamma = E.sigma_rel_to_gamma(sigma_rel)
    state = E.PowerEMA.init({'m1': jnp.zeros(()), 'm2': jnp.zeros(())}, [sigma_rel])

    @jax.jit
    def body(state, t):
        theta = {'m1': t / steps, 'm2': (t / steps) ** 2}
        return state.update(theta, t, 1.0), None
    state, _ = jax.lax.scan(body, state, jnp.arange(1, steps + 1, dtype=jnp.float32))
    avg = state.get(sigma_rel)
    m1, m2 = float(avg['m1']), float(avg['m2'])
    assert abs(m1 - (gamma + 1) / (gamma + 2)) < 2e-3
    assert abs(np.sqrt(m2 - m1 ** 2) - sigma_rel) < 3e-3


def test_get_unknown_profile():
    state = E.PowerEMA.init({'a': jnp.zeros(())}, [0.05])
    with pytest.raises(KeyError):
        state.get(0.1)


@pytest.mark.parametrize('a, b', [((100.0, 5.0), (100.0, 9.0)), ((60.0, 3.0), (100.0, 12.0)),
                                  ((100.0, 7.0), (40.0, 2.5))])
def test_profile_inner_matches_integration(a, b):
    (ta, ga), (tb, gb) = a, b
    pa = lambda tau: (ga + 1) * tau ** ga / ta ** (ga + 1) if tau <= ta else 0.0  # noqa: E731
    pb = lambda tau: (gb + 1) * tau ** gb / tb ** (gb + 1) if tau <= tb else 0.0  # noqa: E731
    ref = quad(lambda tau: pa(tau) * pb(tau), 0, min(ta, tb), limit=200)[0]
    np.testing.assert_allclose(float(E.profile_inner(ta, ga, tb, gb)), ref, rtol=1e-6)


def test_posthoc_reconstruction_matches_tracked_ema():
    """Track σ_rel 0.05 and 0.10 with snapshots, plus 0.075 directly; reconstruct 0.075 post hoc."""
    steps, every = 4096, 256
    rng = np.random.default_rng(0)
    traj = np.cumsum(rng.normal(size=(steps, 8)), axis=0) / np.sqrt(steps)   # random-walk weights
    rels = [0.05, 0.10, 0.075]
    state = E.PowerEMA.init(jnp.zeros(8), rels)
    snaps_t, snaps_s, snaps = [], [], []

    @jax.jit
    def chunk(state, ts, thetas):
        return jax.lax.scan(lambda st, a: (st.update(a[1], a[0], 1.0), None), state, (ts, thetas))[0]
    for start in range(0, steps, every):
        ts = jnp.arange(start + 1, start + every + 1, dtype=jnp.float32)
        state = chunk(state, ts, jnp.asarray(traj[start:start + every], jnp.float32))
        t = start + every
        for s in (0.05, 0.10):
            snaps_t.append(t)
            snaps_s.append(s)
            snaps.append(np.asarray(state.get(s), np.float64))
    x = E.posthoc_coefficients(snaps_t, snaps_s, steps, [0.075])
    recon = x[:, 0] @ np.stack(snaps)
    direct = np.asarray(state.get(0.075), np.float64)
    other = np.asarray(state.get(0.05), np.float64)
    err = np.abs(recon - direct).max()
    assert err < 0.01 * np.abs(other - direct).max()  # far closer than the neighbouring profile
    np.testing.assert_allclose(x.sum(axis=0), 1.0)

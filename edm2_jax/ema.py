"""Power-function EMA (Karras et al. 2024; edm2-spec §6.1): σ_rel ↔ γ, per-step tracking, and the
inner products of EMA profiles used for post-hoc reconstruction.

An EMA with exponent γ averages the training trajectory θ(τ), τ ∈ [0, t], with weight
p_t(τ) = (γ+1) τ^γ / t^(γ+1); its relative width is σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))).
Time t is measured in training examples seen (or steps, with Δ = 1).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def gamma_to_sigma_rel(gamma):
    """Relative standard deviation of the power-function profile with exponent γ."""
    gamma = np.asarray(gamma, np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ of the profile with relative std σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0 (the inverse of `gamma_to_sigma_rel`)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < gamma_to_sigma_rel(0.0):
        raise ValueError(f'sigma_rel must be in (0, {float(gamma_to_sigma_rel(0.0)):.4f}), got {sigma_rel}')
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(np.max(roots[np.abs(roots.imag) < 1e-9].real))


def power_beta(t, delta, gamma):
    """Decay of one EMA step: β = (1 − Δ/t)^(γ+1), t = examples seen *after* the step, Δ = step size.
    β = 0 at the first step (t = Δ), so the EMA starts equal to the weights. Traceable. Computed as
    exp((γ+1)·log1p(−Δ/t)): float32 keeps Δ/t to full relative precision at EDM2 scale (t ~ 2³¹
    images), where 1 − Δ/t would round away ~2⁻²⁵ of it."""
    ratio = jnp.asarray(delta, jnp.float32) / jnp.asarray(t, jnp.float32)
    return jnp.exp((gamma + 1.0) * jnp.log1p(-jnp.minimum(ratio, 1.0)))


class PowerEMA(NamedTuple):
    """Tracks one EMA of `params` per σ_rel (a tuple of pytrees, in the order of `sigma_rels`)."""
    sigma_rels: tuple[float, ...]
    averages: tuple[Any, ...]

    @classmethod
    def init(cls, params, sigma_rels: Sequence[float]) -> 'PowerEMA':
        return cls(tuple(float(s) for s in sigma_rels), tuple(params for _ in sigma_rels))

    def update(self, params, t, delta) -> 'PowerEMA':
        """ema ← β ema + (1 − β) θ for every tracked profile (t, Δ as in `power_beta`)."""
        new = []
        for s, avg in zip(self.sigma_rels, self.averages):
            beta = power_beta(t, delta, sigma_rel_to_gamma(s))
            new.append(jax.tree.map(lambda e, p: (beta * e + (1.0 - beta) * p).astype(e.dtype), avg, params))
        return self._replace(averages=tuple(new))

    def get(self, sigma_rel: float):
        """The average tracked for `sigma_rel`."""
        for s, avg in zip(self.sigma_rels, self.averages):
            if abs(s - sigma_rel) < 1e-12:
                return avg
        raise KeyError(f'sigma_rel {sigma_rel} is not tracked (tracked: {self.sigma_rels})')


jax.tree_util.register_pytree_node(
    PowerEMA,
    lambda e: (e.averages, e.sigma_rels),
    lambda sigma_rels, averages: PowerEMA(sigma_rels, tuple(averages)))


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ for power-function profiles a = (t_a, γ_a), b = (t_b, γ_b)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    expo = np.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * ratio ** expo
            / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)))


def posthoc_coefficients(snapshot_t, snapshot_sigma_rel, target_t, target_sigma_rel):
    """Least-squares weights x [num_snapshots, num_targets] such that Σ_i x_i p_i ≈ p_target
    (solve A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩, then normalise each column to sum 1).
    Reconstructed weights are θ* = Σ_i x_i θ_i."""
    st = np.asarray(snapshot_t, np.float64)
    sg = np.array([sigma_rel_to_gamma(s) for s in np.atleast_1d(snapshot_sigma_rel)])
    if sg.shape != st.shape:
        raise ValueError('snapshot_t and snapshot_sigma_rel must have the same length')
    tg = np.array([sigma_rel_to_gamma(s) for s in np.atleast_1d(target_sigma_rel)])
    tt = np.broadcast_to(np.asarray(target_t, np.float64), tg.shape)
    a = profile_inner(st[:, None], sg[:, None], st[None, :], sg[None, :])
    b = profile_inner(st[:, None], sg[:, None], tt[None, :], tg[None, :])
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum(axis=0, keepdims=True)

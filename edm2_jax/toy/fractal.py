"""Karras et al.'s fractal 2-D Gaussian mixture (toy2d-spec §1): construction, exact log-density,
score and sampling at any noise level σ.

The mixture is a list of components (weight φ_k, mean μ_k, 2×2 covariance Σ_k). Noisy densities use
Σ_k + σ²I with a closed-form 2×2 inverse; all reductions over components are log-sum-exp / softmax, so
points far from the data give finite log-densities and scores.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ORIGIN = np.array([0.0030, 0.0325])
SCALE = np.array([1.3136, 1.3844])
NUM_LEVELS = 7              # depths 0..6 → 127 branches per class
PER_BRANCH = 8              # Gaussians per branch
SIGMA_DATA = 0.5
CHUNK = 256                 # points per block: keeps the [chunk, K] temporaries in cache (≈4× faster)
_LOG_2PI = math.log(2 * math.pi)


class Mixture(NamedTuple):
    """Gaussian mixture as arrays: weights [K] (sum 1), means [K, 2], covs [K, 2, 2].

    Components are in DFS pre-order of the branch tree, 8 consecutive components per branch; for 'AB',
    class A's components come first. `branch` [K] gives the branch index of each component (same
    order, A's 127 branches first) and `depth` [K] its depth.
    """
    weights: jax.Array
    means: jax.Array
    covs: jax.Array
    branch: np.ndarray
    depth: np.ndarray


@functools.lru_cache(maxsize=None)
def _all_components():
    """Grows both trees from one RandomState(2) stream (A first); returns per-class numpy lists."""
    rng = np.random.RandomState(2)
    out = {'A': [], 'B': []}
    ts = np.linspace(0.07, 0.93, PER_BRANCH)

    def branch(cls, depth, pos, angle, counter):
        if depth >= NUM_LEVELS:
            return
        u = np.array([np.cos(angle), np.sin(angle)])
        dist = 0.292 * 0.8 ** depth * (1 + 0.2 * rng.randn())
        thick = 0.2 * 0.8 ** depth / dist
        size = SCALE * dist * 0.06
        m = np.outer(u, u) + thick ** 2 * (np.eye(2) - np.outer(u, u))
        cov = m * np.outer(size, size)
        b = counter[0]
        counter[0] += 1
        for t in ts:
            out[cls].append((dist * 0.5 ** depth, (pos + u * dist * t) * SCALE, cov, b, depth))
        for sign in (1, -1):
            child_angle = angle + sign * 0.7 ** depth * (1 + 0.2 * rng.randn())
            branch(cls, depth + 1, pos + u * dist, child_angle, counter)

    branch('A', 0, ORIGIN, np.pi / 4, [0])
    branch('B', 0, ORIGIN, 5 * np.pi / 4, [0])
    return out


def mixture(classes: str = 'A') -> Mixture:
    """Components of class 'A', 'B' or 'AB' (weights normalised over the selected set)."""
    if classes not in ('A', 'B', 'AB'):
        raise ValueError(f"classes must be 'A', 'B' or 'AB', got {classes!r}")
    comps = _all_components()
    rows = [c for cls in classes for c in comps[cls]]
    offsets = {'A': 0, 'B': len(comps['A']) // PER_BRANCH if classes == 'AB' else 0}
    phi = np.array([r[0] for r in rows])
    branch_ids = np.concatenate([np.array([r[3] for r in comps[cls]]) + offsets[cls] for cls in classes])
    return Mixture(
        weights=jnp.asarray(phi / phi.sum(), jnp.float32),
        means=jnp.asarray(np.stack([r[1] for r in rows]), jnp.float32),
        covs=jnp.asarray(np.stack([r[2] for r in rows]), jnp.float32),
        branch=branch_ids,
        depth=np.array([r[4] for r in rows]))


def _broadcast_sigma(x, sigma):
    return jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])


def _component_terms(mix: Mixture, x, sigma):
    """log(φ_k N(x; μ_k, Σ_k + σ²I)) [N, K] and z_k = (Σ_k + σ²I)⁻¹(μ_k − x) [N, K, 2]."""
    s2 = jnp.square(_broadcast_sigma(x, sigma))[:, None]
    a = mix.covs[None, :, 0, 0] + s2
    b = mix.covs[None, :, 0, 1]
    c = mix.covs[None, :, 1, 1] + s2
    det = a * c - b * b
    d0 = mix.means[None, :, 0] - x[:, None, 0]
    d1 = mix.means[None, :, 1] - x[:, None, 1]
    z0 = (c * d0 - b * d1) / det
    z1 = (a * d1 - b * d0) / det
    logw = jnp.log(mix.weights)[None] - _LOG_2PI - 0.5 * jnp.log(det) - 0.5 * (d0 * z0 + d1 * z1)
    return logw, z0, z1


def _chunked(fn, x, sigma):
    """Applies fn(x_block, sigma_block) over blocks of CHUNK points (padding the last block)."""
    n = x.shape[0]
    sigma = _broadcast_sigma(x, sigma)
    if n <= CHUNK:
        return fn(x, sigma)
    pad = -n % CHUNK
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, CHUNK, 2)
    sb = jnp.pad(sigma, (0, pad), constant_values=1.0).reshape(-1, CHUNK)
    out = jax.lax.map(lambda a: fn(*a), (xb, sb))
    return out.reshape((-1,) + out.shape[2:])[:n]


def log_prob(mix: Mixture, x, sigma=0.0):
    """log p(x; σ) [N] for x [N, 2]; σ scalar or [N]."""
    return _chunked(lambda xb, sb: jax.nn.logsumexp(_component_terms(mix, xb, sb)[0], axis=1), x, sigma)


def _score_block(mix, x, sigma):
    logw, z0, z1 = _component_terms(mix, x, sigma)
    r = jax.nn.softmax(logw, axis=1)
    return jnp.stack([jnp.sum(r * z0, axis=1), jnp.sum(r * z1, axis=1)], axis=1)


def score(mix: Mixture, x, sigma):
    """∇ₓ log p(x; σ) [N, 2] = Σ_k softmax(log w)_k z_k."""
    return _chunked(functools.partial(_score_block, mix), x, sigma)


def denoise(mix: Mixture, x, sigma):
    """Exact denoiser (posterior mean, Tweedie): D = x + σ² ∇ log p(x; σ)."""
    sig = _broadcast_sigma(x, sigma)[:, None]
    return x + jnp.square(sig) * score(mix, x, sigma)


def responsible_component(mix: Mixture, x):
    """argmax_k φ_k N(x; μ_k, Σ_k) [N] at σ = 0 (the component a point is assigned to)."""
    return _chunked(lambda xb, sb: jnp.argmax(_component_terms(mix, xb, sb)[0], axis=1), x, 0.0)


def nearest_mean_distance(mix: Mixture, x):
    """Distance from each point to the nearest component mean [N] (escape detection)."""
    def block(xb, _):
        d2 = jnp.sum(jnp.square(xb[:, None, :] - mix.means[None]), axis=-1)
        return jnp.sqrt(jnp.min(d2, axis=1))
    return _chunked(block, x, 0.0)


def draw(mix: Mixture, key, n: int, sigma=0.0):
    """n exact draws from p(·; σ): component by inverse-CDF of the weights, then μ + L ε,
    L the closed-form Cholesky factor of Σ_k + σ²I."""
    kc, ke = jax.random.split(key)
    cdf = jnp.cumsum(mix.weights)
    k = jnp.searchsorted(cdf, jax.random.uniform(kc, (n,), jnp.float32) * cdf[-1], side='right')
    k = jnp.minimum(k, mix.weights.shape[0] - 1)
    s2 = jnp.square(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (n,)))
    cov = mix.covs[k]
    a, b, c = cov[:, 0, 0] + s2, cov[:, 0, 1], cov[:, 1, 1] + s2
    l11 = jnp.sqrt(a)
    l21 = b / l11
    l22 = jnp.sqrt(c - l21 * l21)
    eps = jax.random.normal(ke, (n, 2), jnp.float32)
    return mix.means[k] + jnp.stack([l11 * eps[:, 0], l21 * eps[:, 0] + l22 * eps[:, 1]], axis=1)

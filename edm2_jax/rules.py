"""Guidance rules: what one term adds, from its weight w and the two predictions.

The linear rule (None) adds w·(D_main − D_guide). A rule is a pytree (its numbers are traced, so
sweeps do not recompile) called as `rule(w, d_main, d_guide, at, state) -> (term, state)`, with `at`
the evaluation (`At`: x, σ, step index); its state is carried across the sampler's evaluations in
order (both Heun evaluations of a step count) and starts at zeros like x. Every rule works with every
guide of the family: it sees only the two predictions (and x, σ, step).

A rule may also have `finish(out, at) -> out`, applied by `guidance.guided` to the summed prediction
at every evaluation (inside or outside intervals, at any weight): CFG-Zero*'s zero-init. `check()`
raises ValueError for concrete values out of range (`denoiser.prepare_terms` calls it).

Conventions: D is the denoiser (x0) prediction, D_main the "conditional" one, D_guide the
"unconditional" one; the linear term is w·(D_main − D_guide), EDM2's g = 1 + w. Per-example
statistics (std, norms, inner products) run over all non-batch axes.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class At(NamedTuple):
    """The evaluation a rule acts at."""
    x: jax.Array       # the sampler state the denoiser is evaluated at
    sigma: jax.Array   # its noise level (0-d)
    step: jax.Array    # the sampler step index (int)


def _axes(a):
    return tuple(range(1, a.ndim))


def _dot(a, b):
    """Per-example inner product, shaped to broadcast against a."""
    return jnp.sum(a * b, axis=_axes(a), keepdims=True)


def _concrete(v):
    """v as float64 NumPy, or None while traced."""
    try:
        return np.asarray(v, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _require(ok, name, need, value):
    if value is not None and not np.all(ok(value)):
        raise ValueError(f'{name} needs {need}, got {value.tolist()}')


@flax.struct.dataclass
class APG:
    """Adaptive Projected Guidance (Sadat et al. 2025) for one term's update Δ = D_main − D_guide.

    Per example (over all pixels and channels): with momentum β the update becomes the running
    average Δ + β·Δ_prev (state carried across the sampler's evaluations, both Heun evaluations of a
    step count); with threshold r > 0 it is rescaled to norm ≤ r; then it is split into its parts
    parallel and orthogonal to D_main and the parallel part is scaled by η. The term adds w·Δ'.
    η = 1, r = 0 (no rescale), β = 0 is the linear rule. All three are traced.
    """
    eta: Any = 0.0
    threshold: Any = 0.0
    momentum: Any = 0.0

    def __call__(self, w, d_main, d_guide, at, running):
        delta = d_main - d_guide
        axes = _axes(delta)
        dt = delta.dtype
        running = delta + jnp.asarray(self.momentum, dt) * running
        delta = running
        r = jnp.asarray(self.threshold, dt)
        norm = jnp.sqrt(jnp.sum(jnp.square(delta), axis=axes, keepdims=True))
        scale = jnp.where(r > 0, jnp.minimum(1, r / jnp.maximum(norm, jnp.finfo(dt).tiny)), 1)
        delta = delta * scale
        unit = d_main / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(d_main), axis=axes, keepdims=True)),
                                    jnp.finfo(dt).tiny)
        parallel = jnp.sum(delta * unit, axis=axes, keepdims=True) * unit
        return w * ((delta - parallel) + jnp.asarray(self.eta, dt) * parallel), running

    def check(self):
        _require(np.isfinite, 'APG eta', 'a finite number', _concrete(self.eta))
        _require(lambda r: r >= 0, 'APG threshold', 'r >= 0', _concrete(self.threshold))
        _require(np.isfinite, 'APG momentum', 'a finite number', _concrete(self.momentum))


@flax.struct.dataclass
class Rescale:
    """CFG rescale (Lin et al. 2024, "guidance_rescale" φ), on D.

    D_cfg = D_main + w·Δ is rescaled to the standard deviation of D_main and blended:
    D = φ·D_cfg·std(D_main)/std(D_cfg) + (1 − φ)·D_cfg, i.e. the term w·Δ + φ·(r − 1)·D_cfg with
    r = std(D_main)/std(D_cfg) (r = 1 where std(D_cfg) = 0). std per example over all non-batch axes
    (a ratio: ddof is irrelevant). φ = 0 is the linear rule, Δ = 0 adds nothing (both exactly). With
    several terms each rescales D_main + its own term. φ traced.
    """
    phi: Any = 0.7

    def __call__(self, w, d_main, d_guide, at, state):
        cfg = d_main + w * (d_main - d_guide)
        std_main, std_cfg = _std(d_main), _std(cfg)
        ratio = jnp.where(std_cfg > 0, std_main / jnp.where(std_cfg > 0, std_cfg, 1), 1)
        return w * (d_main - d_guide) + jnp.asarray(self.phi, cfg.dtype) * (ratio - 1) * cfg, state

    def check(self):
        _require(lambda p: (p >= 0) & (p <= 1), 'Rescale phi', 'φ in [0, 1]', _concrete(self.phi))


def _std(a):
    mean = jnp.mean(a, axis=_axes(a), keepdims=True)
    return jnp.sqrt(jnp.mean(jnp.square(a - mean), axis=_axes(a), keepdims=True))


@flax.struct.dataclass
class ZeroStar:
    """CFG-Zero* (Fan et al. 2025): the guide scaled by s* = <D_main, D_guide>/(‖D_guide‖² + ε)
    (per example), term w·(D_main − s*·D_guide).

    diffusers' formulation s*·D_u + g·(D_c − s*·D_u) equals D_c + w·(D_c − s*·D_u) with g = 1 + w.
    Zero-init: at sampler steps < zero_init_steps the prediction is x itself (`finish`): in EDM's ODE
    dx/dσ = (x − D)/σ that is the zero velocity the paper returns. A zero guide gives s* = 0 (no
    NaN). zero_init_steps and ε traced.
    """
    zero_init_steps: Any = 0
    eps: Any = 1e-8

    def __call__(self, w, d_main, d_guide, at, state):
        scale = _dot(d_main, d_guide) / (_dot(d_guide, d_guide) + jnp.asarray(self.eps, d_main.dtype))
        return w * (d_main - scale * d_guide), state

    def finish(self, out, at):
        return jnp.where(at.step < self.zero_init_steps, at.x.astype(out.dtype), out)

    def check(self):
        _require(lambda k: (k >= 0) & (k == np.round(k)), 'ZeroStar zero_init_steps', 'an integer >= 0',
                 _concrete(self.zero_init_steps))
        _require(lambda e: e > 0, 'ZeroStar eps', 'ε > 0', _concrete(self.eps))


@flax.struct.dataclass
class Tangential:
    """Tangential CFG (TCFG, Kwon et al. 2025): the guide's score keeps only its component along the
    dominant right-singular vector v₁ of the 2×D matrix [s_guide; s_main] (per example, flattened).

    It acts on scores (D − x)/σ²; the projection is scale-invariant, so on u = D_guide − x,
    c = D_main − x: D_guide' = x + (u·v₁)v₁ and the term is w·(D_main − D_guide'). With a = (a₁, a₂)
    the unit top eigenvector of the Gram matrix [[u·u, u·c], [u·c, c·c]], v₁ = (a₁u + a₂c)/√λ₁ and
    (u·v₁)v₁ = a₁·(a₁u + a₂c): no SVD, no division by λ₁. Parallel u, c: the linear rule; without
    a dominant direction (equal orthogonal norms, or u = c = 0) u is kept. No parameters.
    """

    def __call__(self, w, d_main, d_guide, at, state):
        u, c = d_guide - at.x, d_main - at.x
        a1, a2 = _top_eigenvector(_dot(u, u), _dot(u, c), _dot(c, c))
        return w * (c - a1 * (a1 * u + a2 * c)), state

    def check(self):
        pass


def _top_eigenvector(p, q, r):
    """Unit eigenvector of the largest eigenvalue of [[p, q], [q, r]] (elementwise over the batch);
    of the two candidate vectors the longer (stable); (1, 0) when the eigenvalues are equal."""
    lam = (p + r) / 2 + jnp.sqrt(jnp.square((p - r) / 2) + jnp.square(q))
    x1, y1, x2, y2 = lam - r, q, q, lam - p
    first = x1 * x1 + y1 * y1 >= x2 * x2 + y2 * y2
    x, y = jnp.where(first, x1, x2), jnp.where(first, y1, y2)
    norm = jnp.sqrt(x * x + y * y)
    ok = norm > 0
    safe = jnp.where(ok, norm, 1)
    return jnp.where(ok, x / safe, 1), jnp.where(ok, y / safe, 0)


@flax.struct.dataclass
class FrequencyDecoupled:
    """Frequency-decoupled guidance (FDG, Sadat et al. 2025): a 2-level Laplacian pyramid of
    Δ = D_main − D_guide, each level with its own weight multiplier and σ range.

    low = up(pool(Δ)) (2×2 average pooling, nearest-neighbour upsampling: low is the orthogonal
    projection onto blockwise-constant images), high = Δ − low; the term is
    w·(low_w·[σ ∈ low_sigmas]·low + high_w·[σ ∈ high_sigmas]·high), ranges (lo, hi]. low_w = high_w
    = 1 over all σ is the linear rule. NHWC images with even H, W. All numbers traced.
    """
    low: Any = 1.0
    high: Any = 1.0
    low_sigmas: Any = (0.0, float('inf'))
    high_sigmas: Any = (0.0, float('inf'))

    def __call__(self, w, d_main, d_guide, at, state):
        delta = d_main - d_guide
        if delta.ndim != 4 or delta.shape[1] % 2 or delta.shape[2] % 2:
            raise ValueError(f'frequency-decoupled guidance needs NHWC images of even size, got {delta.shape}')
        n, h, wd, ch = delta.shape
        pooled = delta.reshape(n, h // 2, 2, wd // 2, 2, ch).mean(axis=(2, 4))
        low = jnp.repeat(jnp.repeat(pooled, 2, axis=1), 2, axis=2)
        dt = delta.dtype
        weight_low = jnp.where(_inside(self.low_sigmas, at.sigma), jnp.asarray(self.low, dt), 0)
        weight_high = jnp.where(_inside(self.high_sigmas, at.sigma), jnp.asarray(self.high, dt), 0)
        return w * (weight_low * low + weight_high * (delta - low)), state

    def check(self):
        for name in ('low', 'high'):
            _require(np.isfinite, f'FrequencyDecoupled {name}', 'a finite number', _concrete(getattr(self, name)))
            bounds = _concrete(getattr(self, name + '_sigmas'))
            _require(lambda b: b.shape == (2,) and 0 <= b[0] < b[1], f'FrequencyDecoupled '
                     f'{name}_sigmas', 'a range (lo, hi] with 0 <= lo < hi', bounds)


def _inside(bounds, sigma):
    lo, hi = bounds
    return (sigma > jnp.asarray(lo, sigma.dtype)) & (sigma <= jnp.asarray(hi, sigma.dtype))


# The rule types a Term accepts (None is the linear rule), by the name guidance configs use.
BY_NAME = {'apg': APG, 'rescale': Rescale, 'zero-star': ZeroStar, 'tangential': Tangential,
           'frequency': FrequencyDecoupled}
RULES = tuple(BY_NAME.values())


def check(rule, where='rule'):
    """TypeError/ValueError for what is not a rule or has bad values (None, the linear rule, is fine);
    computes nothing."""
    if rule is None:
        return
    if not isinstance(rule, RULES):
        raise TypeError(f'{where} must be None (linear) or one of edm2_jax.rules {[r.__name__ for r in RULES]}')
    rule.check()


def prepared(rule, dtype, where='rule'):
    """The rule checked (type and values) with its numbers as arrays of `dtype` (stable jit cache
    keys); None stays None (the linear rule)."""
    check(rule, where)
    return None if rule is None else jax.tree.map(lambda v: jnp.asarray(v, dtype), rule)

"""Guidance rules: what one term adds, from its weight w and the two predictions.

The linear rule (None) adds w·(D_main − D_guide). A rule is a pytree (its numbers are traced, so
sweeps do not recompile) called as `rule(w, d_main, d_guide, at, state) -> (term, state)`, with `at`
the evaluation (`At`: x, σ, step index); its state is carried across the sampler's evaluations in
order (both Heun evaluations of a step count) and starts at zeros like x. Every rule works with every
guide of the family: it sees only the two predictions.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


class At(NamedTuple):
    """The evaluation a rule acts at."""
    x: jax.Array       # the sampler state the denoiser is evaluated at
    sigma: jax.Array   # its noise level (0-d)
    step: jax.Array    # the sampler step index (int)


def _axes(a):
    return tuple(range(1, a.ndim))


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


RULES = (APG,)  # the rule types a Term accepts (None is the linear rule)

"""Generic training pieces shared by the toy and (later) EDM2 image training: the EDM noise-level
distribution, denoiser losses, the inverse-sqrt learning-rate schedule, Adam, and one jittable step
that also applies forced weight normalisation and the power-function EMA.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from edm2_jax.ema import PowerEMA


def sample_sigma(key, n: int, p_mean: float, p_std: float):
    """EDM training noise levels: ln σ ~ N(p_mean, p_std²), shape [n]."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (n,), jnp.float32))


def edm_weight(sigma, sigma_data: float):
    """EDM loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)², which makes the effective target unit-variance."""
    return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def denoiser_loss(denoised, target, weight, logvar=None):
    """Mean over examples of weight · mean-over-elements (D − target)², optionally with EDM2's
    learned uncertainty: weight/exp(u) · (D − target)² + u (u = logvar [N] or broadcastable)."""
    n = denoised.shape[0]
    weight = jnp.reshape(jnp.asarray(weight, jnp.float32), (-1,) + (1,) * (denoised.ndim - 1))
    err = weight * jnp.square(denoised.astype(jnp.float32) - target.astype(jnp.float32))
    if logvar is not None:
        logvar = jnp.reshape(logvar.astype(jnp.float32), (n,) + (1,) * (denoised.ndim - 1))
        err = err / jnp.exp(logvar) + logvar
    return jnp.mean(err.reshape(n, -1).mean(axis=1))


def inverse_sqrt_lr(lr_ref: float, t_ref: float, warmup: float = 0.0) -> Callable:
    """lr(t) = lr_ref / sqrt(max(t / t_ref, 1)) · min(t / warmup, 1) for step t (0-based).
    Toy: lr_ref 0.01, t_ref 512 steps, no warm-up."""
    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        lr = lr_ref / jnp.sqrt(jnp.maximum(t / t_ref, 1.0))
        if warmup > 0:
            lr = lr * jnp.minimum(t / warmup, 1.0)
        return lr
    return schedule


def adam(schedule, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8):
    """Adam with EDM2's betas; non-finite gradients are zeroed first (as EDM2's nan_to_num)."""
    return optax.chain(optax.zero_nans(), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.scale_by_learning_rate(schedule))


class TrainState(NamedTuple):
    step: jax.Array          # optimiser steps done (int32)
    params: Any
    opt_state: Any
    ema: PowerEMA


def init_state(params, optimizer, ema_sigma_rels: Sequence[float]) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      PowerEMA.init(params, ema_sigma_rels))


def make_step(loss_fn: Callable, optimizer, *, examples_per_step: int,
              normalize_fn: Callable | None = None) -> Callable:
    """Returns step(state, key) -> (state, loss).

    loss_fn(params, key) -> scalar. normalize_fn (forced weight normalisation) replaces the weights
    before the forward, so the gradient is taken at, and Adam steps from, normalised weights. The EMA
    is updated with t = examples seen after the step, Δ = examples_per_step.
    """
    def step(state: TrainState, key):
        params = state.params if normalize_fn is None else normalize_fn(state.params)
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        t = (state.step + 1).astype(jnp.float32) * examples_per_step
        ema = state.ema.update(params, t, examples_per_step)
        return TrainState(state.step + 1, params, opt_state, ema), loss
    return step

"""Magnitude-preserving building blocks of EDM2 (edm2-spec §1.1–1.3) and a keyed, per-example dropout.

All image tensors are NHWC. Conv kernels are HWIO, linear kernels [in, out].
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def normalize(x, axis=None, eps=1e-4):
    """x / (eps + rms(x)) over `axis` (default: every axis but 0); the norm is taken in float32."""
    if axis is None:
        axis = tuple(range(1, x.ndim))
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return x / (eps + rms).astype(x.dtype)


def mp_silu(x):
    return jax.nn.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving blend; t is the weight of the second argument.

    The interpolation is evaluated from the nearer end (as torch.lerp does) to keep rounding equal.
    """
    lerp = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
    return lerp / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, axis=-1, t=0.5):
    """Magnitude-preserving concatenation [wa·a, wb·b] along `axis`; t weights the second part."""
    na, nb = a.shape[axis], b.shape[axis]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return jnp.concatenate([wa * a, wb * b], axis=axis)


def resample(x, mode):
    """EDM2's default [1, 1] filter: 'down' is exact 2×2 average pooling, 'up' exact 2× nearest."""
    if mode == 'keep':
        return x
    n, h, w, c = x.shape
    if mode == 'down':
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    if mode == 'up':
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    raise ValueError(f'unknown resample mode {mode!r}')


def dropout(x, rate, keys_or_uniform):
    """Inverted dropout with one rate and one key per example.

    x: [N, ...]; rate: scalar or [N] (may be traced); keys_or_uniform: typed key array [N], or
    uniform [0, 1) noise shaped like x (drawn by the caller from per-example keys). Row i's mask
    depends only on row i's key and rate; rate 0 keeps everything and divides by exactly 1.
    """
    rate = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), (x.shape[0],))
    if jnp.issubdtype(keys_or_uniform.dtype, jax.dtypes.prng_key):
        uniform = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32))(keys_or_uniform)
    else:
        uniform = keys_or_uniform
    rate_b = rate.reshape((-1,) + (1,) * (x.ndim - 1))
    keep = uniform >= rate_b
    scale = (1.0 / (1.0 - rate_b)).astype(x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def _normal_init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


class MPFourier(nn.Module):
    """cos(x·freqs + phases)·√2 with stored random buffers (2π already inside), computed in float32."""
    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x):
        freqs = self.variable('buffers', 'freqs', lambda: 2 * np.pi * self.bandwidth * jax.random.normal(
            self.make_rng('params'), (self.num_channels,), jnp.float32)).value
        phases = self.variable('buffers', 'phases', lambda: 2 * np.pi * jax.random.uniform(
            self.make_rng('params'), (self.num_channels,), jnp.float32)).value
        y = jnp.outer(x.astype(jnp.float32), freqs.astype(jnp.float32)) + phases.astype(jnp.float32)
        return (jnp.cos(y) * np.sqrt(2)).astype(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel (kh, kw)) or linear layer (kernel ()).

    The stored weight is normalised per output channel on every call (no side effects), then scaled by
    gain / sqrt(fan_in), so each output row has unit norm times gain.
    """
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x, gain=1.0):
        shape = tuple(self.kernel) + (self.in_channels, self.out_channels)
        w = self.param('weight', _normal_init, shape).astype(jnp.float32)
        fan_in = math.prod(shape[:-1])
        w = normalize(w, axis=tuple(range(w.ndim - 1)))
        w = (w * (gain / math.sqrt(fan_in))).astype(x.dtype)
        if not self.kernel:
            return x @ w
        pad = self.kernel[-1] // 2
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

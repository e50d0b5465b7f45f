"""The toy denoiser (toy2d-spec §2.1): a magnitude-preserving MLP on [u, ln σ / 4, 1],
u = x / sqrt(σ_d² + σ²), with keyed per-example dropout on its hidden activations (the same
`edm2_jax.layers.dropout` as the EDM2 network, so in-situ guidance applies unchanged).

Two readouts:
* 'energy' (the paper's): log p̂ = gain · mean(y²) / σ − ½‖u‖², score = ∇ₓ log p̂ by autodiff,
  D = x + σ² score. Quadratic in the last features, so a model *trained* with dropout is biased with
  dropout off (spec §5.3); use it for models trained without dropout.
* 'denoiser': D = c_skip x + c_out · gain · F, F linear in the last dropped features — for models
  trained with dropout.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from edm2_jax.layers import dropout, mp_silu, normalize

READOUTS = ('energy', 'denoiser')


class ToyConfig(NamedTuple):
    width: int = 64
    num_layers: int = 4           # hidden layers (activations); num_layers + 1 linear layers
    readout: str = 'energy'
    sigma_data: float = 0.5

    def validate(self):
        if self.readout not in READOUTS:
            raise ValueError(f'readout must be one of {READOUTS}, got {self.readout!r}')
        if self.width < 1 or self.num_layers < 1:
            raise ValueError(f'width and num_layers must be >= 1, got {self.width}, {self.num_layers}')
        return self


def init(config: ToyConfig, key):
    """Parameters {'weights': tuple of [in, out] N(0,1) matrices, 'gain': 0}. Parameter count:
    4H + L·H² + 1 for the energy readout (16,641 at H = 64, L = 4)."""
    config.validate()
    h = config.width
    out = h if config.readout == 'energy' else 2
    shapes = [(4, h)] + [(h, h)] * (config.num_layers - 1) + [(h, out)]
    keys = jax.random.split(key, len(shapes))
    return {'weights': tuple(jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)),
            'gain': jnp.zeros((), jnp.float32)}


def normalize_weights(params):
    """Forced weight normalisation: every output column of every weight to unit RMS."""
    return {**params, 'weights': tuple(normalize(w, axis=0) for w in params['weights'])}


def _layer_keys(keys, layer):
    return jax.vmap(lambda k: jax.random.fold_in(k, layer))(keys)


def _features(params, config, x, sigma, dropout_rate, dropout_keys):
    """Last-layer output y [N, out] and the scaled input u."""
    u = x / jnp.sqrt(config.sigma_data ** 2 + jnp.square(sigma))[:, None]
    y = jnp.concatenate([u, (jnp.log(sigma) / 4)[:, None], jnp.ones_like(sigma)[:, None]], axis=1)
    for i, v in enumerate(params['weights']):
        if i > 0:
            y = mp_silu(y)
            if dropout_keys is not None:
                y = dropout(y, dropout_rate, _layer_keys(dropout_keys, i))
        y = y @ (normalize(v, axis=0) / math.sqrt(v.shape[0]))
    return y, u


def _check(x, sigma, dropout_keys):
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f'x must be [N, 2], got {x.shape}')
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    if dropout_keys is not None and dropout_keys.shape != x.shape[:1]:
        raise ValueError(f'dropout_keys must be a key array [N], got shape {dropout_keys.shape}')
    return sigma


def log_density(params, config: ToyConfig, x, sigma, *, dropout_rate=0.0, dropout_keys=None):
    """Unnormalised model log-density log p̂(x; σ) [N] (energy readout only)."""
    if config.readout != 'energy':
        raise ValueError("log_density needs the 'energy' readout")
    sigma = _check(x, sigma, dropout_keys)
    y, u = _features(params, config, x, sigma, dropout_rate, dropout_keys)
    return params['gain'] * jnp.mean(jnp.square(y), axis=1) / sigma - 0.5 * jnp.sum(jnp.square(u), axis=1)


def denoise(params, config: ToyConfig, x, sigma, *, dropout_rate=0.0, dropout_keys=None):
    """Denoiser D(x; σ) [N, 2]. x [N, 2]; σ scalar or [N]; dropout_keys a typed key array [N] (one
    mask per example and layer, held fixed while differentiating the energy); rate scalar or [N]."""
    sigma = _check(x, sigma, dropout_keys)
    if config.readout == 'energy':
        grad = jax.grad(lambda x_: jnp.sum(log_density(params, config, x_, sigma, dropout_rate=dropout_rate,
                                                       dropout_keys=dropout_keys)))(x)
        return x + jnp.square(sigma)[:, None] * grad
    y, _ = _features(params, config, x, sigma, dropout_rate, dropout_keys)
    sd2, s2 = config.sigma_data ** 2, jnp.square(sigma)
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * config.sigma_data / jnp.sqrt(s2 + sd2)
    return c_skip[:, None] * x + (c_out * params['gain'])[:, None] * y

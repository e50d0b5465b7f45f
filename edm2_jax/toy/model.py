"""The toy denoiser (toy2d-spec §2.1): a magnitude-preserving MLP on [u, ln σ / 4, 1],
u = x / sqrt(σ_d² + σ²), with keyed per-example dropout on its hidden activations (the same
`edm2_jax.layers.dropout` as the EDM2 network, so in-situ guidance applies unchanged).

Layers: y_0 = [u, ln σ / 4, 1] W_0, then for i = 1 … L (L = num_layers)
y_i = drop_i(silu_mp(y_{i−1})) W_i; y_L is the readout's input. The call-time perturbations of the
self-guidance family that make sense for an MLP take the `edm2_jax.perturb.Perturbation` spec
(`perturbation=`, strengths per example, 0 = the plain model bit for bit); `where` names layers i:
- `dropout(p)`: dropout with rate p on the activations entering the layers `where` (default all,
  i = 1 … L; the same masks as `dropout_rate`: key fold_in(key, i));
- `skip`: the hidden layers `where` (1 ≤ i < L, where the widths match) output their input
  unchanged, y_i = y_{i−1} (activation, dropout and W_i removed). Strength 1 = on, 0 = off.
  Default: the middle hidden layer L // 2;
- `sigma_shift(δ)`: the whole denoiser (preconditioning and energy included) at σ·(1 + δ).

Two readouts:
* 'energy' (the paper's): log p̂ = gain · mean(y²) / σ − ½‖u‖², score = ∇ₓ log p̂ by autodiff,
  D = x + σ² score. Quadratic in the last features, so a model *trained* with dropout is biased with
  dropout off (toy2d-spec §5.3); use it for models trained without dropout.
* 'denoiser': D = c_skip x + c_out · gain · F, F linear in the last dropped features — for models
  trained with dropout.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import perturb as P
from edm2_jax.guidance import concrete_values
from edm2_jax.layers import dropout, mp_silu, normalize

READOUTS = ('energy', 'denoiser')
KINDS = ('dropout', 'skip', 'sigma_shift')  # the perturbations an MLP has


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


def _layer_noise(keys, layer, shape, drops):
    """The layer's dropout keys, or its uniform draw shifted by the perturbation's offset."""
    if all(p.offset is None for p in drops):
        return _layer_keys(keys, layer)
    uniform = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(_layer_keys(keys, layer))
    return P.shifted(uniform, drops)


def skippable_layers(config: ToyConfig) -> tuple[int, ...]:
    """The hidden layers a `skip` may remove: 1 … L−1 (width → width)."""
    return tuple(range(1, config.num_layers))


def resolve_perturbation(config: ToyConfig, perturbation) -> tuple[P.Perturbation, ...]:
    """None, one `Perturbation` or a sequence → a checked tuple with `where` a frozenset of layer
    indices (static). Raises ValueError for kinds an MLP lacks, unknown layers, bad strengths."""
    if perturbation is None:
        return ()
    items = (perturbation,) if isinstance(perturbation, P.Perturbation) else tuple(perturbation)
    out = []
    for p in items:
        if not isinstance(p, P.Perturbation):
            raise TypeError(f'a perturbation must be a perturb.Perturbation, got {type(p).__name__}')
        if p.kind not in KINDS:
            raise ValueError(f'the toy MLP supports the perturbations {KINDS}, not {p.kind!r}')
        P.check_values(p.kind, concrete_values(p.strength))
        if p.kind == 'sigma_shift':
            if p.where is not None:
                raise ValueError('sigma_shift changes the noise level of the whole model; it takes no layers')
            out.append(p)
            continue
        allowed = tuple(range(1, config.num_layers + 1)) if p.kind == 'dropout' else skippable_layers(config)
        where = p.where
        if where is None:
            where = allowed if p.kind == 'dropout' else (config.num_layers // 2,)
        elif where == 'all':
            where = allowed
        elif isinstance(where, str):
            raise ValueError(f"{p.kind}: the toy's layers are 'all' or indices from {list(allowed)}, got {where!r}")
        elif isinstance(where, (int, np.integer)):
            where = (where,)
        layers = frozenset(int(i) for i in where)
        if not layers <= set(allowed):
            raise ValueError(f'{p.kind}: layers {sorted(layers - set(allowed))} do not exist; choose from '
                             f'{list(allowed)} (num_layers={config.num_layers})')
        out.append(p.replace(where=layers))
    if sum(p.kind == 'dropout' for p in out) > 1:
        raise ValueError('at most one dropout perturbation per call')
    return tuple(out)


def _features(params, config, x, sigma, dropout_rate, keys, perturbations=()):
    """Last-layer output y [N, out] and the scaled input u (perturbations: resolved, strengths [N])."""
    drop = {i: dropout_rate for i in range(1, config.num_layers + 1)} if keys is not None else {}
    drops = [p for p in perturbations if p.kind == 'dropout']
    for p in drops:
        drop = {i: p.strength for i in p.where}
    skips = [p for p in perturbations if p.kind == 'skip']
    u = x / jnp.sqrt(config.sigma_data ** 2 + jnp.square(sigma))[:, None]
    y = jnp.concatenate([u, (jnp.log(sigma) / 4)[:, None], jnp.ones_like(sigma)[:, None]], axis=1)
    for i, v in enumerate(params['weights']):
        y_in = y
        if i > 0:
            y = mp_silu(y)
            if i in drop:
                y = dropout(y, drop[i], _layer_noise(keys, i, y.shape[1:], drops))
        y = y @ (normalize(v, axis=0) / math.sqrt(v.shape[0]))
        for p in skips:
            if i in p.where:
                y = jnp.where(P.rows(p.strength > 0, y), y_in, y)
    return y, u


def _check(x, sigma, keys):
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f'x must be [N, 2], got {x.shape}')
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    if keys is not None and keys.shape != x.shape[:1]:
        raise ValueError(f'keys must be a key array [N], got shape {keys.shape}')
    return sigma


def _prepare(config, x, sigma, dropout_rate, keys, perturbation):
    """(σ [N] after any sigma_shift, resolved perturbations with strengths [N])."""
    sigma = _check(x, sigma, keys)
    perturbations = P.check_strengths(resolve_perturbation(config, perturbation), x.shape[0])
    if any(p.kind == 'dropout' for p in perturbations):
        if keys is None:
            raise ValueError('a dropout perturbation needs keys (one key per example)')
        if not (isinstance(dropout_rate, (int, float)) and dropout_rate == 0):
            raise ValueError('give dropout either as dropout_rate or as a dropout perturbation, not both')
    for p in perturbations:
        if p.kind == 'sigma_shift':
            sigma = sigma * (1 + p.strength)
    return sigma, perturbations


def log_density(params, config: ToyConfig, x, sigma, *, dropout_rate=0.0, keys=None,
                perturbation=None):
    """Unnormalised model log-density log p̂(x; σ) [N] (energy readout only)."""
    if config.readout != 'energy':
        raise ValueError("log_density needs the 'energy' readout")
    sigma, perturbations = _prepare(config, x, sigma, dropout_rate, keys, perturbation)
    return _log_density(params, config, x, sigma, dropout_rate, keys, perturbations)


def _log_density(params, config, x, sigma, dropout_rate, keys, perturbations):
    y, u = _features(params, config, x, sigma, dropout_rate, keys, perturbations)
    return params['gain'] * jnp.mean(jnp.square(y), axis=1) / sigma - 0.5 * jnp.sum(jnp.square(u), axis=1)


def denoise(params, config: ToyConfig, x, sigma, *, dropout_rate=0.0, keys=None, perturbation=None):
    """Denoiser D(x; σ) [N, 2]. x [N, 2]; σ scalar or [N]; keys a typed key array [N] (one
    mask per example and layer, held fixed while differentiating the energy); rate scalar or [N];
    perturbation: None or `perturb.Perturbation`(s) of the kinds `KINDS` (see the module docstring)."""
    sigma, perturbations = _prepare(config, x, sigma, dropout_rate, keys, perturbation)
    if config.readout == 'energy':
        grad = jax.grad(lambda x_: jnp.sum(_log_density(params, config, x_, sigma, dropout_rate, keys,
                                                        perturbations)))(x)
        return x + jnp.square(sigma)[:, None] * grad
    y, _ = _features(params, config, x, sigma, dropout_rate, keys, perturbations)
    sd2, s2 = config.sigma_data ** 2, jnp.square(sigma)
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * config.sigma_data / jnp.sqrt(s2 + sd2)
    return c_skip[:, None] * x + (c_out * params['gain'])[:, None] * y

"""Training a toy denoiser on the exact noisy score (toy2d-spec §2.2–2.3): every step draws fresh
σ (ln σ ~ N(−2.3, 1.5²)) and x ~ p_class(·; σ) exactly, and regresses D onto the exact posterior mean
with weight 1/σ² (= σ² · mean-over-dims of the score error). Adam (0.9, 0.99), lr 0.01/sqrt(max(t/512, 1)),
power-function EMA σ_rel 0.010, forced weight normalisation. With `snapshots` > 0 the run also tracks a
short EMA profile and keeps both profiles at every 1/snapshots of training, as EDM2 training saves its
snapshots (edm2-spec §6.1): what post-hoc EMA and early-snapshot guides (`toy.methods.history_model`) need.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from edm2_jax import training
from edm2_jax.toy import fractal as mixture_lib
from edm2_jax.toy import model as model_lib


class TrainSpec(NamedTuple):
    classes: str = 'A'
    config: model_lib.ToyConfig = model_lib.ToyConfig()
    steps: int = 4096
    batch: int = 4096
    dropout_rate: float = 0.0     # > 0: trained with dropout on the hidden activations
    lr_ref: float = 0.01
    lr_t_ref: float = 512
    ema_sigma_rel: float = 0.010
    p_mean: float = -2.3
    p_std: float = 1.5
    snapshots: int = 0             # > 0: both EMA profiles kept at every steps/snapshots steps
    short_sigma_rel: float = 0.002  # the second profile tracked when snapshots > 0

    def sigma_rels(self) -> tuple[float, ...]:
        """The tracked EMA profiles: the model's, then the short one if snapshots are kept."""
        return (self.ema_sigma_rel, self.short_sigma_rel) if self.snapshots else (self.ema_sigma_rel,)

    def snapshot_points(self) -> tuple[tuple[int, float], ...]:
        """(t = examples seen, σ_rel) of every kept EMA profile, by t then σ_rel: every steps/snapshots
        steps, the last step included."""
        every = self.steps // self.snapshots if self.snapshots else 0
        return tuple((k * every * self.batch, s) for k in range(1, self.snapshots + 1)
                     for s in sorted(self.sigma_rels()))

    def validate(self):
        self.config.validate()
        mixture_lib.mixture(self.classes)
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f'steps and batch must be >= 1, got {self.steps}, {self.batch}')
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate}')
        if self.snapshots < 0 or (self.snapshots and self.steps % self.snapshots):
            raise ValueError(f'snapshots must be >= 0 and divide steps, got {self.snapshots} for {self.steps} steps')
        if self.snapshots and self.short_sigma_rel == self.ema_sigma_rel:
            raise ValueError(f'short_sigma_rel must differ from ema_sigma_rel ({self.ema_sigma_rel})')
        return self


class Snapshot(NamedTuple):
    """One EMA profile of a run at t = examples seen (`train_state.Snapshot`'s content, in memory)."""
    t: int
    sigma_rel: float
    params: Any


def make_loss(spec: TrainSpec):
    """loss(params, key): the exact-score loss on one fresh batch."""
    mix = mixture_lib.mixture(spec.classes)

    def loss(params, key):
        ks, kx, kd = jax.random.split(key, 3)
        sigma = training.sample_sigma(ks, spec.batch, spec.p_mean, spec.p_std)
        x = mixture_lib.draw(mix, kx, spec.batch, sigma)
        target = mixture_lib.denoise(mix, x, sigma)
        keys = jax.random.split(kd, spec.batch) if spec.dropout_rate > 0 else None
        d = model_lib.denoise(params, spec.config, x, sigma, dropout_rate=spec.dropout_rate, keys=keys)
        return training.denoiser_loss(d, target, 1.0 / jnp.square(sigma))
    return loss


def train(spec: TrainSpec, key, *, progress: bool = True, desc: str = 'train'):
    """Trains one model; returns (EMA parameters at the last step, per-step losses [steps], the
    `Snapshot`s at `spec.snapshot_points()`)."""
    spec.validate()
    kinit, kdata = jax.random.split(key)
    optimizer = training.adam(training.inverse_sqrt_lr(spec.lr_ref, spec.lr_t_ref))
    state = training.init_state(model_lib.init(spec.config, kinit), optimizer, spec.sigma_rels())
    step = jax.jit(training.make_step(make_loss(spec), optimizer, examples_per_step=spec.batch,
                                      normalize_fn=model_lib.normalize_weights))
    losses, snapshots, points = [], [], spec.snapshot_points()
    for i in tqdm(range(spec.steps), desc=desc, disable=not progress, mininterval=2.0):
        state, loss = step(state, jax.random.fold_in(kdata, i))
        losses.append(loss)
        snapshots += [Snapshot(t, s, state.ema.get(s)) for t, s in points if t == (i + 1) * spec.batch]
    return state.ema.get(spec.ema_sigma_rel), jnp.stack(losses), snapshots


def heldout_loss(params, config: model_lib.ToyConfig, classes: str, sigma: float, key, *, n: int = 4096,
                 dropout_rate: float = 0.0, passes: int = 1) -> float:
    """Held-out exact-score loss at one σ on n fresh points. passes = 1 with dropout_rate > 0: one
    dropout pass; passes > 1: the loss of the mean D over that many independent dropout passes."""
    if passes < 1:
        raise ValueError(f'passes must be >= 1, got {passes}')
    return float(_heldout(params, key, jnp.float32(sigma), jnp.float32(dropout_rate), config=config,
                          classes=classes, n=n, passes=passes, dropout=dropout_rate > 0))


@functools.partial(jax.jit, static_argnames=('config', 'classes', 'n', 'passes', 'dropout'))
def _heldout(params, key, sigma, rate, *, config, classes, n, passes, dropout):
    mix = mixture_lib.mixture(classes)
    kx, kd = jax.random.split(key)
    s = jnp.full((n,), sigma, jnp.float32)
    x = mixture_lib.draw(mix, kx, n, s)
    target = mixture_lib.denoise(mix, x, s)
    if not dropout:
        d = model_lib.denoise(params, config, x, s)
    else:
        def one(i):
            keys = jax.random.split(jax.random.fold_in(kd, i), n)
            return model_lib.denoise(params, config, x, s, dropout_rate=rate, keys=keys)
        d = jnp.mean(jax.lax.map(one, jnp.arange(passes)), axis=0)
    return training.denoiser_loss(d, target, 1.0 / jnp.square(s))

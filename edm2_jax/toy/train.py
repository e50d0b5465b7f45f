"""Training a toy denoiser on the exact noisy score (toy2d-spec §2.2–2.3): every step draws fresh
σ (ln σ ~ N(−2.3, 1.5²)) and x ~ p_class(·; σ) exactly, and regresses D onto the exact posterior mean
with weight 1/σ² (= σ² · mean-over-dims of the score error). Adam (0.9, 0.99), lr 0.01/sqrt(max(t/512, 1)),
power-function EMA σ_rel 0.010, forced weight normalisation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

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

    def validate(self):
        self.config.validate()
        mixture_lib.mixture(self.classes)
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f'steps and batch must be >= 1, got {self.steps}, {self.batch}')
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate}')
        return self


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
    """Trains one model; returns (EMA parameters at the last step, per-step losses [steps])."""
    spec.validate()
    kinit, kdata = jax.random.split(key)
    optimizer = training.adam(training.inverse_sqrt_lr(spec.lr_ref, spec.lr_t_ref))
    state = training.init_state(model_lib.init(spec.config, kinit), optimizer, [spec.ema_sigma_rel])
    step = jax.jit(training.make_step(make_loss(spec), optimizer, examples_per_step=spec.batch,
                                      normalize_fn=model_lib.normalize_weights))
    losses = []
    for i in tqdm(range(spec.steps), desc=desc, disable=not progress, mininterval=2.0):
        state, loss = step(state, jax.random.fold_in(kdata, i))
        losses.append(loss)
    return state.ema.get(spec.ema_sigma_rel), jnp.stack(losses)


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

"""Training: generic pieces shared with the toy (EDM noise levels, denoiser loss, inverse-sqrt lr,
Adam, a jittable step with forced weight normalisation and the power-function EMA), then EDM2 image
training (edm2-spec §6): `TrainConfig`, the EDM2 loss and lr schedule, and the data-parallel step.

EDM2 step, in order (one `jax.jit` program):
  1. forced weight normalisation: every stored MPConv weight is replaced by its normalised copy
     (`forced_weight_norm`, per output channel over the fan-in, eps 1e-4) — the PyTorch train-mode
     in-place overwrite. The gradient is taken at, and Adam steps from, these weights (the network
     normalises once more inside its forward, as EDM2 does with float32 weights).
  2. per example i (global stream position id_i): key = fold_in(key(seed), id_i) → (σ, noise, dropout)
     keys; ln σ ~ N(P_mean, P_std²), n = ε σ; dropout at `cfg.dropout` with the example's own key.
     Nothing depends on the example's position in the batch or on the device that holds it.
  3. loss = mean over the global batch of the per-image sum over elements of λ/e^u (D − y)² + u;
     each device sums its rows / global batch, the sums are psum'd, and the gradient is that of the
     whole sharded program (so autodiff adds the devices' contributions).
  4. NaN/±Inf gradients → 0, Adam (0.9, 0.99, eps 1e-8), θ ← θ − lr(t)·adam with t = images seen
     *before* the step (so with warm-up the first step has lr 0, as in EDM2).
  5. EMA profiles (edm2_jax.ema.PowerEMA) of the post-step weights, t = images seen after the step,
     Δ = global batch, β = exp((γ+1)·log1p(−Δ/t)) (`ema.power_beta`: float32-accurate at t ~ 2³¹).
Buffers (Fourier freqs/phases) live outside the optimiser and the EMA and are never changed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edm2_jax.config import EDM2Config, check_fields
from edm2_jax.ema import PowerEMA, sigma_rel_to_gamma
from edm2_jax.layers import normalize
from edm2_jax.network import Network


# ---------------------------------------------------------------------------------------------------
# Generic pieces (also used by the toy).

def sample_sigma(key, n: int, p_mean: float, p_std: float):
    """EDM training noise levels: ln σ ~ N(p_mean, p_std²), shape [n]."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (n,), jnp.float32))


def edm_weight(sigma, sigma_data: float):
    """EDM loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)², which makes the effective target unit-variance."""
    return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def denoiser_loss(denoised, target, weight, logvar=None):
    """Mean over examples of weight · mean-over-elements (D − target)², optionally with EDM2's
    learned uncertainty: weight/exp(u) · (D − target)² + u (u = logvar [N] or broadcastable).

    Toy convention (mean over elements). EDM2 image training sums over elements instead
    (`edm2_loss`): edm2 objective = elements-per-example × this value.
    """
    n = denoised.shape[0]
    weight = jnp.reshape(jnp.asarray(weight, jnp.float32), (-1,) + (1,) * (denoised.ndim - 1))
    err = weight * jnp.square(denoised.astype(jnp.float32) - target.astype(jnp.float32))
    if logvar is not None:
        logvar = jnp.reshape(logvar.astype(jnp.float32), (n,) + (1,) * (denoised.ndim - 1))
        err = err / jnp.exp(logvar) + logvar
    return jnp.mean(err.reshape(n, -1).mean(axis=1))


def inverse_sqrt_lr(lr_ref: float, t_ref: float, warmup: float = 0.0) -> Callable:
    """lr(t) = lr_ref / sqrt(max(t / t_ref, 1)) · min(t / warmup, 1) (no warm-up for warmup 0).
    Toy: t = step (0-based), lr_ref 0.01, t_ref 512 steps. EDM2: t = images seen (`edm2_lr`)."""
    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        lr = lr_ref / jnp.sqrt(jnp.maximum(t / t_ref, 1.0))
        if warmup > 0:
            lr = lr * jnp.minimum(t / warmup, 1.0)
        return lr
    return schedule


def zero_nonfinite() -> optax.GradientTransformation:
    """NaN and ±Inf gradient entries → 0 (EDM2's nan_to_num(nan=0, posinf=0, neginf=0))."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8) -> optax.GradientTransformation:
    """EDM2's Adam direction (torch defaults but β₂ 0.99) on finite-ised gradients, without lr."""
    return optax.chain(zero_nonfinite(), optax.scale_by_adam(b1=b1, b2=b2, eps=eps))


def adam(schedule, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8):
    """Adam with EDM2's betas and lr schedule(step); non-finite gradients are zeroed first."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(schedule))


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


# ---------------------------------------------------------------------------------------------------
# EDM2 image training (edm2-spec §6).

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
AXIS = 'data'  # the batch axis of `parallel.data_mesh`


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One EDM2 training run. Times are in images (t = images seen). Defaults: EDM2 img512 (edm2-spec §2.1/§6).

    `dropout` is the rate applied in every training forward; exported networks record it in
    `EDM2Config.dropout` (a non-zero `network.dropout` must agree with it). Per-example randomness is a
    function of (seed, the example's global position).
    """
    network: EDM2Config
    batch_size: int = 2048
    duration: int = 2048 << 20
    lr_ref: float = 0.0100
    lr_decay_images: int = 70000 * 2048
    lr_warmup_images: int = 10_000_000
    p_mean: float = -0.4
    p_std: float = 1.0
    dropout: float = 0.0
    ema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every: int = 8 << 20
    checkpoint_every: int = 128 << 20
    compute_dtype: str = 'float32'
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, 'ema_sigma_rels', tuple(float(s) for s in self.ema_sigma_rels))
        problems = []
        if not isinstance(self.network, EDM2Config):
            problems.append(f'network must be an EDM2Config, got {type(self.network).__name__}')
        for name in ('batch_size', 'duration', 'lr_decay_images', 'snapshot_every', 'checkpoint_every'):
            if int(getattr(self, name)) < 1:
                problems.append(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.lr_warmup_images < 0:
            problems.append(f'lr_warmup_images must be >= 0, got {self.lr_warmup_images}')
        if not self.lr_ref > 0 or not self.p_std > 0:
            problems.append(f'lr_ref and p_std must be > 0, got {self.lr_ref}, {self.p_std}')
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f'dropout must be in [0, 1), got {self.dropout}')
        elif isinstance(self.network, EDM2Config) and self.network.dropout not in (0.0, self.dropout):
            problems.append(f'network.dropout={self.network.dropout} disagrees with dropout={self.dropout} '
                            '(the trained rate is `dropout`; leave network.dropout 0 or equal)')
        if len({f'{s:.3f}' for s in self.ema_sigma_rels}) != len(self.ema_sigma_rels):
            problems.append(f'ema_sigma_rels must differ at 3 decimals (snapshot file names), '
                            f'got {self.ema_sigma_rels}')
        for s in self.ema_sigma_rels:
            try:
                sigma_rel_to_gamma(s)
            except ValueError as e:
                problems.append(str(e))
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f'compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}')
        if not 0 <= self.seed < 2 ** 32:
            problems.append(f'seed must be in [0, 2**32), got {self.seed}')
        if problems:
            raise ValueError('invalid TrainConfig: ' + '; '.join(problems))

    @property
    def trained_network(self) -> EDM2Config:
        """The network config with the trained dropout rate recorded."""
        return self.network.replace(dropout=self.dropout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From `to_dict`'s output (e.g. JSON); UserError naming the field."""
        check_fields(cls, d)
        d = dict(d)
        d['network'] = EDM2Config.from_dict(d['network'], where='TrainConfig.network')
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def edm2_lr(cfg: TrainConfig) -> Callable:
    """lr(t) = α_ref / sqrt(max(t / t_decay, 1)) · min(t / t_warmup, 1), t = images seen (edm2-spec §6)."""
    return inverse_sqrt_lr(cfg.lr_ref, cfg.lr_decay_images, cfg.lr_warmup_images)


def edm2_loss(denoised, target, sigma, logvar, sigma_data: float = 0.5):
    """Per-image EDM2 loss [N]: Σ over elements of λ(σ)/e^u · (D − y)² + u (u added per element).

    denoised, target [N, ...]; sigma, logvar [N] (or [N, 1, 1, 1]). The training objective is the mean
    over images (edm2-spec §6: sum over elements / batch, averaged over GPUs).
    """
    n = denoised.shape[0]
    shape = (n,) + (1,) * (denoised.ndim - 1)
    sigma = jnp.reshape(jnp.asarray(sigma, jnp.float32), shape)
    u = jnp.reshape(jnp.asarray(logvar, jnp.float32), shape)
    err = jnp.square(denoised.astype(jnp.float32) - target.astype(jnp.float32))
    per_element = edm_weight(sigma, sigma_data) / jnp.exp(u) * err + u
    return per_element.reshape(n, -1).sum(axis=1)


def _is_mpconv_weight(path) -> bool:
    return getattr(path[-1], 'key', None) == 'weight'


def forced_weight_norm(params, eps: float = 1e-4):
    """Every MPConv weight (leaf named 'weight'; kernels HWIO / [in, out]) replaced by
    w / (eps + rms(w)) per output channel over the fan-in (edm2-spec §1.3); gains untouched."""
    def norm(path, w):
        return normalize(w, axis=tuple(range(w.ndim - 1)), eps=eps) if _is_mpconv_weight(path) else w
    return jax.tree_util.tree_map_with_path(norm, params)


@flax.struct.dataclass
class EDM2State:
    """Everything a run needs to continue: config (static), optimiser steps done, trainable params,
    buffers (never trained), Adam state and the tracked EMA profiles. Images seen = step · batch."""
    config: TrainConfig = flax.struct.field(pytree_node=False)
    step: jax.Array
    params: Any
    buffers: Any
    opt_state: Any
    ema: PowerEMA

    @property
    def images_seen(self) -> int:
        return int(self.step) * self.config.batch_size

    def network(self, sigma_rel: float | None = None) -> Network:
        """The raw trained weights (sigma_rel None) or a tracked EMA profile as a Network whose config
        records the trained dropout rate (float32 compute)."""
        params = self.params if sigma_rel is None else self.ema.get(sigma_rel)
        return Network(self.config.trained_network, {'params': params, 'buffers': self.buffers})


def _replicated(mesh):
    return NamedSharding(mesh, P())


@functools.partial(jax.jit, static_argnums=0)
def _init_state(cfg: TrainConfig, key) -> EDM2State:
    variables = Network.init(cfg.network, key).variables
    params, buffers = variables['params'], variables.get('buffers', {})
    ema = PowerEMA.init(params, cfg.ema_sigma_rels)
    return EDM2State(cfg, jnp.zeros((), jnp.int32), params, buffers, scale_by_adam().init(params), ema)


def init_train_state(cfg: TrainConfig, key, mesh: Mesh | None = None) -> EDM2State:
    """Fresh state: EDM2 init (unit-variance weights, zero gains), Adam zeros, EMA = weights.
    Committed to the default device, or replicated over `mesh` (as restored states are, so that
    fresh and resumed runs share one compiled step)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else _replicated(mesh)
    return jax.device_put(_init_state(cfg, key), sharding)


def abstract_train_state(cfg: TrainConfig, mesh: Mesh | None = None) -> EDM2State:
    """ShapeDtypeStructs of the state (replicated over `mesh`, else on the default device): the
    template for `train_state.latest_state`."""
    sharding = _replicated(mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(_init_state, cfg, jax.random.key(0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def example_keys(seed: int, example_ids):
    """[B, 3] typed keys (σ, noise, dropout) of each example: fold_in(key(seed), id) split in three.
    ids are global stream positions, taken modulo 2³² (uint32)."""
    base = jax.random.key(seed)
    ids = jnp.asarray(example_ids).astype(jnp.uint32)
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i), 3))(ids)


def _check_batch(cfg: TrainConfig, images, labels, example_ids, num_devices: int):
    net = cfg.network
    r, c, b = net.img_resolution, net.img_channels, cfg.batch_size
    if tuple(images.shape) != (b, r, r, c):
        raise ValueError(f'images must be [batch_size={b}, {r}, {r}, {c}] float, got {tuple(images.shape)}')
    if tuple(np.shape(example_ids)) != (b,):
        raise ValueError(f'example_ids must have shape [{b}], got {tuple(np.shape(example_ids))}')
    if net.label_dim and labels is not None and tuple(labels.shape) != (b, net.label_dim):
        raise ValueError(f'labels must be one-hot [{b}, {net.label_dim}] or None, got {tuple(labels.shape)}')
    if not net.label_dim and labels is not None:
        raise ValueError('this network is unconditional (label_dim 0): pass labels=None')
    if b % num_devices:
        raise ValueError(f'batch_size {b} is not divisible by the {num_devices} devices of the mesh')


@functools.lru_cache(maxsize=8)  # one compilation per (config, mesh) per process
def make_train_step(cfg: TrainConfig, mesh: Mesh | None = None) -> Callable:
    """jitted step(state, images [B,H,W,C] float in [-1, 1], labels_onehot [B,L] | None,
    example_ids int [B]) -> (state, {'loss', 'lr'}). `state` is donated.

    With a mesh, the batch (and ids/labels) is sharded over its 'data' axis and the state replicated:
    each device runs the same per-example program on its rows (`shard_map`); the loss is psum'd and
    the gradient of that sharded program (taken outside it) sums over devices. Without a mesh,
    everything runs on the default device. Host example_ids are taken modulo 2³².
    """
    b = cfg.batch_size
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    num_devices = 1 if mesh is None else mesh.devices.size
    lr_fn = edm2_lr(cfg)
    direction = scale_by_adam()

    def local_loss(params, buffers, images, labels, example_ids):
        """Σ over this device's rows of the per-image loss / global batch."""
        keys = example_keys(cfg.seed, example_ids)
        rows = images.shape[0]
        sigma = jnp.exp(cfg.p_mean + cfg.p_std * jax.vmap(lambda k: jax.random.normal(k, ()))(keys[:, 0]))
        eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(keys[:, 1])
        y = images.astype(jnp.float32)
        net = Network(cfg.network, {'params': params, 'buffers': buffers}, np.dtype(dtype))
        D, u = net(y + eps * sigma.reshape(rows, 1, 1, 1), sigma, labels,
                   dropout_rate=cfg.dropout, keys=keys[:, 2] if cfg.dropout else None,
                   return_logvar=True)
        return jnp.sum(edm2_loss(D, y, sigma, u, cfg.network.sigma_data)) / b

    loss_fn = local_loss
    if mesh is not None:  # differentiate the sharded program as a whole: autodiff sums over devices
        loss_fn = jax.shard_map(lambda *args: jax.lax.psum(local_loss(*args), AXIS), mesh=mesh,
                                in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P())
    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: EDM2State, images, labels, example_ids):
        params = forced_weight_norm(state.params)
        loss, grads = grad_fn(params, state.buffers, images, labels, example_ids)
        updates, opt_state = direction.update(grads, state.opt_state, params)
        lr = lr_fn(state.step.astype(jnp.float32) * b)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        t = (state.step + 1).astype(jnp.float32) * b
        ema = state.ema.update(params, t, b)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new, {'loss': loss, 'lr': lr}

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0,))
    else:
        rep, batch = _replicated(mesh), NamedSharding(mesh, P(AXIS))
        jitted = jax.jit(step, donate_argnums=(0,), in_shardings=(rep, batch, batch, batch),
                         out_shardings=(rep, rep))

    def checked_step(state, images, labels, example_ids):
        _check_batch(cfg, images, labels, example_ids, num_devices)
        if not isinstance(example_ids, jax.Array):  # host ids: modulo 2³², before jax narrows int64
            example_ids = (np.asarray(example_ids, np.int64) % (1 << 32)).astype(np.uint32)
        return jitted(state, images, labels, example_ids)
    checked_step.jitted = jitted
    return checked_step


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a snapshot/checkpoint is due."""
    return after // every > before // every

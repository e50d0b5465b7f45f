"""EDM2's U-Net (spec §1.4–1.5), its EDM preconditioning (spec §1.6) and the `Network` handle.

Dropout is not part of the architecture: the rate (scalar or one per example), the keys and the set
of perturbed blocks are arguments of every call. `fork_at` doubles the batch in front of one module,
so a clean and a perturbed pass can share the computation of the unperturbed prefix.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax.config import BlockSpec, EDM2Config, block_specs
from edm2_jax.layers import MPConv, MPFourier, dropout, mp_cat, mp_silu, mp_sum, normalize, resample


def module_name(torch_name: str) -> str:
    """Flax submodule name of a U-Net module: 'enc.16x16_block0' → 'enc_16x16_block0'."""
    return torch_name.replace('.', '_', 1)


class Block(nn.Module):
    """Encoder or decoder block: resample, residual branch with embedding modulation, attention."""
    spec: BlockSpec
    emb_channels: int
    config: EDM2Config

    @nn.compact
    def __call__(self, x, emb, dropout_rate=None, dropout_uniform=None):
        s, cfg = self.spec, self.config
        conv_skip = MPConv(s.in_channels, s.out_channels, (1, 1), name='conv_skip') if s.has_conv_skip else None
        x = resample(x, s.resample)
        if s.flavor == 'enc':
            if conv_skip is not None:
                x = conv_skip(x)
            x = normalize(x, axis=-1)  # pixel norm
        res_in = s.out_channels if s.flavor == 'enc' else s.in_channels
        y = MPConv(res_in, s.out_channels, (3, 3), name='conv_res0')(mp_silu(x))
        emb_gain = self.param('emb_gain', nn.initializers.zeros, ())
        c = MPConv(self.emb_channels, s.out_channels, name='emb_linear')(emb, gain=emb_gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        if dropout_rate is not None:
            y = dropout(y, dropout_rate, dropout_uniform.reshape(y.shape))
        y = MPConv(s.out_channels, s.out_channels, (3, 3), name='conv_res1')(y)
        if s.flavor == 'dec' and conv_skip is not None:
            x = conv_skip(x)
        x = mp_sum(x, y, t=cfg.res_balance)
        if s.num_heads:
            x = mp_sum(x, self._attention(x), t=cfg.attn_balance)
        if cfg.clip_act is not None:
            x = jnp.clip(x, -cfg.clip_act, cfg.clip_act)
        return x

    def _attention(self, x):
        """Cosine attention; qkv channels are interleaved as (head, channel, {q, k, v})."""
        n, h, w, c = x.shape
        heads = self.spec.num_heads
        qkv = MPConv(c, 3 * c, (1, 1), name='attn_qkv')(x)
        qkv = normalize(qkv.reshape(n, h * w, heads, c // heads, 3), axis=3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        logits = jnp.einsum('nqhc,nkhc->nhqk', q, k / np.sqrt(c // heads))
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        y = jnp.einsum('nhqk,nkhc->nqhc', weights, v).reshape(n, h, w, c)
        return MPConv(c, c, (1, 1), name='attn_proj')(y)


def _double(a, n):
    """[a; a] along the batch for per-example arrays (batch n); a broadcast batch of 1 stays as it is."""
    return jnp.concatenate([a, a]) if a.shape[0] == n else a


def _dropout_uniform(config, perturbed, keys):
    """Uniform [0, 1) noise for every perturbed block's dropout, drawn in one call per example.

    One draw of sum(H·W·C) numbers per example (then cut per block) compiles one RNG kernel instead
    of one per block; example i's noise depends only on keys[i].
    """
    shapes = {s.name: (s.resolution, s.resolution, s.out_channels)
              for s in block_specs(config) if s.name in perturbed}
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    uniform = jax.vmap(lambda k: jax.random.uniform(k, (sum(sizes),), jnp.float32))(keys)
    parts = jnp.split(uniform, np.cumsum(sizes)[:-1], axis=1)
    return {name: part.reshape((-1,) + shape) for (name, shape), part in zip(shapes.items(), parts)}


class UNet(nn.Module):
    """EDM2 U-Net on NHWC inputs (spec §1.5). Every module output is sown as an intermediate."""
    config: EDM2Config

    @nn.compact
    def __call__(self, x, noise_labels, class_labels, dropout_rate=None, dropout_keys=None,
                 perturbed=frozenset(), fork_at=None):
        cfg = self.config
        emb = MPConv(cfg.noise_channels, cfg.emb_channels, name='emb_noise')(
            MPFourier(cfg.noise_channels, name='emb_fourier')(noise_labels))
        if cfg.label_dim:
            label_emb = MPConv(cfg.label_dim, cfg.emb_channels, name='emb_label')(
                class_labels * np.sqrt(cfg.label_dim))
            emb = mp_sum(emb, label_emb, t=cfg.label_balance)
        emb = mp_silu(emb)
        self.sow('intermediates', 'emb', emb)

        x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        uniform = _dropout_uniform(cfg, perturbed, dropout_keys) if dropout_rate is not None else {}
        skips = []
        for spec in block_specs(cfg):
            if spec.index == fork_at:
                n = x.shape[0]
                x, emb, skips = _double(x, n), _double(emb, n), [_double(s, n) for s in skips]
            if spec.takes_skip:
                x = mp_cat(x, skips.pop(), t=cfg.concat_balance)
            if spec.kind == 'conv':
                x = MPConv(spec.in_channels, spec.out_channels, (3, 3), name=module_name(spec.name))(x)
            else:
                perturb_here = dropout_rate is not None and spec.name in perturbed
                x = Block(spec, cfg.emb_channels, cfg, name=module_name(spec.name))(
                    x, emb, dropout_rate if perturb_here else None, uniform.get(spec.name))
            if spec.flavor == 'enc':
                skips.append(x)
            self.sow('intermediates', spec.name, x)
        out_gain = self.param('out_gain', nn.initializers.zeros, ())
        return MPConv(cfg.block_channels[0], cfg.img_channels, (3, 3), name='out_conv')(x, gain=out_gain)


class Precond(nn.Module):
    """EDM preconditioning around the U-Net plus the log-variance head (spec §1.6).

    The image path runs in `dtype`; the noise/label embedding, the weight normalisation and D stay
    float32. sigma is [1] (broadcast) or [N]; class_labels [1 or N, label_dim] or None.
    """
    config: EDM2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, dropout_rate=None, dropout_keys=None,
                 perturbed=frozenset(), fork_at=None, return_logvar=False):
        cfg = self.config
        x = x.astype(jnp.float32)
        sigma = sigma.astype(jnp.float32).reshape(-1, 1, 1, 1)
        if cfg.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = jnp.zeros((1, cfg.label_dim), jnp.float32)
        else:
            class_labels = class_labels.astype(jnp.float32).reshape(-1, cfg.label_dim)
        sd = cfg.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
        c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
        c_noise = jnp.log(sigma.reshape(-1)) / 4
        self.sow('intermediates', 'x_in', c_in * x)
        self.sow('intermediates', 'c_noise', c_noise)
        F = UNet(cfg, name='unet')((c_in * x).astype(self.dtype), c_noise, class_labels,
                                   dropout_rate, dropout_keys, perturbed, fork_at)
        self.sow('intermediates', 'F', F)
        n = x.shape[0]
        if fork_at is not None:
            x, sigma, c_skip, c_out = (_double(a, n) for a in (x, sigma, c_skip, c_out))
        D = c_skip * x + c_out * F.astype(jnp.float32)
        if not return_logvar:
            return D
        logvar = MPConv(cfg.logvar_channels, 1, name='logvar_linear')(
            MPFourier(cfg.logvar_channels, name='logvar_fourier')(c_noise))
        if fork_at is not None:
            logvar = _double(logvar, n)
        return D, logvar.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# The public handle.

def resolve_perturb(config: EDM2Config, perturb=None) -> frozenset[str]:
    """Which blocks a dropout call perturbs: None/'all', 'encoder', 'decoder' or explicit names."""
    blocks = [s for s in block_specs(config) if s.kind == 'block']
    if perturb is None or perturb == 'all':
        return frozenset(s.name for s in blocks)
    if perturb in ('encoder', 'decoder'):
        return frozenset(s.name for s in blocks if s.flavor == perturb[:3])
    if isinstance(perturb, str):
        perturb = [perturb]
    names = {module_name(s.name): s.name for s in blocks} | {s.name: s.name for s in blocks}
    unknown = [p for p in perturb if p not in names]
    if unknown:
        raise ValueError(f'unknown blocks to perturb {unknown}; choose "all", "encoder", "decoder" '
                         f'or names from {[s.name for s in blocks]}')
    return frozenset(names[p] for p in perturb)


def first_perturbed_index(config: EDM2Config, perturbed: Iterable[str]) -> int:
    """Execution index of the first perturbed module: everything before it is a shareable prefix."""
    perturbed = frozenset(perturbed)
    return min(s.index for s in block_specs(config) if s.name in perturbed)


def _per_example_keys(key, n):
    """[N] typed keys: accepted as [N] typed keys, [N, 2] raw uint32, or one key folded with i."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
    if key.shape != (n,):
        raise ValueError(f'dropout_key must be one key or one key per example ({n}), got shape {key.shape}')
    return key


def _check_rate(rate, n):
    rate = jnp.asarray(rate, jnp.float32)
    if rate.ndim not in (0, 1) or (rate.ndim == 1 and rate.shape[0] != n):
        raise ValueError(f'dropout_rate must be a scalar or one rate per example ({n}), got shape {rate.shape}')
    try:
        values = np.asarray(rate)
    except jax.errors.TracerArrayConversionError:
        return rate  # traced: checked by the caller before tracing
    if not np.all((values >= 0) & (values < 1)):
        raise ValueError(f'dropout_rate must lie in [0, 1), got {values}')
    return rate


@functools.partial(jax.jit, static_argnames=('config', 'dtype', 'perturbed', 'fork_at', 'return_logvar'))
def _apply(config, dtype, variables, x, sigma, class_labels, rate, keys, perturbed=frozenset(),
           fork_at=None, return_logvar=False):
    """Precond.apply compiled once per (config, dtype, shapes, perturbed set); inlined under an outer jit."""
    return Precond(config, dtype).apply(variables, x, sigma, class_labels, rate, keys, perturbed, fork_at,
                                        return_logvar)


def _is_static_zero(rate):
    return isinstance(rate, (int, float)) and rate == 0


@flax.struct.dataclass
class Network:
    """An EDM2 denoiser: static config + variables ({'params', 'buffers'}); a pytree, jit-friendly.

    Call as `net(x, sigma, class_labels=None, *, dropout_rate=0.0, dropout_key=None, perturb=None,
    return_logvar=False)` with x NHWC [N, R, R, C], sigma a scalar or [N], class_labels [N, label_dim]
    one-hot (None on a conditional net means all-zero labels, as in EDM2).
    """
    config: EDM2Config = flax.struct.field(pytree_node=False)
    variables: dict
    dtype: Any = flax.struct.field(pytree_node=False, default=np.dtype('float32'))

    @classmethod
    def init(cls, config: EDM2Config, key, dtype=jnp.float32) -> Network:
        """Random initialisation (unit-variance weights, zero gains, random Fourier buffers)."""
        r = config.img_resolution
        x = jnp.zeros((1, r, r, config.img_channels))
        labels = jnp.zeros((1, config.label_dim)) if config.label_dim else None
        init = jax.jit(functools.partial(Precond(config).init, return_logvar=True))
        return cls(config, dict(init(key, x, jnp.ones((1,)), labels)), np.dtype(dtype))

    @property
    def module(self) -> Precond:
        return Precond(self.config, self.dtype)

    def with_dtype(self, dtype) -> Network:
        """The same network computing its image path in `dtype` (e.g. bfloat16)."""
        return self.replace(dtype=np.dtype(dtype))

    def __call__(self, x, sigma, class_labels=None, *, dropout_rate=0.0, dropout_key=None,
                 perturb=None, return_logvar=False):
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        rate, keys, perturbed = self._dropout_args(x.shape[0], dropout_rate, dropout_key, perturb)
        return _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, rate, keys,
                      perturbed, return_logvar=return_logvar)

    def paired(self, x, sigma, class_labels=None, *, dropout_rate, dropout_key, perturb=None,
               share_prefix=True):
        """(D_clean, D_perturbed) from one fused pass over [x; x] with dropout rates [0…, p…].

        With share_prefix, the modules before the first perturbed block run once on N examples and
        their activations (and skip stack) are duplicated, which gives the same result for less work.
        """
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        n = x.shape[0]
        p = jnp.broadcast_to(_check_rate(dropout_rate, n), (n,))
        keys = _per_example_keys(dropout_key, n)
        perturbed = resolve_perturb(self.config, perturb)
        rates = jnp.concatenate([jnp.zeros_like(p), p])
        keys2 = jnp.concatenate([keys, keys])
        if share_prefix:
            D = _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, rates, keys2,
                       perturbed, first_perturbed_index(self.config, perturbed))
        else:
            labels2 = None if class_labels is None else _double(class_labels, n)
            D = _apply(self.config, self.dtype, self.variables, _double(x, n), _double(sigma, n), labels2,
                       rates, keys2, perturbed)
        return D[:n], D[n:]

    def _check_inputs(self, x, sigma, class_labels):
        cfg = self.config
        x = jnp.asarray(x)
        r, c = cfg.img_resolution, cfg.img_channels
        if x.ndim != 4 or x.shape[1:] != (r, r, c):
            raise ValueError(f'x must be NHWC [N, {r}, {r}, {c}], got shape {x.shape}')
        n = x.shape[0]
        sigma = jnp.asarray(sigma, jnp.float32)
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, n)):
            raise ValueError(f'sigma must be a scalar or have shape [{n}], got {sigma.shape}')
        sigma = sigma.reshape(-1)
        if class_labels is not None and cfg.label_dim:
            class_labels = jnp.asarray(class_labels)
            if class_labels.shape != (n, cfg.label_dim):
                raise ValueError(f'class_labels must have shape [{n}, {cfg.label_dim}], '
                                 f'got {class_labels.shape}')
        return x, sigma, class_labels

    def _dropout_args(self, n, dropout_rate, dropout_key, perturb):
        if _is_static_zero(dropout_rate):
            return None, None, frozenset()
        if dropout_key is None:
            raise ValueError('dropout_rate is non-zero but no dropout_key was given')
        return (_check_rate(dropout_rate, n), _per_example_keys(dropout_key, n),
                resolve_perturb(self.config, perturb))

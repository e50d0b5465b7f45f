"""EDM2's U-Net (spec §1.4–1.5), its EDM preconditioning (spec §1.6) and the `Network` handle.

Dropout is not part of the architecture: the rate (scalar or one per example), the keys and the set
of perturbed blocks are arguments of every call, and so are the other `perturb.Perturbation`s (skip,
attention identity/blur, token shuffle, σ shift, sliding windows), each with per-example strengths.
`fork_at` repeats the batch `copies` times in front of one module, so a clean pass and perturbed
passes (`Network.paired`, `Network.stacked`) share the computation of the unperturbed prefix.
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
from edm2_jax import perturb as P


def module_name(torch_name: str) -> str:
    """Flax submodule name of a U-Net module: 'enc.16x16_block0' → 'enc_16x16_block0'."""
    return torch_name.replace('.', '_', 1)


class Block(nn.Module):
    """Encoder or decoder block: resample, residual branch with embedding modulation, attention."""
    spec: BlockSpec
    emb_channels: int
    config: EDM2Config

    @nn.compact
    def __call__(self, x, emb, dropout_rate=None, dropout_uniform=None, perturbations=()):
        """perturbations: the `perturb.Perturbation`s (strength [N]) that act on this block."""
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
        skipped = x
        x = mp_sum(x, y, t=cfg.res_balance)
        if s.num_heads:
            x = mp_sum(x, self._attention(x, perturbations), t=cfg.attn_balance)
        for p in perturbations:
            if p.kind == 'skip':
                x = jnp.where(P.rows(p.strength > 0, x), skipped, x)
        if cfg.clip_act is not None:
            x = jnp.clip(x, -cfg.clip_act, cfg.clip_act)
        return x

    def _attention(self, x, perturbations=()):
        """Cosine attention; qkv channels are interleaved as (head, channel, {q, k, v})."""
        n, h, w, c = x.shape
        heads = self.spec.num_heads
        qkv = MPConv(c, 3 * c, (1, 1), name='attn_qkv')(x)
        qkv = normalize(qkv.reshape(n, h * w, heads, c // heads, 3), axis=3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        for p in perturbations:
            if p.kind == 'attention_blur':
                blurred = P.gaussian_blur(q.reshape(n, h, w, heads, -1), p.strength).reshape(q.shape)
                q = jnp.where(P.rows(p.strength > 0, q), blurred, q)
        logits = jnp.einsum('nqhc,nkhc->nhqk', q, k / np.sqrt(c // heads))
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        y = jnp.einsum('nhqk,nkhc->nqhc', weights, v)
        for p in perturbations:
            if p.kind == 'attention_identity':  # each pixel attends to itself: the output is v
                y = jnp.where(P.rows(p.strength > 0, y), v, y)
        y = y.reshape(n, h, w, c)
        return MPConv(c, c, (1, 1), name='attn_proj')(y)


def _double(a, n, copies=2):
    """[a; a; …] (`copies` times) along the batch for per-example arrays (batch n); a broadcast batch
    of 1 stays as it is."""
    return jnp.concatenate([a] * copies) if a.shape[0] == n else a


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
                 perturbed=frozenset(), fork_at=None, perturbations=(), copies=2):
        """perturbations: block-wise `perturb.Perturbation`s with strengths over all rows; dropout
        ones add their rate to `dropout_rate` in their blocks (rows of different terms are disjoint)."""
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
        drops = [p for p in perturbations if p.kind == 'dropout']
        legacy = perturbed if dropout_rate is not None else frozenset()
        dropped = frozenset(legacy).union(*(p.where for p in drops))
        uniform = _dropout_uniform(cfg, dropped, dropout_keys) if dropped else {}
        skips = []
        for spec in block_specs(cfg):
            if spec.index == fork_at:
                n = x.shape[0]
                x, emb = _double(x, n, copies), _double(emb, n, copies)
                skips = [_double(s, n, copies) for s in skips]
            if spec.takes_skip:
                x = mp_cat(x, skips.pop(), t=cfg.concat_balance)
            if spec.kind == 'conv':
                x = MPConv(spec.in_channels, spec.out_channels, (3, 3), name=module_name(spec.name))(x)
            else:
                here = tuple(p for p in perturbations if spec.name in p.where)
                for p in here:
                    if p.kind == 'token_shuffle':  # the row's key folded with the block: its own stream
                        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, 1 << 20 | spec.index)
                        x = jnp.where(P.rows(p.strength > 0, x), P.shuffle_positions(x, keys), x)
                rates = ([dropout_rate] if spec.name in legacy else []) + \
                    [p.strength for p in here if p.kind == 'dropout']
                rate = functools.reduce(lambda a, b: a + b, rates) if rates else None
                x = Block(spec, cfg.emb_channels, cfg, name=module_name(spec.name))(
                    x, emb, rate, uniform.get(spec.name), here)
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
                 perturbed=frozenset(), fork_at=None, return_logvar=False, perturbations=(), copies=2):
        cfg = self.config
        x = x.astype(jnp.float32)
        sigma = sigma.astype(jnp.float32).reshape(-1, 1, 1, 1)
        for p in perturbations:
            if p.kind == 'sigma_shift':  # per-example σ·(1 + δ); δ = 0 multiplies by exactly 1
                sigma = sigma * (1 + p.strength.reshape(-1, 1, 1, 1))
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
                                   dropout_rate, dropout_keys, perturbed, fork_at,
                                   tuple(p for p in perturbations if p.kind in P.BLOCK_KINDS), copies)
        self.sow('intermediates', 'F', F)
        n = x.shape[0]
        if fork_at is not None:
            x, sigma, c_skip, c_out = (_double(a, n, copies) for a in (x, sigma, c_skip, c_out))
        D = c_skip * x + c_out * F.astype(jnp.float32)
        if not return_logvar:
            return D
        logvar = MPConv(cfg.logvar_channels, 1, name='logvar_linear')(
            MPFourier(cfg.logvar_channels, name='logvar_fourier')(c_noise))
        if fork_at is not None:
            logvar = _double(logvar, n, copies)
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


@functools.partial(jax.jit, static_argnames=('config', 'dtype', 'perturbed', 'fork_at', 'return_logvar',
                                             'copies'))
def _apply(config, dtype, variables, x, sigma, class_labels, rate, keys, perturbed=frozenset(),
           fork_at=None, return_logvar=False, perturbations=(), copies=2):
    """Precond.apply compiled once per (config, dtype, shapes, perturbed set, perturbation kinds and
    blocks); strengths are traced. Inlined under an outer jit."""
    return Precond(config, dtype).apply(variables, x, sigma, class_labels, rate, keys, perturbed, fork_at,
                                        return_logvar, perturbations, copies)


@functools.partial(jax.jit, static_argnames=('config', 'dtype', 'size', 'stride', 'return_logvar'))
def _windowed_apply(config, dtype, variables, x, sigma, class_labels, size, stride, return_logvar=False):
    """Sliding-window evaluation: every size×size crop of every example in one batch (crop-major), the
    crop outputs averaged where they overlap. One crop (size = the image) is the plain network."""
    n, r = x.shape[0], config.img_resolution
    starts = [(i, j) for i in P.window_starts(r, size, stride) for j in P.window_starts(r, size, stride)]
    m = len(starts)
    if m == 1:
        return _apply(config, dtype, variables, x, sigma, class_labels, None, None, return_logvar=return_logvar)
    crops = jnp.concatenate([x[:, i:i + size, j:j + size] for i, j in starts])
    labels = None if class_labels is None else _double(class_labels, n, m)
    out = _apply(config, dtype, variables, crops, _double(sigma, n, m), labels, None, None,
                 return_logvar=return_logvar)
    D, logvar = out if return_logvar else (out, None)
    total = jnp.zeros(x.shape, jnp.float32)
    count = np.zeros((1,) + x.shape[1:3] + (1,), np.float32)
    for c, (i, j) in enumerate(starts):
        total = total.at[:, i:i + size, j:j + size].add(D[c * n:(c + 1) * n])
        count[:, i:i + size, j:j + size] += 1
    D = total / count
    return (D, logvar[:n]) if return_logvar else D


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
                 perturb=None, return_logvar=False, perturbation=None):
        """perturbation: None, a `perturb.Perturbation` or a sequence of them (strength scalar or [N]),
        checked against the network before compiling; dropout_key also keys token_shuffle."""
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        n = x.shape[0]
        rate, keys, perturbed = self._dropout_args(n, dropout_rate, dropout_key, perturb)
        perturbations = P.check_strengths(P.resolve(self.config, perturbation), n)
        keys = self._random_keys(keys, dropout_key, perturbations, n)
        if perturbations and perturbations[0].kind == 'window':
            if rate is not None:
                raise ValueError('a window perturbation cannot be combined with dropout_rate')
            p = perturbations[0]
            return _windowed_apply(self.config, self.dtype, self.variables, x, sigma, class_labels, p.size,
                                   p.stride, return_logvar)
        return _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, rate, keys,
                      perturbed, return_logvar=return_logvar, perturbations=perturbations)

    def stacked(self, x, sigma, class_labels=None, *, copies: int, dropout_rate=None, dropout_key=None,
                perturb=None, perturbation=None, share_prefix=True):
        """D [copies·N] for `copies` stacked copies of x [N] in one pass, where the per-row arguments
        (dropout rates, perturbation strengths, keys) cover all copies·N rows (e.g. zeros on the first
        copy and each guide's strength on its own copy); σ and labels are x's, repeated.

        With share_prefix, the modules before the first one any perturbation touches run once on N
        rows (not with sigma_shift, which changes the whole network).
        """
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        n = x.shape[0]
        b = copies * n
        rate = keys = None
        perturbed = frozenset()
        if dropout_rate is not None:
            rate = _check_rate(dropout_rate, b)
            keys = _per_example_keys(dropout_key, b)
            perturbed = resolve_perturb(self.config, perturb)
        perturbations = P.check_strengths(P.resolve(self.config, perturbation), b)
        if any(p.kind == 'window' for p in perturbations):
            raise ValueError('a window perturbation runs its own pass (it changes the batch shape)')
        keys = self._random_keys(keys, dropout_key, perturbations, b)
        fork = P.first_index(self.config, perturbations, perturbed) if share_prefix else None
        if fork is not None:
            return _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, rate, keys,
                          perturbed, fork, perturbations=perturbations, copies=copies)
        labels = None if class_labels is None else _double(class_labels, n, copies)
        return _apply(self.config, self.dtype, self.variables, _double(x, n, copies),
                      _double(sigma, n, copies), labels, rate, keys, perturbed, perturbations=perturbations)

    def _random_keys(self, keys, dropout_key, perturbations, n):
        """Per-example keys, needed by dropout and token_shuffle."""
        if keys is not None or not any(p.kind in P.RANDOM_KINDS for p in perturbations):
            return keys
        if dropout_key is None:
            raise ValueError('dropout and token_shuffle perturbations need dropout_key (one key per example)')
        return _per_example_keys(dropout_key, n)


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

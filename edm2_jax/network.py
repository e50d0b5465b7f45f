"""EDM2's U-Net (edm2-spec §1.4–1.5), its EDM preconditioning (edm2-spec §1.6) and the `Network` handle.

Dropout is not part of the architecture: the rate (scalar or one per example), the keys and the set
of perturbed blocks are arguments of every call, and so are the other `perturb.Perturbation`s (skip,
attention identity/blur, token shuffle, σ shift, sliding windows), each with per-example strengths.
`fork_at` repeats the batch `copies` times in front of one module, so a clean pass and perturbed
passes (`Network.stacked`) share the computation of the unperturbed prefix.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax.config import BlockSpec, EDM2Config, block_specs
from edm2_jax.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample
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
    def __call__(self, x, emb, perturbations=(), keys=None, noise=None):
        """perturbations: the `perturb.Perturbation`s (strength [N]) that act on this block; keys and
        noise (its dropout uniforms) for the random kinds."""
        s, cfg = self.spec, self.config
        x = P.apply('input', x, perturbations, keys=keys, index=s.index)
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
        y = P.apply('residual', y, perturbations, uniform=noise)
        y = MPConv(s.out_channels, s.out_channels, (3, 3), name='conv_res1')(y)
        if s.flavor == 'dec' and conv_skip is not None:
            x = conv_skip(x)
        skipped = x
        x = mp_sum(x, y, t=cfg.res_balance)
        if s.num_heads:
            x = mp_sum(x, self._attention(x, perturbations), t=cfg.attn_balance)
        x = P.apply('output', x, perturbations, skipped=skipped)
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
        q = P.apply('query', q, perturbations, grid=(h, w))
        logits = jnp.einsum('nqhc,nkhc->nhqk', q, k / np.sqrt(c // heads))
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        y = jnp.einsum('nhqk,nkhc->nqhc', weights, v)
        y = P.apply('attention', y, perturbations, v=v)
        y = y.reshape(n, h, w, c)
        return MPConv(c, c, (1, 1), name='attn_proj')(y)


def _repeat(a, n, copies=2):
    """[a; a; …] (`copies` times) along the batch for per-example arrays (batch n); a broadcast batch
    of 1 stays as it is."""
    return jnp.concatenate([a] * copies) if a.shape[0] == n else a


class UNet(nn.Module):
    """EDM2 U-Net on NHWC inputs (edm2-spec §1.5). Every module output is sown as an intermediate."""
    config: EDM2Config

    @nn.compact
    def __call__(self, x, noise_labels, class_labels, perturbations=(), keys=None, fork_at=None, copies=2):
        """perturbations: block-wise `perturb.Perturbation`s with strengths over all rows; fork_at: the
        index of the module in front of which the batch is repeated `copies` times."""
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
        noise = P.dropout_noise(cfg, perturbations, keys)
        skips = []
        for spec in block_specs(cfg):
            if spec.index == fork_at:
                n = x.shape[0]
                x, emb = _repeat(x, n, copies), _repeat(emb, n, copies)
                skips = [_repeat(s, n, copies) for s in skips]
            if spec.takes_skip:
                x = mp_cat(x, skips.pop(), t=cfg.concat_balance)
            if spec.kind == 'conv':
                x = MPConv(spec.in_channels, spec.out_channels, (3, 3), name=module_name(spec.name))(x)
            else:
                here = P.merge(p for p in perturbations if spec.name in p.where)
                x = Block(spec, cfg.emb_channels, cfg, name=module_name(spec.name))(
                    x, emb, here, keys, noise.get(spec.name))
            if spec.flavor == 'enc':
                skips.append(x)
            self.sow('intermediates', spec.name, x)
        out_gain = self.param('out_gain', nn.initializers.zeros, ())
        return MPConv(cfg.block_channels[0], cfg.img_channels, (3, 3), name='out_conv')(x, gain=out_gain)


class Precond(nn.Module):
    """EDM preconditioning around the U-Net plus the log-variance head (edm2-spec §1.6).

    The image path runs in `dtype`; the noise/label embedding, the weight normalisation and D stay
    float32. sigma is [1] (broadcast) or [N]; class_labels [1 or N, label_dim] or None.
    """
    config: EDM2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, perturbations=(), keys=None, fork_at=None, copies=2,
                 return_logvar=False):
        cfg = self.config
        x = x.astype(jnp.float32)
        sigma = P.apply('sigma', sigma.astype(jnp.float32).reshape(-1, 1, 1, 1), P.merge(perturbations))
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
                                   tuple(p for p in perturbations if p.kind in P.BLOCK_KINDS), keys, fork_at,
                                   copies)
        self.sow('intermediates', 'F', F)
        n = x.shape[0]
        if fork_at is not None:
            x, sigma, c_skip, c_out = (_repeat(a, n, copies) for a in (x, sigma, c_skip, c_out))
        D = c_skip * x + c_out * F.astype(jnp.float32)
        if not return_logvar:
            return D
        logvar = MPConv(cfg.logvar_channels, 1, name='logvar_linear')(
            MPFourier(cfg.logvar_channels, name='logvar_fourier')(c_noise))
        if fork_at is not None:
            logvar = _repeat(logvar, n, copies)
        return D, logvar.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# The public handle.

def _per_example_keys(key, n):
    """[N] typed keys: accepted as [N] typed keys, [N, 2] raw uint32, or one key folded with i."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
    if key.shape != (n,):
        raise ValueError(f'keys must be one key or one key per example ({n}), got shape {key.shape}')
    return key


@functools.partial(jax.jit, static_argnames=('config', 'dtype', 'fork_at', 'copies', 'return_logvar'))
def _apply(config, dtype, variables, x, sigma, class_labels, perturbations=(), keys=None, fork_at=None,
           copies=2, return_logvar=False):
    """Precond.apply compiled once per (config, dtype, shapes, perturbation kinds and blocks);
    strengths are traced. Inlined under an outer jit."""
    return Precond(config, dtype).apply(variables, x, sigma, class_labels, perturbations, keys, fork_at, copies,
                                        return_logvar)


@functools.partial(jax.jit, static_argnames=('config', 'dtype', 'size', 'stride', 'return_logvar'))
def _windowed_apply(config, dtype, variables, x, sigma, class_labels, size, stride, return_logvar=False):
    """Sliding-window evaluation: every size×size crop of every example in one batch (crop-major), the
    crop outputs averaged where they overlap. One crop (size = the image) is the plain network."""
    n, r = x.shape[0], config.img_resolution
    starts = [(i, j) for i in P.window_starts(r, size, stride) for j in P.window_starts(r, size, stride)]
    m = len(starts)
    if m == 1:
        return _apply(config, dtype, variables, x, sigma, class_labels, return_logvar=return_logvar)
    crops = jnp.concatenate([x[:, i:i + size, j:j + size] for i, j in starts])
    labels = None if class_labels is None else _repeat(class_labels, n, m)
    out = _apply(config, dtype, variables, crops, _repeat(sigma, n, m), labels, return_logvar=return_logvar)
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

    Call as `net(x, sigma, class_labels=None, *, perturbation=None, keys=None, dropout_rate=0.0,
    blocks=None, return_logvar=False)` with x NHWC [N, R, R, C], sigma a scalar or [N], class_labels
    [N, label_dim] one-hot (None on a conditional net means all-zero labels, as in EDM2).
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

    @classmethod
    def random(cls, config: EDM2Config, seed: int = 0, *, gains=(0.5, 1.5), dtype=jnp.float32) -> Network:
        """A random network whose output depends on its input, noise level and labels, for
        experiments and tests: every weight and buffer standard normal, every scalar gain uniform in
        `gains` (never zero). `init` gives zero gains, as EDM2 trains from: its output is F = 0, so
        D(x) = c_skip·x and guidance has no effect. Drawn with NumPy from `seed` (nothing compiled,
        fast for large presets); the CLI is `python -m convert.random`."""
        lo, hi = gains
        if not 0 < lo <= hi:
            raise ValueError(f'gains must be a range 0 < lo <= hi, got {gains}')
        rng = np.random.default_rng(seed)
        shapes = jax.eval_shape(lambda k: cls.init(config, k).variables, jax.random.key(0))
        variables = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) if v.ndim
                                                       else rng.uniform(lo, hi), v.dtype), shapes)
        return cls(config, variables, np.dtype(dtype))

    @property
    def module(self) -> Precond:
        return Precond(self.config, self.dtype)

    def with_dtype(self, dtype) -> Network:
        """The same network computing its image path in `dtype` (e.g. bfloat16)."""
        return self.replace(dtype=np.dtype(dtype))

    def __call__(self, x, sigma, class_labels=None, *, perturbation=None, keys=None, dropout_rate=0.0,
                 blocks=None, return_logvar=False):
        """perturbation: None, a `perturb.Perturbation` or a sequence of them (strength scalar or [N]),
        checked against the network before compiling. dropout_rate, blocks: shorthand for
        `perturb.dropout(dropout_rate, blocks)`. keys: one key, or one per example, for the random
        kinds (dropout, token_shuffle)."""
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        n = x.shape[0]
        perturbations = self._perturbations(perturbation, dropout_rate, blocks, n)
        if perturbations and perturbations[0].kind == 'window':
            p = perturbations[0]
            return _windowed_apply(self.config, self.dtype, self.variables, x, sigma, class_labels, p.size,
                                   p.stride, return_logvar)
        return _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, perturbations,
                      self._keys(keys, perturbations, n), return_logvar=return_logvar)

    def stacked(self, x, sigma, class_labels=None, *, copies: int, perturbation=None, keys=None,
                share_prefix=True):
        """D [copies·N] for `copies` stacked copies of x [N] in one pass, where the perturbation
        strengths and keys cover all copies·N rows (e.g. zeros on the first copy and each guide's
        strength on its own copy); σ and labels are x's, repeated.

        With share_prefix, the modules before the first one any perturbation touches run once on N
        rows and their activations (and skip stack) are repeated — the same result for less work
        (not with sigma_shift, which changes the whole network).
        """
        x, sigma, class_labels = self._check_inputs(x, sigma, class_labels)
        n = x.shape[0]
        b = copies * n
        perturbations = self._perturbations(perturbation, 0.0, None, b)
        if any(p.kind == 'window' for p in perturbations):
            raise ValueError('a window perturbation runs its own pass (it changes the batch shape)')
        keys = self._keys(keys, perturbations, b)
        fork = P.first_index(self.config, perturbations) if share_prefix else None
        if fork is not None:
            return _apply(self.config, self.dtype, self.variables, x, sigma, class_labels, perturbations, keys,
                          fork, copies)
        labels = None if class_labels is None else _repeat(class_labels, n, copies)
        return _apply(self.config, self.dtype, self.variables, _repeat(x, n, copies), _repeat(sigma, n, copies),
                      labels, perturbations, keys)

    def _perturbations(self, perturbation, dropout_rate, blocks, n):
        items = [] if perturbation is None else [perturbation] if isinstance(perturbation, P.Perturbation) \
            else list(perturbation)
        if not _is_static_zero(dropout_rate):
            items.append(P.dropout(dropout_rate, blocks))
        elif blocks is not None:
            raise ValueError('blocks selects where dropout_rate applies; give a dropout_rate too')
        out = P.check_strengths(P.resolve(self.config, items), n)
        if len(out) > 1 and any(p.kind == 'window' for p in out):
            raise ValueError('a window perturbation runs its own pass: it cannot be combined with others')
        return out

    @staticmethod
    def _keys(keys, perturbations, n):
        """Per-example keys, needed by dropout and token_shuffle (None when no kind needs them)."""
        if not any(p.kind in P.RANDOM_KINDS for p in perturbations):
            return None
        if keys is None:
            raise ValueError('dropout and token_shuffle need keys (one key, or one per example)')
        return _per_example_keys(keys, n)

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

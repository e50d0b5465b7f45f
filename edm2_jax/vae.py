"""SD-VAE decoder (the decoder half of diffusers' `AutoencoderKL`) in Flax, and EDM2's latent → pixel
conventions (edm2-spec §3.3).

EDM2's ImageNet-512 networks generate 64×64×4 latents of Stability's `sd-vae-ft-mse`, standardised
per channel: raw = (x − bias) / scale. The VAE works on [0, 1] pixels, so an image is
clamp(decode(raw), 0, 1)·255 truncated to uint8 — no 0.18215 factor, no [−1, 1] range. Pixel-space
networks (ImageNet-64) use `rgb_to_uint8` instead.

Arrays are NHWC, conv kernels HWIO, dense kernels [in, out]. Parameter paths mirror diffusers' state
dict with list indices folded into the name: `decoder.up_blocks.0.resnets.1.conv1.weight` →
params['decoder']['up_blocks_0']['resnets_1']['conv1']['kernel'] (GroupNorm weights are 'scale').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from edm2_jax.decoder import DecoderSpec, as_spec

FORMAT = 'edm2-jax-vae'
GROUP_NORM_EPS = 1e-6            # diffusers' Decoder uses eps=1e-6 for every GroupNorm


# ------------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The decoder-relevant part of a diffusers `AutoencoderKL` config; defaults = sd-vae-ft-mse."""
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        object.__setattr__(self, 'block_out_channels', tuple(int(c) for c in self.block_out_channels))
        problems = []
        if not self.block_out_channels:
            problems.append('block_out_channels must not be empty')
        for c in self.block_out_channels:
            if c < 1 or self.norm_num_groups < 1 or c % self.norm_num_groups:
                problems.append(f'block_out_channels entry {c} is not a positive multiple of '
                                f'norm_num_groups={self.norm_num_groups}')
        if self.latent_channels < 1 or self.out_channels < 1 or self.layers_per_block < 0:
            problems.append('latent_channels, out_channels must be >= 1 and layers_per_block >= 0')
        if problems:
            raise ValueError('invalid VAEConfig: ' + '; '.join(problems))

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """Reads a diffusers `AutoencoderKL` config.json dict (encoder-only keys are ignored)."""
        if d.get('act_fn', 'silu') != 'silu':
            raise ValueError(f"unsupported act_fn {d['act_fn']!r}; only 'silu' is implemented")
        bad = [t for t in d.get('up_block_types', ()) if t != 'UpDecoderBlock2D']
        if bad:
            raise ValueError(f'unsupported up_block_types {bad}; only UpDecoderBlock2D is implemented')
        if 'up_block_types' in d and 'block_out_channels' in d and \
                len(d['up_block_types']) != len(d['block_out_channels']):
            raise ValueError('up_block_types and block_out_channels differ in length')
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        if 'block_out_channels' in kwargs:
            kwargs['block_out_channels'] = tuple(kwargs['block_out_channels'])
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """A diffusers-style config dict (round-trips through `from_diffusers`)."""
        d = dataclasses.asdict(self)
        d['block_out_channels'] = list(self.block_out_channels)
        return {'_class_name': 'AutoencoderKL', 'act_fn': 'silu',
                'up_block_types': ['UpDecoderBlock2D'] * len(self.block_out_channels), **d}


# ------------------------------------------------------------------------------------------------
# Modules (diffusers `Decoder` structure; computation in `dtype`, parameters float32)

def _conv(features: int, kernel: int, dtype, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance like torch; the fast E[x²]−E[x]² form loses float32 precision.
    return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPS, dtype=dtype,
                        param_dtype=jnp.float32, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1×1 shortcut when the width changes."""
    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, self.dtype, 'norm1')(x))
        h = _conv(self.out_channels, 3, self.dtype, 'conv1')(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, 'norm2')(h))
        h = _conv(self.out_channels, 3, self.dtype, 'conv2')(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, 'conv_shortcut')(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, GroupNorm in front, residual; softmax in float32."""
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        t = _group_norm(self.groups, self.dtype, 'group_norm')(x).reshape(n, h * w, c)
        q, k, v = dense('to_q')(t), dense('to_k')(t), dense('to_v')(t)
        logits = jnp.einsum('nqc,nkc->nqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = dense('to_out_0')(jnp.einsum('nqk,nkc->nqc', weights, v))
        return x + out.reshape(n, h, w, c)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, 'conv')(x)


class MidBlock(nn.Module):
    """diffusers' `UNetMidBlock2D` at the lowest resolution: resnet, attention, resnet."""
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_0')(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name='attentions_0')(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name='resnets_1')(x)


class UpBlock(nn.Module):
    """diffusers' `UpDecoderBlock2D`: `num_resnets` resnets, then optionally an upsampler."""
    channels: int
    num_resnets: int
    groups: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_resnets):
            x = ResnetBlock(self.channels, self.groups, self.dtype, name=f'resnets_{j}')(x)
        if self.upsample:
            x = Upsample(self.channels, self.dtype, name='upsamplers_0')(x)
        return x


class DecoderBody(nn.Module):
    """diffusers' `Decoder` (everything after post_quant_conv); params live under 'decoder'."""
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt, g = self.config, self.dtype, self.config.norm_num_groups
        widths = cfg.block_out_channels[::-1]
        x = _conv(widths[0], 3, dt, 'conv_in')(x)
        x = MidBlock(widths[0], g, cfg.mid_block_add_attention, dt, name='mid_block')(x)
        for i, width in enumerate(widths):
            x = UpBlock(width, cfg.layers_per_block + 1, g, i < len(widths) - 1, dt,
                        name=f'up_blocks_{i}')(x)
        x = nn.silu(_group_norm(g, dt, 'conv_norm_out')(x))
        return _conv(cfg.out_channels, 3, dt, 'conv_out')(x)


class Decoder(nn.Module):
    """post_quant_conv → conv_in → mid (resnet, attention, resnet) → up blocks (widest first, each
    with layers_per_block + 1 resnets and, except the last, an upsampler) → GroupNorm, SiLU, conv_out.

    Input: raw latents [N, h, w, latent_channels]; output: [N, h·f, w·f, out_channels] float32,
    f = 2**(len(block_out_channels) − 1) — what diffusers' `AutoencoderKL.decode(z).sample` gives.
    """
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f'expected NHWC latents with {cfg.latent_channels} channels, got {z.shape}')
        x = z.astype(dt)
        if cfg.use_post_quant_conv:
            x = _conv(cfg.latent_channels, 1, dt, 'post_quant_conv')(x)
        x = DecoderBody(cfg, dt, name='decoder')(x)
        return x.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The decoder as a pytree, its parameter shapes, loading

@struct.dataclass
class VAEDecoder:
    """Decoder parameters + static config; `vae(z)` on NHWC raw latents = diffusers'
    `decode(z).sample` in NHWC (float32). A pytree (config and dtype static): jit-able as an
    argument, placed with `jax.device_put` (replicated) like a network."""
    variables: dict
    config: VAEConfig = struct.field(pytree_node=False, default=VAEConfig())
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def module(self) -> Decoder:
        return Decoder(self.config, self.dtype)

    def __call__(self, z):
        return _decode(self, jnp.asarray(z, jnp.float32))


@jax.jit
def _decode(vae: VAEDecoder, z):
    return vae.module.apply(vae.variables, z)


def abstract_variables(config: VAEConfig = VAEConfig()) -> dict:
    """Variable shapes for `config` via `jax.eval_shape` (nothing is allocated)."""
    z = jax.ShapeDtypeStruct((1, 1, 1, config.latent_channels), jnp.float32)
    return jax.eval_shape(lambda z: Decoder(config).init(jax.random.key(0), z), z)


def param_count(config: VAEConfig = VAEConfig()) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_variables(config)))


def check_variables(variables: dict, config: VAEConfig) -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped variable."""
    from flax.traverse_util import flatten_dict
    want = {'/'.join(k): tuple(v.shape) for k, v in flatten_dict(abstract_variables(config)).items()}
    have = {'/'.join(k): tuple(np.shape(v)) for k, v in flatten_dict(variables).items()}
    problems = [f'missing {k}' for k in sorted(set(want) - set(have))]
    problems += [f'unexpected {k}' for k in sorted(set(have) - set(want))]
    problems += [f'{k}: shape {have[k]}, expected {want[k]}'
                 for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if problems:
        raise ValueError(f'VAE variables do not match the config ({len(problems)} problems): '
                         + '; '.join(problems[:20]))


def load(path, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> VAEDecoder:
    """The decoder stored by `python -m convert.vae` in `path`, replicated over `mesh` if given;
    `dtype` is the compute dtype (parameters stay float32)."""
    from edm2_jax import checkpoint
    meta = checkpoint.read_meta(path)
    if meta.get('format') != FORMAT:
        raise ValueError(f"{path} is not a VAE checkpoint (format {meta.get('format')!r}, "
                         f'expected {FORMAT!r}); convert one with `python -m convert.vae`')
    config = VAEConfig.from_diffusers(meta['config'])
    sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables, _ = checkpoint.load_variables(path, sharding=sharding)
    check_variables(variables, config)
    return VAEDecoder(variables=dict(variables), config=config, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# EDM2's conventions (edm2-spec §3.3)

def edm2_to_raw(latents, scale, bias):
    """EDM2 latents (NHWC) → raw VAE latents: (x − bias) / scale per channel, float32."""
    scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    return (jnp.asarray(latents, jnp.float32) - bias) / scale


def unit_to_uint8(pixels):
    """[0, 1] pixels → uint8: clamp to [0, 1], ×255, truncate (EDM2's VAE decode)."""
    return (jnp.clip(jnp.asarray(pixels, jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def rgb_to_uint8(x):
    """Pixel-space networks (StandardRGBEncoder decode): (x·127.5 + 128) clipped to [0, 255],
    truncated to uint8 (the +128 makes truncation round to nearest)."""
    return jnp.clip(jnp.asarray(x, jnp.float32) * 127.5 + 128.0, 0.0, 255.0).astype(jnp.uint8)


def latents_to_uint8(decoder_fn: Callable, latents, scale, bias):
    """EDM2 latents [N, h, w, C] → uint8 images [N, H, W, 3]; jittable when `decoder_fn` is."""
    return unit_to_uint8(decoder_fn(edm2_to_raw(latents, scale, bias)))


_vae_latents_to_uint8 = jax.jit(latents_to_uint8)


def decode_latents_to_uint8(vae: VAEDecoder, latents, scale, bias, *, batch_size: int = 4,
                            sharding=None) -> np.ndarray:
    """Host-side batched decode: EDM2 latents → uint8 NHWC numpy images, `batch_size` at a time
    (the last chunk is padded, so one compiled program serves any N). With `sharding` (e.g.
    NamedSharding(mesh, P('data'))) each chunk is split over the devices; `batch_size` must divide
    evenly over them."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != vae.config.latent_channels:
        raise ValueError(f'expected NHWC latents with {vae.config.latent_channels} channels, '
                         f'got shape {latents.shape}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    chunk_shape = (batch_size,) + latents.shape[1:]
    if sharding is not None:
        try:
            sharding.shard_shape(chunk_shape)
        except ValueError as e:
            raise ValueError(f'batch_size={batch_size} does not split over {sharding}: {e}') from None
    scale, bias = np.asarray(scale, np.float32), np.asarray(bias, np.float32)
    if scale.shape != (latents.shape[-1],) or bias.shape != scale.shape:
        raise ValueError(f'scale/bias must have shape ({latents.shape[-1]},), '
                         f'got {scale.shape} and {bias.shape}')
    out = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        chunk = jax.device_put(chunk, sharding) if sharding is not None else chunk
        out.append(np.asarray(_vae_latents_to_uint8(vae, chunk, scale, bias))[:n])
    if not out:
        f, (h, w) = vae.config.upsample_factor, latents.shape[1:3]
        return np.zeros((0, h * f, w * f, vae.config.out_channels), np.uint8)
    return np.concatenate(out)


def make_image_decoder(decoder: DecoderSpec | dict | None, vae: VAEDecoder | None = None, *,
                       batch_size: int = 4) -> Callable[[Any], np.ndarray]:
    """The `x → uint8 NHWC images` function a network's decoder asks for (a DecoderSpec or its
    config.json dict): 'sd-vae' needs `vae`; None or 'rgb' is pixel space."""
    decoder = as_spec(decoder)
    if decoder.kind == 'rgb':
        return lambda x: np.asarray(rgb_to_uint8(x))
    decoder.require_vae(vae)
    return lambda x: decode_latents_to_uint8(vae, x, decoder.scale, decoder.bias, batch_size=batch_size)

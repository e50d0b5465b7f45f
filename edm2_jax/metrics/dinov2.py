"""DINOv2 ViT feature detector (EDM2's FD_DINOv2, edm2-spec §5), in Flax.

Feature = the CLS token after the final LayerNorm (1024-d for ViT-L/14). The model is the pre-norm
ViT of DINOv2: patch embedding (conv k = stride = patch), CLS token, learned position embedding on an
M×M grid interpolated bicubically to the input grid, then blocks
    x += ls1 · Attn(LN1(x));  x += ls2 · MLP(LN2(x))      (ls = per-channel layer scale, GELU MLP)
and a final LayerNorm. All arrays NHWC; dense kernels [in, out]; conv kernels HWIO.

Position-embedding interpolation (only when the input grid differs from the stored M×M grid): torch
bicubic (a = −0.75, align_corners=False). The torch-hub model (EDM2's detector) passes
scale_factor = (g + 0.1)/M ("its offset"); Hugging Face's `Dinov2Model` passes size = g. Set by
`interpolate_offset` (0.1 / 0.0).

Preprocessing (`preprocess`): uint8 → float32, bicubic antialiased resize to 224×224, /255, ImageNet
mean/std — as EDM2's detector wrapper.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax.metrics import resize as resize_lib

HIGHEST = jax.lax.Precision.HIGHEST
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pos_grid: int = 37                  # stored position grid M (img_size 518 / patch 14)
    in_chans: int = 3
    layer_norm_eps: float = 1e-6
    interpolate_offset: float = 0.1     # torch hub; 0.0 for Hugging Face's Dinov2Model

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


VITL14 = DINOv2Config()                  # dinov2_vitl14: 304.4 M parameters (incl. mask_token)


def pos_embed_matrix(config: DINOv2Config, grid: int) -> np.ndarray | None:
    """Interpolation matrix [grid, M] along one axis, or None when no interpolation happens."""
    m = config.pos_grid
    if config.interpolate_offset:
        return resize_lib.bicubic_matrix(m, grid, scale_factor=(grid + config.interpolate_offset) / m)
    return resize_lib.bicubic_matrix(m, grid)


def _dense(features, name, dtype):
    return nn.Dense(features, name=name, dtype=dtype, precision=HIGHEST)


class Block(nn.Module):
    config: DINOv2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        n, t, d = x.shape
        hd = d // c.num_heads
        y = nn.LayerNorm(c.layer_norm_eps, name='norm1', dtype=self.dtype)(x)
        qkv = _dense(3 * d, 'qkv', self.dtype)(y).reshape(n, t, 3, c.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, precision=HIGHEST) * hd ** -0.5
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum('nhqk,nkhd->nqhd', attn, v, precision=HIGHEST).reshape(n, t, d)
        y = _dense(d, 'proj', self.dtype)(y)
        x = x + self.param('ls1', nn.initializers.ones, (d,)) * y
        y = nn.LayerNorm(c.layer_norm_eps, name='norm2', dtype=self.dtype)(x)
        y = _dense(c.mlp_dim, 'fc1', self.dtype)(y)
        y = _dense(d, 'fc2', self.dtype)(jax.nn.gelu(y, approximate=False))
        return x + self.param('ls2', nn.initializers.ones, (d,)) * y


class DINOv2(nn.Module):
    """x [N, H, W, 3] normalised float (H, W multiples of the patch) → CLS feature [N, embed_dim]."""
    config: DINOv2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        p, d, m = c.patch_size, c.embed_dim, c.pos_grid
        gh, gw = x.shape[1] // p, x.shape[2] // p
        x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', name='patch_embed', dtype=self.dtype,
                    precision=HIGHEST)(x[:, :gh * p, :gw * p])
        cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (d,))
        pos = self.param('pos_embed', nn.initializers.normal(0.02), (1 + m * m, d))
        self.param('mask_token', nn.initializers.zeros, (d,))      # unused at inference; kept for counts
        grid_pos = pos[1:].reshape(m, m, d)
        if (gh, gw) != (m, m):
            grid_pos = resize_lib.apply_matrices(grid_pos[None], pos_embed_matrix(c, gh),
                                                 pos_embed_matrix(c, gw))[0]
        n = x.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(cls_token + pos[0], (n, 1, d)),
                                  (x + grid_pos.astype(x.dtype)).reshape(n, gh * gw, d)], axis=1)
        for i in range(c.depth):
            tokens = Block(c, self.dtype, name=f'blocks_{i}')(tokens)
        return nn.LayerNorm(c.layer_norm_eps, name='norm', dtype=self.dtype)(tokens[:, 0]).astype(jnp.float32)


def preprocess(images_uint8):
    """uint8 (or 0..255 float) [N, H, W, 3] → normalised float32 [N, 224, 224, 3], as EDM2's wrapper."""
    x = resize_lib.resize(jnp.asarray(images_uint8, jnp.float32), (INPUT_SIZE, INPUT_SIZE), 'bicubic_aa')
    return (x / 255 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def init_variables(config: DINOv2Config, key=None, abstract: bool = False):
    model = DINOv2(config)
    x = jnp.zeros((1, config.patch_size * 2, config.patch_size * 2, config.in_chans))
    if abstract:
        return jax.eval_shape(model.init, jax.random.key(0), x)
    return model.init(key, x)


def num_params(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


def infer_config(params, **overrides) -> DINOv2Config:
    """Reads the architecture off the parameter shapes (heads cannot be: 64-d heads are assumed)."""
    d = params['cls_token'].shape[-1]
    depth = sum(1 for k in params if k.startswith('blocks_'))
    m = int(round((params['pos_embed'].shape[0] - 1) ** 0.5))
    if d % 64 and 'num_heads' not in overrides:
        raise ValueError(f'embed_dim {d} is not a multiple of 64: give num_heads explicitly')
    fields = dict(patch_size=params['patch_embed']['kernel'].shape[0], embed_dim=d, depth=depth,
                  num_heads=d // 64, mlp_ratio=params['blocks_0']['fc1']['kernel'].shape[1] / d,
                  pos_grid=m, in_chans=params['patch_embed']['kernel'].shape[2])
    return DINOv2Config(**{**fields, **overrides})


def make_feature_fn(config: DINOv2Config, variables, dtype=jnp.float32):
    """jit-compiled uint8 images [N, H, W, 3] → features [N, embed_dim] (float32)."""
    model = DINOv2(config, dtype)

    @jax.jit
    def features(variables, images):
        return model.apply(variables, preprocess(images).astype(dtype))

    return lambda images: features(variables, images)

"""Inception-v3 feature detector for FID (edm2-spec §5): TF's "2015-12-05" graph as ported by pytorch-fid.

The FID variant differs from torchvision's Inception-v3 in its pooling: the avg-pool branches of the
A, C and first E blocks exclude padding from the average (count_include_pad=False), and the last E
block (Mixed_7c) max-pools instead. Feature = global average of Mixed_7c, 2048-d. Every conv is
conv (no bias) → BatchNorm (eps 1e-3, running statistics) → ReLU.

Parameter paths mirror torchvision's names: `Mixed_5b.branch5x5_1.conv.weight` →
params['Mixed_5b']['branch5x5_1']['kernel'] (HWIO), `.bn.{weight,bias,running_mean,running_var}` →
'scale', 'bias', 'mean', 'var'. Arrays are NHWC.

Preprocessing, two variants:
- 'nvidia' (default; EDM2's pickled `inception-2015-12-05.pkl` on uint8): float pixels, TF1's legacy
  bilinear resize to 299×299 (source = destination · in/out, border-clamped), then (x − 128)/128.
  The pickle's TorchScript forward does this as affine_grid(eye(2, 3) with 1/W − 1/299 added to the
  translation) + grid_sample(bilinear, border, align_corners=False), for every input size (checked
  against the decompiled forward of the published detector; the test rebuilds it in torch).
- 'pytorch_fid' (on [0, 1] input): `F.interpolate(bilinear, align_corners=False)` to 299, then 2x − 1.
Same weights; the variants differ slightly for images that are not 299×299.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax.metrics import resize as resize_lib

HIGHEST = jax.lax.Precision.HIGHEST
BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
BLOCK_NAMES = ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
               'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
               'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')


class BasicConv(nn.Module):
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (*self.kernel, x.shape[-1], self.features))
        (ph, pw), c = self.padding, self.features
        y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (self.stride,) * 2,
                                         ((ph, ph), (pw, pw)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                         precision=HIGHEST)
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean = self.param('mean', nn.initializers.zeros, (c,))
        var = self.param('var', nn.initializers.ones, (c,))
        mult = scale * jax.lax.rsqrt(var + BN_EPS)
        return jax.nn.relu(y * mult.astype(y.dtype) + (bias - mean * mult).astype(y.dtype))


def max_pool(x, stride, padding=0):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def avg_pool_exclude_pad(x):
    """3×3, stride 1, padding 1, averaging over the in-image taps only."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class InceptionA(nn.Module):
    pool_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0): BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv(64, (1, 1), 'branch1x1')(x)
        b5 = conv(64, (5, 5), 'branch5x5_2', (2, 2))(conv(48, (1, 1), 'branch5x5_1')(x))
        b3 = conv(64, (1, 1), 'branch3x3dbl_1')(x)
        b3 = conv(96, (3, 3), 'branch3x3dbl_3', (1, 1))(conv(96, (3, 3), 'branch3x3dbl_2', (1, 1))(b3))
        bp = conv(self.pool_features, (1, 1), 'branch_pool')(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=(0, 0): BasicConv(f, k, s, p, dtype=self.dtype, name=name)
        b3 = conv(384, (3, 3), 'branch3x3', 2)(x)
        bd = conv(64, (1, 1), 'branch3x3dbl_1')(x)
        bd = conv(96, (3, 3), 'branch3x3dbl_3', 2)(conv(96, (3, 3), 'branch3x3dbl_2', 1, (1, 1))(bd))
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0): BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), 'branch1x1')(x)
        b7 = conv(c7, (1, 1), 'branch7x7_1')(x)
        b7 = conv(c7, (1, 7), 'branch7x7_2', (0, 3))(b7)
        b7 = conv(192, (7, 1), 'branch7x7_3', (3, 0))(b7)
        bd = conv(c7, (1, 1), 'branch7x7dbl_1')(x)
        bd = conv(c7, (7, 1), 'branch7x7dbl_2', (3, 0))(bd)
        bd = conv(c7, (1, 7), 'branch7x7dbl_3', (0, 3))(bd)
        bd = conv(c7, (7, 1), 'branch7x7dbl_4', (3, 0))(bd)
        bd = conv(192, (1, 7), 'branch7x7dbl_5', (0, 3))(bd)
        bp = conv(192, (1, 1), 'branch_pool')(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=(0, 0): BasicConv(f, k, s, p, dtype=self.dtype, name=name)
        b3 = conv(320, (3, 3), 'branch3x3_2', 2)(conv(192, (1, 1), 'branch3x3_1')(x))
        b7 = conv(192, (1, 1), 'branch7x7x3_1')(x)
        b7 = conv(192, (1, 7), 'branch7x7x3_2', 1, (0, 3))(b7)
        b7 = conv(192, (7, 1), 'branch7x7x3_3', 1, (3, 0))(b7)
        b7 = conv(192, (3, 3), 'branch7x7x3_4', 2)(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    max_pool_branch: bool             # True in Mixed_7c (FIDInceptionE_2), False in Mixed_7b
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0): BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv(320, (1, 1), 'branch1x1')(x)
        b3 = conv(384, (1, 1), 'branch3x3_1')(x)
        b3 = jnp.concatenate([conv(384, (1, 3), 'branch3x3_2a', (0, 1))(b3),
                              conv(384, (3, 1), 'branch3x3_2b', (1, 0))(b3)], axis=-1)
        bd = conv(448, (1, 1), 'branch3x3dbl_1')(x)
        bd = conv(384, (3, 3), 'branch3x3dbl_2', (1, 1))(bd)
        bd = jnp.concatenate([conv(384, (1, 3), 'branch3x3dbl_3a', (0, 1))(bd),
                              conv(384, (3, 1), 'branch3x3dbl_3b', (1, 0))(bd)], axis=-1)
        pooled = max_pool(x, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        bp = conv(192, (1, 1), 'branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """x [N, 299, 299, 3] scaled to [−1, 1] → pool features [N, 2048] (float32)."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dt = self.dtype
        x = x.astype(dt)
        x = BasicConv(32, (3, 3), 2, dtype=dt, name='Conv2d_1a_3x3')(x)
        x = BasicConv(32, (3, 3), dtype=dt, name='Conv2d_2a_3x3')(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), dtype=dt, name='Conv2d_2b_3x3')(x)
        x = max_pool(x, 2)
        x = BasicConv(80, (1, 1), dtype=dt, name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), dtype=dt, name='Conv2d_4a_3x3')(x)
        x = max_pool(x, 2)
        for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
            x = InceptionA(pool_features, dt, name=name)(x)
        x = InceptionB(dt, name='Mixed_6a')(x)
        for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x = InceptionC(c7, dt, name=name)(x)
        x = InceptionD(dt, name='Mixed_7a')(x)
        x = InceptionE(False, dt, name='Mixed_7b')(x)
        x = InceptionE(True, dt, name='Mixed_7c')(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def preprocess(images, scaling: str = 'nvidia'):
    """[N, H, W, 3] pixels → [N, 299, 299, 3] in [−1, 1] (see the module docstring for the variants)."""
    if scaling not in ('nvidia', 'pytorch_fid'):
        raise ValueError(f"scaling must be 'nvidia' or 'pytorch_fid', got {scaling!r}")
    kind = 'bilinear_tf' if scaling == 'nvidia' else 'bilinear'
    x = resize_lib.resize(jnp.asarray(images, jnp.float32), (INPUT_SIZE, INPUT_SIZE), kind)
    return (x - 128) / 128 if scaling == 'nvidia' else 2 * x - 1


def init_variables(key=None, abstract: bool = False):
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    if abstract:
        return jax.eval_shape(InceptionV3FID().init, jax.random.key(0), x)
    return InceptionV3FID().init(key, x)


def make_feature_fn(variables, scaling: str = 'nvidia', dtype=jnp.float32):
    """jit-compiled images [N, H, W, 3] → features [N, 2048] (float32)."""
    model = InceptionV3FID(dtype)

    @jax.jit
    def features(variables, images):
        return model.apply(variables, preprocess(images, scaling))

    return lambda images: features(variables, images)


def num_params(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))

"""Image resizing exactly as the PyTorch detectors do it, as small linear maps along each axis.

Each resize is a matrix `W [out, in]` built in float64 on the host (shapes are static), applied as
`W_h · x · W_wᵀ`, so it is exact up to float32 matmul rounding and has no data-dependent control flow.

- `bilinear_matrix`: `F.interpolate(mode='bilinear', align_corners=False)` without antialiasing
  (the Inception detector's resize to 299).
- `bilinear_tf_matrix`: TF1's legacy `resize_bilinear` (align_corners=False, no half-pixel centres:
  source = destination · in/out, border-clamped), which the TF Inception graph applies; reproduced in
  PyTorch by `grid_sample(affine_grid(θ))` with θ's translation 1/in − 1/out.
- `bicubic_matrix`: `F.interpolate(mode='bicubic', align_corners=False)` without antialiasing, Keys
  cubic with a = −0.75, taps clamped to the border, optionally with an explicit `scale_factor`
  (DINOv2's position-embedding interpolation).
- `antialiased_bicubic_matrix`: `F.interpolate(mode='bicubic', antialias=True)`, PIL-style: Keys
  a = −0.5, support widened by the downscaling factor, weights renormalised over in-range taps
  (EDM2's DINOv2 preprocessing to 224).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _keys_cubic(t, a):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def _linear_weights(src: np.ndarray, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights for source coordinates `src` (edges clamped)."""
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((len(src), n_in))
    np.add.at(w, (np.arange(len(src)), lo), 1 - frac)
    np.add.at(w, (np.arange(len(src)), hi), frac)
    return w


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch's bilinear (align_corners=False): half-pixel centres."""
    return _linear_weights(np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0), n_in)


def bilinear_tf_matrix(n_in: int, n_out: int) -> np.ndarray:
    """TF1's older bilinear resize: samples at destination · n_in / n_out."""
    return _linear_weights(np.arange(n_out) * (n_in / n_out), n_in)


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None, a: float = -0.75) -> np.ndarray:
    """torch's ratio is 1/scale_factor when one is given (DINOv2 passes (g + 0.1)/M), else n_in/n_out."""
    ratio = 1.0 / scale_factor if scale_factor is not None else n_in / n_out
    src = (np.arange(n_out) + 0.5) * ratio - 0.5          # not clamped for cubic
    base = np.floor(src).astype(int)
    t = src - base
    w = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        np.add.at(w, (np.arange(n_out), np.clip(base + k, 0, n_in - 1)), _keys_cubic(t - k, a))
    return w


def antialiased_bicubic_matrix(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    center = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum(np.floor(center - support + 0.5).astype(int), 0)
    hi = np.minimum(np.floor(center + support + 0.5).astype(int), n_in)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        j = np.arange(lo[i], hi[i])
        k = _keys_cubic((j - center[i] + 0.5) * inv, a)
        w[i, j] = k / k.sum()
    return w


def apply_matrices(x, w_h: np.ndarray, w_w: np.ndarray):
    """x [N, H, W, C] float → [N, H', W', C] with W_h [H', H], W_w [W', W]."""
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum('oh,nhwc->nowc', jnp.asarray(w_h, x.dtype), x, precision=hp)
    return jnp.einsum('pw,nowc->nopc', jnp.asarray(w_w, x.dtype), x, precision=hp)


def resize(x, size: tuple[int, int], kind: str):
    """Resizes NHWC float images to `size` with 'bilinear', 'bilinear_tf' or 'bicubic_aa' (see module
    docstring)."""
    make = {'bilinear': bilinear_matrix, 'bilinear_tf': bilinear_tf_matrix,
            'bicubic_aa': antialiased_bicubic_matrix}[kind]
    (h, w), (ho, wo) = x.shape[1:3], size
    if (h, w) == (ho, wo):
        return x
    return apply_matrices(x, make(h, ho), make(w, wo))

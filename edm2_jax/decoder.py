"""How a network's output becomes pixels (edm2-spec §3.3): the `decoder` entry of its config.json.

`DecoderSpec('rgb')`: a pixel-space network (StandardRGBEncoder). `DecoderSpec('sd-vae', scale,
bias, name)`: a latent network whose samples x are standardised VAE latents, raw = (x − bias)/scale,
decoded by the VAE `name`. EDM2's ImageNet-512 networks use Stability's sd-vae-ft-mse with
scale = 0.5/raw_std and bias = −raw_mean·scale per channel (`edm2_scale_bias`).

The converter writes the spec, `edm2_jax.checkpoint.read_decoder` reads it back, and
`vae.make_image_decoder` / `parallel.make_decoder` turn it into a decoding function.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# EDM2's StabilityVAEEncoder defaults (raw latent statistics of sd-vae-ft-mse on ImageNet-512).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5
EDM2_VAE_NAME = 'stabilityai/sd-vae-ft-mse'
KINDS = ('rgb', 'sd-vae')


def edm2_scale_bias(raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean=EDM2_FINAL_MEAN,
                    final_std=EDM2_FINAL_STD) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's per-channel latent standardisation: scale = final_std/raw_std,
    bias = final_mean − raw_mean·scale (float32, as stored in a converted network's config.json)."""
    scale = np.float32(final_std) / np.asarray(raw_std, np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, np.float32) * scale
    return scale, bias


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """'rgb', or 'sd-vae' with per-channel float32 `scale`/`bias` and the VAE's `name`."""
    kind: str
    scale: tuple[float, ...] | None = None
    bias: tuple[float, ...] | None = None
    name: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'unknown decoder type {self.kind!r} (expected "sd-vae" or "rgb")')
        if self.kind == 'rgb':
            if (self.scale, self.bias, self.name) != (None, None, None):
                raise ValueError('an "rgb" decoder has no scale, bias or name')
            return
        scale, bias = _channels(self.scale, 'scale'), _channels(self.bias, 'bias')
        if len(scale) != len(bias):
            raise ValueError(f'SD-VAE decoder: scale has {len(scale)} channels, bias {len(bias)}')
        if any(s == 0 for s in scale):
            raise ValueError('SD-VAE decoder: scale must not be zero')
        if not isinstance(self.name, str):
            raise ValueError(f'SD-VAE decoder: name must be a string, got {type(self.name).__name__}')
        object.__setattr__(self, 'scale', scale)
        object.__setattr__(self, 'bias', bias)

    @classmethod
    def sd_vae(cls, scale=None, bias=None, name: str = EDM2_VAE_NAME) -> DecoderSpec:
        """An SD-VAE decoder; scale/bias default to EDM2's (`edm2_scale_bias`)."""
        if scale is None and bias is None:
            scale, bias = edm2_scale_bias()
        return cls('sd-vae', scale, bias, name)

    @property
    def channels(self) -> int | None:
        """Latent channels the decoder expects (None for 'rgb')."""
        return None if self.scale is None else len(self.scale)

    def to_dict(self) -> dict:
        """The config.json form: {'type': 'rgb'} or {'type': 'sd-vae', 'name', 'scale', 'bias'}."""
        if self.kind == 'rgb':
            return {'type': 'rgb'}
        return {'type': self.kind, 'name': self.name, 'scale': list(self.scale),
                'bias': list(self.bias)}

    @classmethod
    def from_dict(cls, d: dict) -> DecoderSpec:
        if not isinstance(d, dict) or not isinstance(d.get('type'), str):
            raise ValueError(f'a decoder entry must be a dict with a "type", got {d!r}')
        unknown = sorted(set(d) - {'type', 'name', 'scale', 'bias'})
        if unknown:
            raise ValueError(f'unknown decoder fields {unknown}')
        if d['type'] == 'sd-vae':
            return cls('sd-vae', d.get('scale'), d.get('bias'), d.get('name', EDM2_VAE_NAME))
        return cls(d['type'], d.get('scale'), d.get('bias'), d.get('name'))

    def require_vae(self, vae) -> None:
        """Raises unless a latent decoder has its VAE."""
        if self.kind == 'sd-vae' and vae is None:
            raise ValueError(f'this is a latent model: decoding needs the VAE {self.name!r} '
                             '(convert it with `python -m convert.vae` and pass the directory)')


def as_spec(decoder: DecoderSpec | dict | None) -> DecoderSpec:
    """A DecoderSpec from a spec, a config.json dict, or None (a pixel-space network)."""
    if decoder is None:
        return DecoderSpec('rgb')
    if isinstance(decoder, DecoderSpec):
        return decoder
    return DecoderSpec.from_dict(decoder)


def _channels(values, what: str) -> tuple[float, ...]:
    """Finite float32 values of a 1-D sequence, as Python floats (what JSON stores)."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not values or len(values) > 1024:
        raise ValueError(f'SD-VAE decoder: {what} must be a non-empty list of numbers')
    if not all(isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) for v in values):
        raise ValueError(f'SD-VAE decoder: {what} must hold only numbers')
    out = tuple(float(v) for v in np.asarray(values, np.float32))
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f'SD-VAE decoder: {what} must be finite')
    return out

"""PyTorch `state_dict` names (edm2-spec §1.7) ↔ edm2-jax variables, and architecture inference. No torch.

Torch key `unet.enc.16x16_block0.conv_res0.weight` ↔ variables['params']['unet']['enc_16x16_block0']
['conv_res0']['weight']; the Fourier buffers (`*.freqs`, `*.phases`) live in variables['buffers'].
Conv weights OIHW ↔ HWIO, linear weights [out, in] ↔ [in, out], gains are 0-d.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Mapping

import flax.traverse_util
import jax
import numpy as np

from edm2_jax.config import EDM2Config
from edm2_jax.network import Network, module_name

_BUFFERS = ('freqs', 'phases')


def torch_to_path(name: str) -> tuple[str, ...]:
    """'unet.dec.8x8_in0.emb_gain' → ('params', 'unet', 'dec_8x8_in0', 'emb_gain')."""
    parts = name.split('.')
    if len(parts) > 2 and parts[0] == 'unet' and parts[1] in ('enc', 'dec'):
        parts = ['unet', module_name(f'{parts[1]}.{parts[2]}')] + parts[3:]
    return ('buffers' if parts[-1] in _BUFFERS else 'params',) + tuple(parts)


def path_to_torch(path: tuple[str, ...]) -> str:
    """Inverse of `torch_to_path`."""
    parts = list(path[1:])
    if len(parts) > 1 and parts[0] == 'unet' and parts[1][:4] in ('enc_', 'dec_'):
        parts = ['unet', parts[1][:3], parts[1][4:]] + parts[2:]
    return '.'.join(parts)


def torch_to_flax_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)  # OIHW → HWIO
    if a.ndim == 2:
        return a.T  # [out, in] → [in, out]
    return a


def flax_to_torch_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # HWIO → OIHW
    if a.ndim == 2:
        return a.T
    return a


@functools.lru_cache(maxsize=16)
def torch_shapes(config: EDM2Config) -> dict[str, tuple[int, ...]]:
    """The exact state_dict names and shapes of EDM2's Precond for `config` (no allocation)."""
    abstract = jax.eval_shape(lambda key: Network.init(config, key).variables, jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(abstract)
    return {path_to_torch(p): tuple(flax_to_torch_array(np.empty(v.shape, np.int8)).shape)
            for p, v in flat.items()}


_ENC = re.compile(r'^unet\.enc\.(\d+)x\1_(conv|down|block(\d+))\.')
_DEC_BLOCK = re.compile(r'^unet\.dec\.(\d+)x\1_block(\d+)\.')


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> EDM2Config:
    """Architecture from state_dict names and shapes; `overrides` complete or replace any field.

    Not inferable (defaults unless overridden): channels_per_head (64), the balances, clip_act,
    sigma_data, dropout. model_channels defaults to the first level's width (channel_mult[0] = 1).
    """
    def need(name):
        if name not in shapes:
            raise ValueError(f'cannot infer the architecture: missing tensor {name!r}')
        return tuple(shapes[name])

    enc = [m for m in (_ENC.match(k) for k in shapes) if m]
    if not enc:
        raise ValueError('cannot infer the architecture: no "unet.enc.*" tensors found')
    resolutions = sorted({int(m.group(1)) for m in enc}, reverse=True)
    num_blocks = len({m.group(3) for m in enc if m.group(1) == str(resolutions[0]) and m.group(3)})
    widths = [need(f'unet.dec.{r}x{r}_block0.conv_res1.weight')[0] for r in resolutions]
    model_channels = overrides.pop('model_channels', None) or widths[0]
    if any(w % model_channels for w in widths):
        model_channels = math.gcd(*widths)
    label_dim = need('unet.emb_label.weight')[1] if 'unet.emb_label.weight' in shapes else 0
    noise_channels = need('unet.emb_fourier.freqs')[0]
    emb_channels = need('unet.emb_noise.weight')[0]
    attn = set()
    for name in shapes:
        m = _ENC.match(name) or _DEC_BLOCK.match(name)
        if m and name.endswith('attn_qkv.weight') and 'block' in name:
            attn.add(int(m.group(1)))
    inferred = dict(
        img_resolution=resolutions[0],
        img_channels=need('unet.out_conv.weight')[0],
        label_dim=label_dim,
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        channel_mult_noise=None if noise_channels == widths[0] else noise_channels // model_channels,
        channel_mult_emb=None if emb_channels == max(widths) else emb_channels // model_channels,
        num_blocks=num_blocks,
        attn_resolutions=tuple(sorted(attn, reverse=True)),
        logvar_channels=need('logvar_fourier.freqs')[0],
    )
    inferred.update(overrides)
    return EDM2Config(**inferred)


def check_shapes(config: EDM2Config, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    expected = torch_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(f'{k}: got {tuple(shapes[k])}, expected {expected[k]}'
                       for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    if missing or unexpected or misshaped:
        lines = [f'the tensors do not fit the architecture {config}:']
        for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
            if items:
                lines.append(f'  {title} ({len(items)}): ' + ', '.join(items))
        raise ValueError('\n'.join(lines))


def torch_to_network(state_dict: Mapping[str, np.ndarray], config: EDM2Config | None = None,
                     dtype=np.float32, *, consume=False, **overrides) -> Network:
    """A Network from torch-named arrays (any float dtype); the config is inferred unless given.

    Tensors are converted one at a time and placed on the CPU device. With `consume`, each source
    tensor is popped from `state_dict` as it is converted, so source and result are never both held
    in full (the converter's memory bound).
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    if config is None:
        config = infer_config(shapes, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    check_shapes(config, shapes)
    cpu = jax.devices('cpu')[0]
    flat = {}
    for name in list(state_dict):
        source = state_dict.pop(name) if consume else state_dict[name]
        array = np.array(torch_to_flax_array(np.asarray(source)), dtype=dtype, order='C')
        flat[torch_to_path(name)] = jax.device_put(array, cpu)
        del source, array
    return Network(config, flax.traverse_util.unflatten_dict(flat))


def network_to_torch(net: Network) -> dict[str, np.ndarray]:
    """The torch state_dict (names and OIHW/[out, in] layouts) of a Network, as numpy arrays."""
    flat = flax.traverse_util.flatten_dict(net.variables)
    return {path_to_torch(p): np.array(flax_to_torch_array(np.asarray(v)), order="C")
            for p, v in flat.items()}


def precond_kwargs(config: EDM2Config) -> dict:
    """The official Precond's constructor kwargs for `config`, as EDM2's training script passes them
    (plus the fields that differ from their defaults)."""
    kwargs = dict(img_resolution=config.img_resolution, img_channels=config.img_channels,
                  label_dim=config.label_dim, model_channels=config.model_channels,
                  dropout=config.dropout, use_fp16=True)
    default = EDM2Config(config.img_resolution, config.img_channels)
    for field in ('channel_mult', 'num_blocks', 'attn_resolutions', 'channels_per_head',
                  'logvar_channels', 'channel_mult_noise', 'channel_mult_emb'):
        if getattr(config, field) != getattr(default, field):
            value = getattr(config, field)
            kwargs[field] = list(value) if isinstance(value, tuple) else value
    return kwargs

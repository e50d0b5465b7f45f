"""Writes real-format EDM2 network pickles (spec §4.1–4.3) from torch-named arrays, using real torch.

NVIDIA's snapshot pickles are `pickle.dump` of an EasyDict {encoder, dataset_kwargs, loss_fn, ema}
whose persistent objects reduce to `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version: 6, module_src, class_name, state=__dict__}. This module registers
stand-ins for `torch_utils.persistence` and `dnnlib.util` (only while writing), builds a module tree of
real `torch.nn.Module`s (real `torch.nn.ModuleDict` for `unet.enc`/`unet.dec`) holding float16
parameters, and pickles it like the training loop does. No NVIDIA code is involved.

`module_src` is a Python program that would create the file `sentinel` if anyone executed it, so the
converter's tests can show that nothing in the pickle runs.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

from edm2_jax.config import EDM2Config, block_specs

# SD-VAE latent statistics of EDM2's StabilityVAEEncoder (spec §3.3).
RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], np.float32)
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], np.float32)
VAE_SCALE = (np.float32(0.5) / RAW_STD).astype(np.float32)
VAE_BIAS = (np.float32(0.0) - RAW_MEAN * VAE_SCALE).astype(np.float32)


def state_dict_shapes(config: EDM2Config) -> dict[str, tuple[int, ...]]:
    """Torch state_dict names and shapes of EDM2's Precond, in torch order, from the key grammar of
    spec §1.7 (written independently of convert/torch_names.py, so it can check that module)."""
    cemb, cnoise = config.emb_channels, config.noise_channels
    shapes = {'unet.out_gain': (), 'unet.emb_fourier.freqs': (cnoise,),
              'unet.emb_fourier.phases': (cnoise,), 'unet.emb_noise.weight': (cemb, cnoise)}
    if config.label_dim:
        shapes['unet.emb_label.weight'] = (cemb, config.label_dim)
    for spec in block_specs(config):
        p, cin, cout = f'unet.{spec.name}.', spec.in_channels, spec.out_channels
        if spec.kind == 'conv':
            shapes[p + 'weight'] = (cout, cin, 3, 3)
            continue
        shapes[p + 'emb_gain'] = ()
        # Encoder blocks project the skip first, so their residual branch reads cout channels.
        shapes[p + 'conv_res0.weight'] = (cout, cout if spec.flavor == 'enc' else cin, 3, 3)
        shapes[p + 'emb_linear.weight'] = (cout, cemb)
        shapes[p + 'conv_res1.weight'] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[p + 'conv_skip.weight'] = (cout, cin, 1, 1)
        if spec.num_heads:
            shapes[p + 'attn_qkv.weight'] = (3 * cout, cout, 1, 1)
            shapes[p + 'attn_proj.weight'] = (cout, cout, 1, 1)
    shapes['unet.out_conv.weight'] = (config.img_channels, config.block_channels[0], 3, 3)
    shapes['logvar_fourier.freqs'] = (config.logvar_channels,)
    shapes['logvar_fourier.phases'] = (config.logvar_channels,)
    shapes['logvar_linear.weight'] = (1, config.logvar_channels)
    return shapes


# ------------------------------------------------------------------------------------------------
# Stand-in modules and persistent classes.

def _reconstruct_persistent_obj(meta):  # noqa: ARG001 - only its qualified name is pickled
    raise RuntimeError('stand-in: the fixture writer never unpickles')


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
EasyDict.__module__ = 'dnnlib.util'


@contextlib.contextmanager
def _stand_in_modules():
    """Registers torch_utils.persistence and dnnlib.util so pickle can name their globals."""
    added = []
    for pkg, sub, attrs in (('torch_utils', 'persistence',
                             {'_reconstruct_persistent_obj': _reconstruct_persistent_obj}),
                            ('dnnlib', 'util', {'EasyDict': EasyDict})):
        for name in (pkg, f'{pkg}.{sub}'):
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        for key, value in attrs.items():
            setattr(sys.modules[f'{pkg}.{sub}'], key, value)
        setattr(sys.modules[pkg], sub, sys.modules[f'{pkg}.{sub}'])
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


# Lengths of the real module sources in characters (spec §4.3), so the opcode stream matches.
_SRC_CHARS = {'training/encoders.py': 6400, 'training/training_loop.py': 13600,
              'training/networks_edm2.py': 15000}


def _module_src(module: str, sentinel: Path | None) -> str:
    """Stand-in module source; executing it would create `sentinel` (which the tests forbid)."""
    src = f'# stand-in for {module} (the real file defines the EDM2 classes)\n'
    if sentinel:
        src += f'import pathlib\npathlib.Path({str(sentinel)!r}).write_text("module_src ran")\n'
    return src + '#' * (_SRC_CHARS[module] - len(src) - 1) + '\n'


class _Persistent:
    """Mixin: pickles as _reconstruct_persistent_obj(meta), like NVIDIA's @persistent_class."""
    _module_src: str = ''

    def __reduce__(self):
        state = dict(self.__dict__)
        meta = dict(type='class', version=6, module_src=self._module_src,
                    class_name=type(self).__name__, state=state)
        return _reconstruct_persistent_obj, (meta,)


def _persistent_classes(sentinel):
    net_src, enc_src, loss_src = (_module_src(m, sentinel) for m in (
        'training/networks_edm2.py', 'training/encoders.py', 'training/training_loop.py'))
    classes = {}
    for name in ('Precond', 'UNet', 'Block', 'MPConv', 'MPFourier'):
        classes[name] = type(name, (_Persistent, torch.nn.Module), {'_module_src': net_src})
    for name in ('StabilityVAEEncoder', 'StandardRGBEncoder'):
        classes[name] = type(name, (_Persistent,), {'_module_src': enc_src})
    classes['EDM2Loss'] = type('EDM2Loss', (_Persistent,), {'_module_src': loss_src})
    return classes


# ------------------------------------------------------------------------------------------------
# Building the module tree.

def _tensor(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(a, order="C")).to(dtype)  # (ascontiguousarray makes 0-d 1-d)


def _param(a, dtype):
    return torch.nn.Parameter(_tensor(a, dtype), requires_grad=False)


def _new(cls, init_kwargs=None, init_args=(), **attrs):
    obj = cls()
    for key, value in attrs.items():
        setattr(obj, key, value)
    obj._init_args, obj._init_kwargs = tuple(init_args), dict(init_kwargs or {})
    return obj


def _mpconv(classes, w, dtype):
    conv = _new(classes['MPConv'], init_args=(w.shape[1], w.shape[0], list(w.shape[2:])),
                out_channels=w.shape[0])
    conv.weight = _param(w, dtype)
    return conv


def _fourier(classes, freqs, phases, dtype):
    f = _new(classes['MPFourier'], init_args=(freqs.shape[0],))
    f.register_buffer('freqs', _tensor(freqs, dtype))
    f.register_buffer('phases', _tensor(phases, dtype))
    return f


def _block(classes, sd, p, flavor, resample, kwargs, dtype):
    w0 = sd[p + 'conv_res0.weight']
    cout = w0.shape[0]
    qkv = sd.get(p + 'attn_qkv.weight')
    heads = 0 if qkv is None else cout // kwargs.get('channels_per_head', 64)
    block = _new(classes['Block'], init_args=(w0.shape[1], cout, sd[p + 'emb_linear.weight'].shape[1]),
                 init_kwargs=dict(flavor=flavor, resample_mode=resample, attention=qkv is not None,
                                  dropout=kwargs.get('dropout', 0.0)),
                 out_channels=cout, flavor=flavor, resample_filter=[1, 1], resample_mode=resample,
                 num_heads=heads, dropout=kwargs.get('dropout', 0.0), res_balance=0.3,
                 attn_balance=0.3, clip_act=256)
    block.emb_gain = _param(sd[p + 'emb_gain'], dtype)
    block.conv_res0 = _mpconv(classes, w0, dtype)
    block.emb_linear = _mpconv(classes, sd[p + 'emb_linear.weight'], dtype)
    block.conv_res1 = _mpconv(classes, sd[p + 'conv_res1.weight'], dtype)
    for name in ('conv_skip', 'attn_qkv', 'attn_proj'):
        w = sd.get(p + name + '.weight')
        setattr(block, name, None if w is None else _mpconv(classes, w, dtype))
    return block


def build_precond(classes, sd: dict[str, np.ndarray], init_kwargs: dict, dtype):
    """The Precond module tree of the state_dict `sd` (torch names), parameters cast to `dtype`."""
    unet = _new(classes['UNet'], label_balance=0.5, concat_balance=0.5,
                init_kwargs={k: v for k, v in init_kwargs.items()
                             if k not in ('use_fp16', 'sigma_data', 'logvar_channels')})
    unet.out_gain = _param(sd['unet.out_gain'], dtype)
    unet.emb_fourier = _fourier(classes, sd['unet.emb_fourier.freqs'], sd['unet.emb_fourier.phases'],
                                dtype)
    unet.emb_noise = _mpconv(classes, sd['unet.emb_noise.weight'], dtype)
    unet.emb_label = (_mpconv(classes, sd['unet.emb_label.weight'], dtype)
                      if 'unet.emb_label.weight' in sd else None)
    for flavor in ('enc', 'dec'):
        modules = torch.nn.ModuleDict()
        names = dict.fromkeys(k.split('.')[2] for k in sd if k.startswith(f'unet.{flavor}.'))
        for name in names:
            p = f'unet.{flavor}.{name}.'
            if name.endswith('_conv'):
                modules[name] = _mpconv(classes, sd[p + 'weight'], dtype)
            else:
                resample = 'down' if name.endswith('_down') else 'up' if name.endswith('_up') else 'keep'
                modules[name] = _block(classes, sd, p, flavor, resample, init_kwargs, dtype)
        setattr(unet, flavor, modules)
    unet.out_conv = _mpconv(classes, sd['unet.out_conv.weight'], dtype)
    precond = _new(classes['Precond'], init_kwargs=init_kwargs,
                   img_resolution=init_kwargs['img_resolution'],
                   img_channels=init_kwargs['img_channels'], label_dim=init_kwargs['label_dim'],
                   use_fp16=init_kwargs.get('use_fp16', True),
                   sigma_data=init_kwargs.get('sigma_data', 0.5))
    precond.unet = unet
    precond.logvar_fourier = _fourier(classes, sd['logvar_fourier.freqs'],
                                      sd['logvar_fourier.phases'], dtype)
    precond.logvar_linear = _mpconv(classes, sd['logvar_linear.weight'], dtype)
    return precond.eval().requires_grad_(False)


def _encoder(classes, kind):
    if kind == 'sd-vae':
        state = dict(vae_name='stabilityai/sd-vae-ft-mse', scale=VAE_SCALE.copy(), bias=VAE_BIAS.copy(),
                     batch_size=8, _vae=None)
        return _new(classes['StabilityVAEEncoder'], **state)
    if kind == 'rgb':
        return _new(classes['StandardRGBEncoder'])
    return None


def write_edm2_pickle(path, state_dict: dict[str, np.ndarray], init_kwargs: dict, *,
                      encoder: str | None = 'sd-vae', sentinel: Path | None = None,
                      dtype=torch.float16, extra: dict | None = None) -> Path:
    """Writes a snapshot-format pickle {encoder, dataset_kwargs, loss_fn, ema} to `path`.

    init_kwargs: Precond's constructor kwargs as train_edm2.py passes them (e.g. img_resolution,
    img_channels, label_dim, model_channels, dropout, use_fp16 + architecture overrides).
    encoder: 'sd-vae' | 'rgb' | None. extra: more top-level entries (e.g. a second network).
    """
    classes = _persistent_classes(sentinel)
    with _stand_in_modules():
        data = EasyDict(
            encoder=_encoder(classes, encoder),
            dataset_kwargs=EasyDict(class_name='training.dataset.ImageFolderDataset',
                                    path='datasets/img512-sd.zip', use_labels=True),
            loss_fn=_new(classes['EDM2Loss'], init_kwargs=dict(P_mean=-0.4, P_std=1.0),
                         P_mean=-0.4, P_std=1.0, sigma_data=0.5),
            ema=build_precond(classes, state_dict, init_kwargs, dtype),
        )
        if encoder is None:
            del data['encoder']
        data.update(extra or {})
        path = Path(path)
        with open(path, 'wb') as f:
            pickle.dump(data, f, protocol=4)
    return path

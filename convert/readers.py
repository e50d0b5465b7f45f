"""Reading weight files into torch-named numpy arrays: the one place every converter reads from.

Formats (`detect_format` looks at the content, `read_weights` at the suffix):
  pickle       NVIDIA EDM2 network pickle, via `convert.pickle_reader` (no torch, nothing executed);
               `read_pickle` also returns the architecture (`_init_kwargs`) and decoder (`encoder`).
  torch        `torch.save` file, loaded with `weights_only=True` (torch imported only here).
  npz          NumPy archive (no pickles allowed).
  safetensors  read with the `safetensors` library (bfloat16 tensors, which its numpy backend lacks,
               from the offsets of the header it validated).
Every failure is a `UserError` naming the file. Memory is bounded by the file: the tensors of a
pickle or torch file may not hold more bytes than the file (`check_size`), so storages shared by many
tensors cannot amplify what the converters then allocate (.npz members and safetensors tensors each
have their own bytes).
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from convert import pickle_reader
from edm2_jax.config import EDM2Config
from edm2_jax.decoder import DecoderSpec
from edm2_jax.errors import UserError

FORMATS = ('pickle', 'torch', 'npz', 'safetensors')
TORCH_SUFFIXES = ('.bin', '.ckpt', '.pt', '.pth')
_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
_short = pickle_reader.short_repr


def is_float(dtype) -> bool:
    """numpy floating dtypes and ml_dtypes' bfloat16 (not a numpy floating subtype)."""
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def check_size(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """The tensors may hold at most as many bytes as the file (checked before anything is copied)."""
    total, size = sum(int(v.nbytes) for v in tensors.values()), Path(path).stat().st_size
    if total > size:
        raise UserError(f'its tensors hold {total:,} bytes but the file has only {size:,} (tensors '
                        'sharing storage?); refusing to allocate them', where=str(path))


def detect_format(path: Path) -> str:
    """'pickle' | 'torch' | 'npz' | 'safetensors', from the first bytes (and zip member names)."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if head[:4] in (b'PK\x03\x04', b'PK\x05\x06'):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise UserError(f'corrupt or truncated zip archive ({e})', where=str(path)) from None
        if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
            return 'torch'
        if names and all(n.endswith('.npy') for n in names):
            return 'npz'
        raise UserError('zip archive is neither a torch.save file nor an .npz', where=str(path))
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return 'torch'
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return 'pickle'
    if len(head) >= 9 and head[8:9] == b'{' and \
            int.from_bytes(head[:8], 'little') <= path.stat().st_size - 8:
        return 'safetensors'
    raise UserError('unknown file format', where=str(path),
                    fix='expected an EDM2 network pickle, a torch.save file, an .npz or a .safetensors')


# ------------------------------------------------------------------------------------------------
# Tensor files.

def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays; a malformed file is a UserError naming it."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework='numpy') as f:
            names = list(f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in names}
            out = {k: f.get_tensor(k) for k in names if dtypes[k] != 'BF16'}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(f'cannot read the .safetensors file: {" ".join(str(e).split())}',
                        where=str(path)) from None
    if len(out) < len(names):  # the library validated the header; numpy lacks bfloat16
        with open(path, 'rb') as f:
            (n,) = struct.unpack('<Q', f.read(8))
            header = json.loads(f.read(n))
        for k in set(names) - set(out):
            begin, end = header[k]['data_offsets']
            raw = np.fromfile(path, np.uint16, (end - begin) // 2, offset=8 + n + begin)
            out[k] = raw.view(ml_dtypes.bfloat16).reshape(header[k]['shape'])
    return {k: out[k] for k in names}


def _torch_state_dicts(obj):
    """(key path, state_dict) for every str→tensor mapping inside a torch.load result
    (walked without recursion)."""
    import torch
    stack = [((), obj)]
    while stack:
        path, obj = stack.pop()
        if not isinstance(obj, Mapping):
            continue
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            yield '.'.join(path), obj
            continue
        stack.extend((path + (k,), v) for k, v in reversed(obj.items()) if isinstance(k, str))


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch_refusal(e: Exception) -> str:
    """torch's reason, not its generic first line: e.g. 'Unsupported GLOBAL posix.system …'."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if 'GLOBAL' in line or 'Unsupported' in line),
                  lines[0] if lines else '')
    return f'{type(e).__name__}: {reason}'


def read_torch(path: Path, entry: str | None = None,
               prefer: tuple[str, ...] = ()) -> tuple[str, dict[str, np.ndarray]]:
    """(key path, state_dict) of a torch.save file: the state_dict at the dotted key path `entry`,
    else the only one, else the first of `prefer` present."""
    import torch  # only this format needs torch
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            obj = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise UserError(f'cannot load as a torch.save file with weights_only=True: '
                        f'{_torch_refusal(e)}', where=str(path),
                        fix='only state dicts of tensors are accepted') from None
    candidates = dict(_torch_state_dicts(obj))
    if entry is not None:
        if entry not in candidates:
            raise UserError(f'no state_dict at key {entry!r}; found {sorted(candidates) or "none"}',
                            where=str(path))
        chosen = entry
    elif len(candidates) == 1:
        chosen = next(iter(candidates))
    else:
        chosen = next((p for p in prefer if p in candidates), None)
        if chosen is None:
            raise UserError(f'found state_dicts at {sorted(candidates) or "no key"}', where=str(path),
                            fix='choose one with --network=KEY')
    state_dict = {k: _torch_to_numpy(v) for k, v in candidates[chosen].items()}
    check_size(state_dict, path)
    return chosen, state_dict


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f'cannot read the .npz: {e}', where=str(path)) from None


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """A weights file by its suffix: .safetensors, or a torch.save file (a state_dict or a dict
    holding one, e.g. under 'state_dict')."""
    path = Path(path)
    if path.suffix == '.safetensors':
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path, prefer=('state_dict',))[1]
    raise UserError('unknown weights format', where=str(path),
                    fix=f'expected .safetensors or one of {", ".join(TORCH_SUFFIXES)}')


# ------------------------------------------------------------------------------------------------
# EDM2 network files: the tensors plus what the file says about architecture and decoder.

@dataclasses.dataclass
class Source:
    """What a reader found: torch-named arrays, plus architecture/decoder facts if the file has them."""
    format: str
    state_dict: dict[str, np.ndarray]
    entry: str | None = None             # which network inside the file ('ema', a .pt key path, …)
    architecture: dict | None = None     # EDM2Config fields stated by the file
    decoder: DecoderSpec | None = None


# Precond's positional arguments, for pickles whose `_init_args` are not empty.
_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_data',
                 'logvar_channels')
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(EDM2Config))


def _plain(value) -> bool:
    """A number, bool, string or None, or a short list/tuple of numbers (what Precond takes)."""
    scalar = (int, float, bool, str, type(None))
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and len(value) <= 64
                                         and all(isinstance(v, (int, float)) for v in value))


def _architecture_from_init(args, kwargs) -> dict:
    """EDM2Config fields from Precond's recorded constructor arguments."""
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or len(args) > len(_PRECOND_ARGS):
        raise UserError('the network record has malformed _init_args/_init_kwargs')
    if not all(isinstance(k, str) for k in kwargs):
        raise UserError('the network record\'s _init_kwargs has non-string keys')
    given = {**dict(zip(_PRECOND_ARGS, args)), **kwargs}
    arch = {}
    for key, value in given.items():
        if not _plain(value):
            raise UserError(f'the network record\'s {key} is a {type(value).__name__} '
                            f'({_short(value)}), not a number or a list of numbers')
        if key == 'use_fp16' or (key == 'resample_filter' and isinstance(value, (list, tuple))
                                 and list(value) == [1, 1]):
            continue  # fp16 compute is a call-time choice here; [1, 1] is the only filter supported
        if key not in ARCH_FIELDS:
            raise UserError(f'the pickle\'s network uses {key}={_short(value)}, which edm2-jax does '
                            'not support')
        arch[key] = tuple(value) if isinstance(value, list) else value
    return arch


def _decoder_from_encoder(encoder) -> DecoderSpec:
    """Decoder description from the pickle's encoder record (edm2-spec §3.3)."""
    if encoder is None:
        return DecoderSpec('rgb')  # generate_images.py falls back to StandardRGBEncoder
    if not isinstance(encoder, pickle_reader.ObjectRecord):
        raise UserError(f'the pickle\'s encoder is a {type(encoder).__name__}, not an object')
    if encoder.class_name == 'StandardRGBEncoder':
        return DecoderSpec('rgb')
    if encoder.class_name == 'StabilityVAEEncoder':
        state = encoder.state
        try:
            values = [np.asarray(state.get(k)) for k in ('scale', 'bias')]
            if any(v.ndim != 1 or not is_float(v.dtype) for v in values):
                raise ValueError('scale and bias must be 1-D float arrays')
            return DecoderSpec.sd_vae(*values, name=state.get('vae_name', DecoderSpec.sd_vae().name))
        except (ValueError, TypeError) as e:
            raise UserError(f'the pickle\'s SD-VAE encoder is invalid: {e}') from None
    raise UserError(f'unknown encoder class {encoder.class_name!r} in the pickle',
                    fix='pass --decoder=rgb|sd-vae|none')


def read_pickle(path: Path, entry: str | None = None) -> Source:
    """NVIDIA snapshot pickle → the `entry` network (default 'ema'), its architecture and decoder."""
    entry = entry or 'ema'
    try:
        with open(path, 'rb') as f:
            data = pickle_reader.load(f)
        if not isinstance(data, dict):
            raise UserError(f'not an EDM2 network pickle (top level is a {type(data).__name__}, '
                            'expected a dict with an "ema" entry)')
        net = data.get(entry)
        if not isinstance(net, pickle_reader.ObjectRecord) or net.class_name != 'Precond':
            found = {_short(k): getattr(v, 'class_name', type(v).__name__)
                     for k, v in list(data.items())[:20]}
            raise UserError(f'entry {entry!r} is not an EDM2 Precond network; the pickle holds {found}')
        state_dict = pickle_reader.module_state_dict(net)
        check_size(state_dict, path)
        architecture = _architecture_from_init(net.state.get('_init_args', ()),
                                               net.state.get('_init_kwargs', {}))
        return Source('pickle', state_dict, entry, architecture,
                      _decoder_from_encoder(data.get('encoder')))
    except (pickle_reader.PickleFormatError, UserError) as e:
        if isinstance(e, UserError) and e.where is not None:
            raise
        raise UserError(str(e), where=str(path)) from None


def read_source(path: Path, fmt: str, entry: str | None = None) -> Source:
    """The network in `path` (of format `fmt`, see `detect_format`)."""
    if fmt == 'pickle':
        return read_pickle(path, entry)
    if fmt == 'torch':
        chosen, state_dict = read_torch(path, entry, prefer=('ema',))
        return Source('torch', state_dict, chosen or None)
    # Each member of an .npz and each tensor of a (validated) .safetensors has its own bytes.
    return Source(fmt, read_npz(path) if fmt == 'npz' else read_safetensors(path))

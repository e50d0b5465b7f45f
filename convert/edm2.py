r"""Convert EDM2 checkpoints (NVIDIA .pkl, PyTorch .pt, .npz, .safetensors) to edm2-jax directories.

    python -m convert.edm2 --src=edm2-img512-s-2147483-0.130.pkl --dst=checkpoints/img512-s-0.130

Input formats (detected from the file's content, not its name):
  pickle       NVIDIA network pickle (spec §4), read by `convert.pickle_reader` without torch and
               without executing anything in it; the architecture comes from the pickle's
               `_init_kwargs`, the decoder (SD-VAE scale/bias or RGB) from its `encoder`.
  torch        `torch.save` file holding a state_dict or a dict that contains one (loaded with
               `weights_only=True`; torch is imported only for this format).
  npz          NumPy archive of torch-named arrays (no pickles allowed).
  safetensors  safetensors file of torch-named arrays (read with numpy).
Architecture flags complete or override what the file says; the tensors are then checked against the
architecture. The output is `edm2_jax.checkpoint`'s directory (orbax variables + config.json), written
to a temporary directory and renamed at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from convert import pickle_reader
from convert.torch_names import check_shapes, infer_config, torch_to_network
from edm2_jax import checkpoint
from edm2_jax.config import EDM2Config, get_preset

FORMATS = ('pickle', 'torch', 'npz', 'safetensors')
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}
DECODERS = ('auto', 'rgb', 'sd-vae', 'none')

# EDM2's StabilityVAEEncoder latent statistics (spec §3.3): scale = 0.5/raw_std, bias = -raw_mean*scale.
SD_VAE_NAME = 'stabilityai/sd-vae-ft-mse'
_SD_VAE_RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], np.float32)
_SD_VAE_RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], np.float32)

_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
# Precond's positional arguments, for pickles whose `_init_args` are not empty.
_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_data',
                 'logvar_channels')
_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(EDM2Config))


class ConversionError(ValueError):
    """A conversion cannot proceed; the message says why (one error per problem found)."""


@dataclasses.dataclass
class Source:
    """What a reader found: torch-named arrays, plus architecture/decoder facts if the file has them."""
    format: str
    state_dict: dict[str, np.ndarray]
    entry: str | None = None          # which network inside the file ('ema', a .pt key path, …)
    architecture: dict | None = None  # EDM2Config fields stated by the file
    decoder: dict | None = None


# ------------------------------------------------------------------------------------------------
# Format detection and hashing.

def detect_format(path: Path) -> str:
    """'pickle' | 'torch' | 'npz' | 'safetensors', from the first bytes (and zip member names)."""
    with open(path, 'rb') as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] in (b'PK\x03\x04', b'PK\x05\x06'):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise ConversionError(f'{path}: corrupt or truncated zip archive ({e})') from None
        if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
            return 'torch'
        if names and all(n.endswith('.npy') for n in names):
            return 'npz'
        raise ConversionError(f'{path}: zip archive is neither a torch.save file nor an .npz')
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return 'torch'
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return 'pickle'
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8:
        return 'safetensors'
    raise ConversionError(f'{path}: unknown file format (expected an EDM2 network pickle, a '
                          'torch.save file, an .npz or a .safetensors file)')


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Readers.

def _architecture_from_init(args, kwargs) -> dict:
    """EDM2Config fields from Precond's recorded constructor arguments."""
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or len(args) > len(_PRECOND_ARGS):
        raise ConversionError('the network record has malformed _init_args/_init_kwargs')
    given = {**dict(zip(_PRECOND_ARGS, args)), **kwargs}
    arch = {}
    for key, value in given.items():
        if key == 'use_fp16' or (key == 'resample_filter' and list(value) == [1, 1]):
            continue  # fp16 compute is a call-time choice here; [1, 1] is the only filter supported
        if key not in _ARCH_FIELDS:
            raise ConversionError(f'the pickle\'s network uses {key}={value!r}, which edm2-jax does '
                                  'not support')
        arch[key] = tuple(value) if isinstance(value, list) else value
    return arch


def _decoder_from_encoder(encoder) -> dict:
    """Decoder description from the pickle's encoder record (spec §3.3)."""
    if encoder is None:
        return {'type': 'rgb'}  # generate_images.py falls back to StandardRGBEncoder
    if not isinstance(encoder, pickle_reader.ObjectRecord):
        raise ConversionError(f'the pickle\'s encoder is a {type(encoder).__name__}, not an object')
    if encoder.class_name == 'StandardRGBEncoder':
        return {'type': 'rgb'}
    if encoder.class_name == 'StabilityVAEEncoder':
        state = encoder.state
        values = {}
        for key in ('scale', 'bias'):
            a = np.asarray(state.get(key), dtype=np.float64)
            if a.ndim != 1 or not np.all(np.isfinite(a)):
                raise ConversionError(f'the pickle\'s SD-VAE encoder has an invalid {key}: '
                                      f'{state.get(key)!r}')
            values[key] = [float(v) for v in np.asarray(state[key], np.float32)]
        return {'type': 'sd-vae', 'name': str(state.get('vae_name', SD_VAE_NAME)), **values}
    raise ConversionError(f'unknown encoder class {encoder.class_name!r} in the pickle; pass '
                          '--decoder=rgb|sd-vae|none')


def read_pickle(path: Path, entry: str | None = None) -> Source:
    """NVIDIA snapshot pickle → the `entry` network (default 'ema'), its architecture and decoder."""
    entry = entry or 'ema'
    with open(path, 'rb') as f:
        try:
            data = pickle_reader.load(f)
        except pickle_reader.PickleFormatError as e:
            raise ConversionError(f'{path}: {e}') from None
    if not isinstance(data, dict):
        raise ConversionError(f'{path}: not an EDM2 network pickle (top level is a '
                              f'{type(data).__name__}, expected a dict with an "ema" entry)')
    net = data.get(entry)
    if not isinstance(net, pickle_reader.ObjectRecord) or net.class_name != 'Precond':
        found = {k: getattr(v, 'class_name', type(v).__name__) for k, v in data.items()}
        raise ConversionError(f'{path}: entry {entry!r} is not an EDM2 Precond network; the pickle '
                              f'holds {found}')
    try:
        state_dict = pickle_reader.module_state_dict(net)
    except pickle_reader.PickleFormatError as e:
        raise ConversionError(f'{path}: {e}') from None
    architecture = _architecture_from_init(net.state.get('_init_args', ()),
                                           net.state.get('_init_kwargs', {}))
    return Source('pickle', state_dict, entry, architecture, _decoder_from_encoder(data.get('encoder')))


def _torch_state_dicts(obj, path=()):
    """(key path, state_dict) for every str→tensor mapping inside a torch.load result."""
    import torch
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            yield '.'.join(path), obj
            return
        for k, v in obj.items():
            if isinstance(k, str):
                yield from _torch_state_dicts(v, path + (k,))


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_torch(path: Path, entry: str | None = None) -> Source:
    """torch.save file: a state_dict, or a dict holding one at the dotted key path `entry`."""
    import torch  # only this format needs torch
    try:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            obj = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ConversionError(f'{path}: cannot load as a torch.save file with weights_only=True: '
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    candidates = dict(_torch_state_dicts(obj))
    if entry is not None:
        if entry not in candidates:
            raise ConversionError(f'{path}: no state_dict at key {entry!r}; found '
                                  f'{sorted(candidates) or "none"}')
        chosen = entry
    elif len(candidates) == 1:
        chosen = next(iter(candidates))
    elif 'ema' in candidates:
        chosen = 'ema'
    else:
        raise ConversionError(f'{path}: found state_dicts at {sorted(candidates) or "no key"}; '
                              'choose one with --network=KEY')
    state_dict = {k: _torch_to_numpy(v) for k, v in candidates[chosen].items()}
    return Source('torch', state_dict, chosen or None)


def read_npz(path: Path, entry: str | None = None) -> Source:
    del entry
    try:
        with np.load(path, allow_pickle=False) as z:
            return Source('npz', {k: z[k] for k in z.files})
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ConversionError(f'{path}: cannot read the .npz: {e}') from None


def read_safetensors(path: Path, entry: str | None = None) -> Source:
    del entry
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework='numpy') as f:
            return Source('safetensors', {k: f.get_tensor(k) for k in f.keys()})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConversionError(f'{path}: cannot read the .safetensors file: {e}') from None


READERS = {'pickle': read_pickle, 'torch': read_torch, 'npz': read_npz,
           'safetensors': read_safetensors}


# ------------------------------------------------------------------------------------------------
# Conversion.

def select_prefix(state_dict: dict, prefix: str) -> dict:
    """Keeps the tensors whose names start with `prefix`, with the prefix removed."""
    if not prefix:
        return state_dict
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise ConversionError(f'no tensor name starts with the prefix {prefix!r}')
    return selected


def _check_tensors(state_dict: Mapping[str, Any]) -> None:
    bad = [f'{k} ({np.asarray(v).dtype})' for k, v in state_dict.items()
           if not isinstance(v, np.ndarray) or not (np.issubdtype(v.dtype, np.floating)
                                                    or v.dtype == ml_dtypes.bfloat16)]
    if bad:
        raise ConversionError('non-floating-point tensors: ' + ', '.join(bad))
    nonfinite = [k for k, v in state_dict.items() if not np.isfinite(v).all()]
    if nonfinite:
        raise ConversionError('tensors with NaN/Inf values (corrupt file?): ' + ', '.join(nonfinite))


def resolve_config(shapes: Mapping[str, tuple], architecture: dict | None, preset: str | None,
                   overrides: Mapping[str, Any]) -> EDM2Config:
    """Preset < file's architecture < explicit overrides; inference fills the rest; then checked
    against the tensor shapes."""
    fields = dict(get_preset(preset).to_dict()) if preset else {}
    fields.update(architecture or {})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(fields) - set(_ARCH_FIELDS))
    if unknown:
        raise ConversionError(f'unknown architecture fields: {unknown}')
    try:
        if 'img_resolution' in fields and 'img_channels' in fields:
            config = EDM2Config(**fields)
        else:
            config = infer_config(shapes, **fields)
        check_shapes(config, shapes)
    except (ValueError, TypeError) as e:
        raise ConversionError(f'the architecture contradicts the tensors: {e}') from None
    return config


def _decoder(choice: str, source: Source, config: EDM2Config) -> dict | None:
    if choice == 'none':
        return None
    if choice == 'auto' and source.decoder is not None:
        decoder = source.decoder
    elif choice == 'rgb' or (choice == 'auto' and config.img_channels == 3):
        decoder = {'type': 'rgb'}
    elif choice == 'sd-vae' or (choice == 'auto' and config.img_channels == 4):
        scale = (np.float32(0.5) / _SD_VAE_RAW_STD).astype(np.float32)
        bias = (-_SD_VAE_RAW_MEAN * scale).astype(np.float32)
        decoder = {'type': 'sd-vae', 'name': SD_VAE_NAME, 'scale': [float(v) for v in scale],
                   'bias': [float(v) for v in bias]}
    else:
        return None
    if decoder['type'] == 'sd-vae' and len(decoder['scale']) != config.img_channels:
        raise ConversionError(f'the SD-VAE decoder has {len(decoder["scale"])} channels but the '
                              f'network has img_channels={config.img_channels}')
    return decoder


def convert_checkpoint(src, dst, *, network: str | None = None, prefix: str = '',
                       preset: str | None = None, dtype: str = 'float32', decoder: str = 'auto',
                       overwrite: bool = False, **architecture) -> Path:
    """Converts `src` (any supported format) into the edm2-jax checkpoint directory `dst`.

    network: which network inside the file (pickle: top-level entry, default 'ema'; torch: dotted
    key path of the state_dict, default the only one or 'ema'). prefix: use only tensors whose name
    starts with it (and strip it), e.g. 'param/' or 'module.'. preset/architecture: EDM2Config fields
    that complete or override what the file says. dtype: 'float32' | 'bfloat16' | 'float16'.
    decoder: 'auto' (from the pickle's encoder, else by img_channels) | 'rgb' | 'sd-vae' | 'none'.
    Returns the path of the written directory.
    """
    src, dst = Path(src), Path(dst)
    # Cheap checks first.
    if dtype not in DTYPES:
        raise ConversionError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    if decoder not in DECODERS:
        raise ConversionError(f'--decoder must be one of {DECODERS}, got {decoder!r}')
    if preset is not None:
        try:
            get_preset(preset)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    unknown = sorted(set(architecture) - set(_ARCH_FIELDS))
    if unknown:
        raise ConversionError(f'unknown architecture fields: {unknown}')
    if not src.is_file():
        raise ConversionError(f'{src}: no such file')
    if dst.exists() and not overwrite:
        raise ConversionError(f'{dst} already exists (use --overwrite to replace it)')

    start = time.perf_counter()
    fmt = detect_format(src)
    source = READERS[fmt](src, network)
    state_dict = select_prefix(source.state_dict, prefix)
    source.state_dict = None  # let the arrays go once converted
    _check_tensors(state_dict)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    config = resolve_config(shapes, source.architecture, preset, architecture)
    decoder_meta = _decoder(decoder, source, config)
    logging.info('%s: %s file, %d tensors, %.1f M values; %s', src.name, fmt, len(shapes),
                 sum(int(np.prod(s)) for s in shapes.values()) / 1e6, config)
    net = torch_to_network(state_dict, config, DTYPES[dtype], consume=True)
    origin = {'file': src.name, 'sha256': sha256_file(src), 'format': fmt}
    if source.entry:
        origin['network'] = source.entry
    if prefix:
        origin['prefix'] = prefix
    out = checkpoint.save(dst, net, source=origin, decoder=decoder_meta, overwrite=overwrite)
    logging.info('wrote %s in %.1f s', out, time.perf_counter() - start)
    return out


# ------------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string('src', None, 'Checkpoint to convert: NVIDIA EDM2 .pkl, torch.save .pt, .npz '
                        'or .safetensors (format detected from the content).')
    flags.DEFINE_string('dst', None, 'Output directory (must not exist unless --overwrite).')
    flags.DEFINE_bool('overwrite', False, 'Replace --dst if it exists (only after the new one is '
                      'complete).')
    flags.DEFINE_string('network', None, 'Network inside the file: pickle top-level entry (default '
                        '"ema"); torch: dotted key of the state_dict (default: the only one, or "ema").')
    flags.DEFINE_string('prefix', '', 'Use only tensors whose names start with this prefix, stripped '
                        '(e.g. "param/" for the reference .npz files, "module." for DDP state_dicts).')
    flags.DEFINE_string('preset', None, 'EDM2 preset giving the architecture (e.g. img512-s, '
                        'img64-xs, img512-xs-uncond); other architecture flags override it.')
    flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Parameter dtype of the output (published '
                      'weights are float16).')
    flags.DEFINE_enum('decoder', 'auto', list(DECODERS), 'Decoder recorded in config.json: auto = the '
                      'pickle\'s encoder, else SD-VAE for 4 channels and RGB for 3.')
    # Architecture (EDM2Config fields); unset = from the file / preset / inferred from the shapes.
    for name in ('img_resolution', 'img_channels', 'label_dim', 'model_channels', 'channel_mult_noise',
                 'channel_mult_emb', 'num_blocks', 'channels_per_head', 'logvar_channels'):
        flags.DEFINE_integer(name, None, f'Architecture: EDM2Config.{name}.')
    for name in ('channel_mult', 'attn_resolutions'):
        flags.DEFINE_list(name, None, f'Architecture: EDM2Config.{name} (comma-separated integers).')
    for name in ('label_balance', 'concat_balance', 'res_balance', 'attn_balance', 'clip_act',
                 'sigma_data', 'dropout'):
        flags.DEFINE_float(name, None, f'Architecture: EDM2Config.{name}.')
    flags.mark_flags_as_required(['src', 'dst'])


def _architecture_flags() -> dict:
    arch = {}
    for name in _ARCH_FIELDS:
        value = FLAGS[name].value
        if value is None:
            continue
        if name in ('channel_mult', 'attn_resolutions'):
            try:
                value = tuple(int(v) for v in value if v != '')
            except ValueError:
                raise app.UsageError(f'--{name} must be comma-separated integers, got {value}') from None
        arch[name] = value
    return arch


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO
    start = time.perf_counter()
    try:
        out = convert_checkpoint(FLAGS.src, FLAGS.dst, network=FLAGS.network, prefix=FLAGS.prefix,
                                 preset=FLAGS.preset, dtype=FLAGS.dtype, decoder=FLAGS.decoder,
                                 overwrite=FLAGS.overwrite, **_architecture_flags())
    except (ConversionError, FileExistsError) as e:
        sys.exit(f'convert.edm2: error: {e}')
    meta = checkpoint.read_meta(out)
    print(f'wrote {out} in {time.perf_counter() - start:.1f} s\n'
          f'  source:  {meta["source"]}\n  config:  {EDM2Config.from_dict(meta["config"])}\n'
          f'  dtype:   {meta["dtype"]}\n  decoder: {meta["decoder"]}')


if __name__ == '__main__':
    _define_flags()
    app.run(main)

r"""Convert EDM2 checkpoints (NVIDIA .pkl, PyTorch .pt, .npz, .safetensors) to edm2-jax directories.

    python -m convert.edm2 --src=edm2-img512-s-2147483-0.130.pkl --dst=checkpoints/img512-s-0.130

Input formats (detected from the file's content, not its name):
  pickle       NVIDIA network pickle (edm2-spec §4), read by `convert.pickle_reader` without torch and
               without executing anything in it; the architecture comes from the pickle's
               `_init_kwargs`, the decoder (SD-VAE scale/bias or RGB) from its `encoder`.
  torch        `torch.save` file holding a state_dict or a dict that contains one (loaded with
               `weights_only=True`; torch is imported only for this format).
  npz          NumPy archive of torch-named arrays (no pickles allowed).
  safetensors  safetensors file of torch-named arrays (read with the safetensors library).
The readers live in `convert.readers`; every bad input is one `UserError` line (exit status 2).
Architecture flags complete or override what the file says; the tensors are then checked against the
architecture. The output is `edm2_jax.checkpoint`'s directory (orbax variables + config.json), written
to a temporary directory and renamed at the end.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from convert import readers
from convert.readers import ARCH_FIELDS, is_float
from convert.torch_names import check_shapes, infer_config, torch_to_network
from edm2_jax import checkpoint, io
from edm2_jax.config import EDM2Config, get_preset
from edm2_jax.decoder import DecoderSpec
from edm2_jax.errors import UserError, cli_main

DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}
DECODERS = ('auto', 'rgb', 'sd-vae', 'none')


# ------------------------------------------------------------------------------------------------
# Conversion.

def select_prefix(state_dict: dict, prefix: str) -> dict:
    """Keeps the tensors whose names start with `prefix`, with the prefix removed."""
    if not prefix:
        return state_dict
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise UserError(f'no tensor name starts with the prefix {prefix!r}')
    return selected


def _check_tensors(state_dict: Mapping[str, Any]) -> None:
    bad = [f'{k} ({np.asarray(v).dtype})' for k, v in state_dict.items()
           if not isinstance(v, np.ndarray) or not is_float(v.dtype)]
    if bad:
        raise UserError('non-floating-point tensors: ' + ', '.join(bad))
    nonfinite = [k for k, v in state_dict.items() if not np.isfinite(v).all()]
    if nonfinite:
        raise UserError('tensors with NaN/Inf values (corrupt file?): ' + ', '.join(nonfinite))


def resolve_config(shapes: Mapping[str, tuple], architecture: dict | None, preset: str | None,
                   overrides: Mapping[str, Any]) -> EDM2Config:
    """Preset < file's architecture < explicit overrides; inference fills the rest; then checked
    against the tensor shapes."""
    fields = dict(get_preset(preset).to_dict()) if preset else {}
    fields.update(architecture or {})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(fields) - set(ARCH_FIELDS))
    if unknown:
        raise UserError(f'unknown architecture fields: {unknown}')
    try:
        if 'img_resolution' in fields and 'img_channels' in fields:
            config = EDM2Config(**fields)
        else:
            config = infer_config(shapes, **fields)
        check_shapes(config, shapes)
    except (ValueError, TypeError) as e:
        raise UserError(f'the architecture contradicts the tensors: {e}') from None
    return config


def decoder_spec(choice: str, recorded: DecoderSpec | None, config: EDM2Config) -> DecoderSpec | None:
    """--decoder: 'auto' = the `recorded` one (what the file says), else SD-VAE for 4 channels and
    RGB for 3."""
    if choice == 'none':
        return None
    if choice == 'auto' and recorded is not None:
        decoder = recorded
    elif choice == 'rgb' or (choice == 'auto' and config.img_channels == 3):
        decoder = DecoderSpec('rgb')
    elif choice == 'sd-vae' or (choice == 'auto' and config.img_channels == 4):
        decoder = DecoderSpec.sd_vae()
    else:
        return None
    if decoder.kind == 'sd-vae' and decoder.channels != config.img_channels:
        raise UserError(f'the SD-VAE decoder has {decoder.channels} channels but the network has '
                        f'img_channels={config.img_channels}')
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
        raise UserError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    if decoder not in DECODERS:
        raise UserError(f'--decoder must be one of {DECODERS}, got {decoder!r}')
    if preset is not None:
        try:
            get_preset(preset)
        except ValueError as e:
            raise UserError(str(e)) from None
    unknown = sorted(set(architecture) - set(ARCH_FIELDS))
    if unknown:
        raise UserError(f'unknown architecture fields: {unknown}')
    if not src.is_file():
        raise UserError('no such file', where=str(src))
    if dst.exists() and not overwrite:
        raise UserError('already exists', where=str(dst), fix='use --overwrite to replace it')

    start = time.perf_counter()
    try:
        fmt = readers.detect_format(src)
        source = readers.read_source(src, fmt, network)
        state_dict = select_prefix(source.state_dict, prefix)
        source.state_dict = None  # let the arrays go once converted
        _check_tensors(state_dict)
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        config = resolve_config(shapes, source.architecture, preset, architecture)
        decoder_meta = decoder_spec(decoder, source.decoder, config)
    except UserError as e:  # every message names the file
        if e.where is not None:
            raise
        raise UserError(e.problem, where=str(src), fix=e.fix) from None
    logging.info('%s: %s file, %d tensors, %.1f M values; %s', src.name, fmt, len(shapes),
                 sum(int(np.prod(s)) for s in shapes.values()) / 1e6, config)
    net = torch_to_network(state_dict, config, DTYPES[dtype], consume=True)
    origin = {'file': src.name, 'sha256': io.sha256(src), 'format': fmt}
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
    define_architecture_flags()  # unset = from the file / preset / inferred from the shapes
    flags.mark_flags_as_required(['src', 'dst'])


def define_architecture_flags():
    """One flag per EDM2Config field (also used by `convert.random`)."""
    for name in ('img_resolution', 'img_channels', 'label_dim', 'model_channels', 'channel_mult_noise',
                 'channel_mult_emb', 'num_blocks', 'channels_per_head', 'logvar_channels'):
        flags.DEFINE_integer(name, None, f'Architecture: EDM2Config.{name}.')
    for name in ('channel_mult', 'attn_resolutions'):
        flags.DEFINE_list(name, None, f'Architecture: EDM2Config.{name} (comma-separated integers).')
    for name in ('label_balance', 'concat_balance', 'res_balance', 'attn_balance', 'clip_act',
                 'sigma_data', 'dropout'):
        flags.DEFINE_float(name, None, f'Architecture: EDM2Config.{name}.')


def architecture_flags() -> dict:
    """The architecture flags given (EDM2Config fields)."""
    arch = {}
    for name in ARCH_FIELDS:
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


@cli_main('convert.edm2')
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    start = time.perf_counter()
    out = convert_checkpoint(FLAGS.src, FLAGS.dst, network=FLAGS.network, prefix=FLAGS.prefix,
                             preset=FLAGS.preset, dtype=FLAGS.dtype, decoder=FLAGS.decoder,
                             overwrite=FLAGS.overwrite, **architecture_flags())
    meta = checkpoint.read_meta(out)
    print(f'wrote {out} in {time.perf_counter() - start:.1f} s\n'
          f'  source:  {meta["source"]}\n  config:  {EDM2Config.from_dict(meta["config"])}\n'
          f'  dtype:   {meta["dtype"]}\n  decoder: {meta["decoder"]}')


if __name__ == '__main__':
    _define_flags()
    app.run(main)

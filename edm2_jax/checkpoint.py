"""Checkpoint directories: an orbax checkpoint of a variables pytree plus `config.json`.

Layout of `DIR`:
  config.json   JSON description (for a network: format, EDM2Config, dtypes, source file, decoder)
  variables/    orbax PyTree checkpoint of the pytree (uncompressed)

`save_variables`/`load_variables` are generic (any pytree of arrays + a JSON-able dict); `save`/`load`
wrap them for `edm2_jax.Network`. Writing goes through `io.write_atomic_dir` (a uniquely named
temporary directory beside `DIR`, renamed at the end), so an interrupted save leaves no partial
`DIR` (`io.remove_temporaries` deletes what a killed save left). Loading restores against an abstract target built from the stored
metadata (orbax refuses topology changes otherwise), optionally onto a mesh. A missing, truncated or
malformed file raises `UserError` naming it, before any array is read where possible.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from edm2_jax import io
from edm2_jax.config import EDM2Config
from edm2_jax.decoder import DecoderSpec, as_spec
from edm2_jax.errors import UserError
from edm2_jax.network import Network

FORMAT = 'edm2-jax'
CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'
METADATA_FILE = '_METADATA'  # orbax's description of the stored tree (shapes, dtypes)
REWRITE = 'a file is missing or damaged: convert or save the checkpoint again'


def _checkpointer() -> ocp.Checkpointer:
    # Uncompressed: compressing makes orbax hold a second copy of every array while it writes (and
    # float32 weights rounded from float16 would only shrink by ~1/3).
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _on_host(a):
    """jax.Array leaves are written without extra copies; numpy leaves are moved to the CPU device."""
    return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a), jax.devices('cpu')[0])


def save_variables(dst, variables, meta: dict, *, overwrite: bool = False) -> Path:
    """Writes `variables` (a pytree of arrays) and `meta` (JSON-able) to the directory `dst` atomically.

    Refuses an existing `dst` unless `overwrite`; with it, the old directory is replaced only after the
    new one is complete. Pass jax.Arrays to avoid a copy of numpy leaves.
    """
    dst = Path(dst).absolute()
    meta_text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False)  # fail before writing

    def write(tmp):
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / VARIABLES_DIR, args=ocp.args.PyTreeSave(item=jax.tree.map(_on_host, variables)))
        (tmp / CONFIG_FILE).write_text(meta_text + '\n')
    try:
        return io.write_atomic_dir(dst, write, overwrite=overwrite)
    except FileExistsError:
        raise
    except OSError as e:  # read-only or full disk: one line, nothing left behind
        raise UserError(f'cannot write the checkpoint: {e.strerror or e}', where=str(dst),
                        fix='choose a writable destination with enough free space') from None


def read_meta(path) -> dict:
    """The `config.json` (a JSON object) of a checkpoint directory."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / VARIABLES_DIR).is_dir():
        raise UserError(f'not a checkpoint directory (needs {CONFIG_FILE} and {VARIABLES_DIR}/)',
                        where=str(path), fix='give the directory written by convert or train')
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'is not valid JSON ({e})', where=str(config_file), fix=REWRITE) from None
    if not isinstance(meta, dict):
        raise UserError(f'holds a {type(meta).__name__}, not a JSON object', where=str(config_file),
                        fix=REWRITE)
    return meta


def _stored_tree(variables_dir: Path):
    """orbax's metadata tree of `variables_dir`; UserError naming the file if it is unreadable."""
    metadata_file = variables_dir / METADATA_FILE
    try:
        json.loads(metadata_file.read_text())
    except (OSError, ValueError) as e:
        problem = 'is missing' if not metadata_file.exists() else f'is not valid JSON ({e})'
        raise UserError(problem, where=str(metadata_file), fix=REWRITE) from None
    try:
        with _checkpointer() as checkpointer:
            metadata = checkpointer.metadata(variables_dir)
        tree = None if metadata is None else metadata.item_metadata.tree
    except Exception as e:  # orbax and TensorStore raise many types
        raise UserError(f'orbax cannot read the stored tree ({_first_line(e)})', where=str(variables_dir),
                        fix=REWRITE) from None
    if tree is None:
        raise UserError('orbax cannot read the stored tree (its manifest or _sharding file is missing '
                        'or damaged)', where=str(variables_dir), fix=REWRITE)
    return tree


def _first_line(error: BaseException) -> str:
    """The innermost message (TensorStore names the array and the failure there), one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def read_decoder(path) -> DecoderSpec | None:
    """The decoder a network checkpoint's config.json names (None if it names none)."""
    entry = read_meta(path).get('decoder')
    if entry is None:
        return None
    try:
        return DecoderSpec.from_dict(entry)
    except ValueError as e:
        raise UserError(f'invalid "decoder" entry: {e}', where=str(Path(path) / CONFIG_FILE), fix=REWRITE) from None


def abstract_variables(path, sharding=None):
    """ShapeDtypeStructs of the stored pytree; `sharding`: None (default device), one Sharding for
    every leaf, or a pytree of Shardings."""
    tree = _stored_tree(Path(path).absolute() / VARIABLES_DIR)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, sharding)


def load_variables(path, *, sharding=None) -> tuple[Any, dict]:
    """(variables, meta) from a directory written by `save_variables`, placed per `sharding`."""
    path = Path(path).absolute()
    meta = read_meta(path)
    target = abstract_variables(path, sharding)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        with _checkpointer() as checkpointer:
            variables = checkpointer.restore(
                path / VARIABLES_DIR, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except Exception as e:  # TensorStore: a bare Exception
        raise UserError(f'an array cannot be read ({_first_line(e)})', where=str(path / VARIABLES_DIR),
                        fix=REWRITE) from None
    return variables, meta


def _dtype_name(tree) -> str:
    names = sorted({np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(tree)})
    return names[0] if len(names) == 1 else ','.join(names)


def save(dst, net: Network, *, source: dict | None = None,
         decoder: DecoderSpec | dict | None = None, overwrite: bool = False) -> Path:
    """Saves a Network with its EDM2Config, the file it came from (name + sha256) and its decoder
    (a DecoderSpec or its config.json dict; None if unknown)."""
    meta = {
        'format': FORMAT,
        'config': net.config.to_dict(),
        'dtype': _dtype_name(net.variables),
        'compute_dtype': np.dtype(net.dtype).name,
        'source': source,
        'decoder': None if decoder is None else as_spec(decoder).to_dict(),
    }
    return save_variables(dst, net.variables, meta, overwrite=overwrite)


def network_config(path, meta: dict) -> EDM2Config:
    """The EDM2Config of a network checkpoint's meta, after checking its format, config and decoder."""
    where = str(Path(path) / CONFIG_FILE)
    if meta.get('format') != FORMAT:
        raise UserError(f'format is {meta.get("format")!r}, expected {FORMAT!r}', where=where,
                        fix='give a network checkpoint written by convert or train')
    decoder = meta.get('decoder')
    if decoder is not None and not (isinstance(decoder, dict) and isinstance(decoder.get('type'), str)):
        raise UserError(f'decoder must be null or an object with a "type", got {decoder!r}', where=where,
                        fix=REWRITE)
    if not isinstance(meta.get('config'), dict):
        raise UserError(f'"config" must be an object of EDM2Config fields, got {meta.get("config")!r}',
                        where=where, fix=REWRITE)
    try:
        return EDM2Config.from_dict(meta['config'], where='config')
    except ValueError as e:
        raise UserError(str(e), where=where, fix=REWRITE) from None


def load(path, mesh: jax.sharding.Mesh | None = None) -> Network:
    """The Network stored in `path`, its arrays replicated over `mesh` if given."""
    config = network_config(path, read_meta(path))
    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables, meta = load_variables(path, sharding=sharding)
    expected = jax.eval_shape(lambda key: Network.init(config, key).variables, jax.random.key(0))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(variables) != shapes(dict(expected)):
        raise UserError('stored variables do not match the architecture in config.json', where=str(path),
                        fix=REWRITE)
    return Network(config, dict(variables), np.dtype(meta.get('compute_dtype', 'float32')))

"""Checkpoint directories (design §6): an orbax checkpoint of a variables pytree plus `config.json`.

Layout of `DIR`:
  config.json   JSON description (for a network: format, EDM2Config, dtypes, source file, decoder)
  variables/    orbax PyTree checkpoint of the pytree (uncompressed)

`save_variables`/`load_variables` are generic (any pytree of arrays + a JSON-able dict); `save`/`load`
wrap them for `edm2_jax.Network`. Writing goes to a temporary directory beside `DIR` that is renamed
at the end, so an interrupted save leaves no partial `DIR`. Loading restores against an abstract target
built from the stored metadata (orbax refuses topology changes otherwise), optionally onto a mesh.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from edm2_jax.config import EDM2Config
from edm2_jax.decoder import DecoderSpec, as_spec
from edm2_jax.errors import UserError
from edm2_jax.network import Network

FORMAT = 'edm2-jax'
CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'


def _temp_beside(dst: Path, tag: str) -> Path:
    return dst.parent / f'.{dst.name}.{tag}-{uuid.uuid4().hex[:8]}'


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
    if dst.exists() and not overwrite:
        raise FileExistsError(f'{dst} already exists (pass overwrite=True / --overwrite to replace it)')
    meta_text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False)  # fail before writing
    tmp = _temp_beside(dst, 'tmp')
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / VARIABLES_DIR,
                              args=ocp.args.PyTreeSave(item=jax.tree.map(_on_host, variables)))
        (tmp / CONFIG_FILE).write_text(meta_text + '\n')
        if dst.exists():
            old = _temp_beside(dst, 'old')
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # read-only or full disk: one line, nothing left behind
            raise UserError(f'cannot write the checkpoint: {e.strerror or e}', where=str(dst),
                            fix='choose a writable destination with enough free space') from None
        raise
    return dst


def read_meta(path) -> dict:
    """The `config.json` of a checkpoint directory."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f'{path} is not a checkpoint directory (needs {CONFIG_FILE} and '
                                f'{VARIABLES_DIR}/)')
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{config_file} is not valid JSON: {e}') from e


def read_decoder(path) -> DecoderSpec | None:
    """The decoder a network checkpoint's config.json names (None if it names none)."""
    entry = read_meta(path).get('decoder')
    if entry is None:
        return None
    try:
        return DecoderSpec.from_dict(entry)
    except ValueError as e:
        raise ValueError(f'{Path(path) / CONFIG_FILE}: invalid "decoder" entry: {e}') from None


def abstract_variables(path, sharding=None):
    """ShapeDtypeStructs of the stored pytree; `sharding`: None (default device), one Sharding for
    every leaf, or a pytree of Shardings."""
    with _checkpointer() as checkpointer:
        tree = checkpointer.metadata(Path(path).absolute() / VARIABLES_DIR).item_metadata.tree
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
    with _checkpointer() as checkpointer:
        variables = checkpointer.restore(
            path / VARIABLES_DIR, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
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


def load(path, mesh: jax.sharding.Mesh | None = None) -> Network:
    """The Network stored in `path`, its arrays replicated over `mesh` if given."""
    meta = read_meta(path)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path}: config.json format is {meta.get("format")!r}, expected {FORMAT!r}')
    config = EDM2Config.from_dict(meta['config'])
    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables, meta = load_variables(path, sharding=sharding)
    expected = jax.eval_shape(lambda key: Network.init(config, key).variables, jax.random.key(0))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(variables) != shapes(dict(expected)):
        raise ValueError(f'{path}: stored variables do not match the architecture in config.json')
    return Network(config, dict(variables), np.dtype(meta.get('compute_dtype', 'float32')))

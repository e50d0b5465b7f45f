"""Persistence of EDM2 training runs (edm2-spec §6, §6.1): resumable states, EMA snapshots, post-hoc
EMA reconstruction and export of checkpoint.load-able networks.

Run directory layout:
  state-<step:09d>/          whole `training.EDM2State` (orbax via checkpoint.save_variables: written to
                             a temporary directory and renamed, so every state-* directory is complete);
                             config.json holds the TrainConfig, step, images seen and the caller's `extra`
                             (data position, …). The newest `keep` (2) are kept.
  snapshots/phema-<t:012d>-<σ_rel:.3f>.npz
                             one tracked EMA profile at t = images seen (params + buffers, float32) and
                             its meta (t, σ_rel, trained network config); written by io.write_bytes.
  network-[<t:012d>-]<σ_rel:.3f>/
                             post-hoc EMA exports (`export_posthoc`; also into another directory).

A state or snapshot with a non-finite value (a diverged run) is never written and never resumed from;
`io.remove_temporaries(run_dir, recursive=True)` deletes what a killed save left.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import checkpoint
from edm2_jax import io as files
from edm2_jax.config import EDM2Config
from edm2_jax.errors import UserError
from edm2_jax.ema import posthoc_coefficients
from edm2_jax.network import Network
from edm2_jax.training import EDM2State

STATE_FORMAT = 'edm2-jax-train-state'
SNAPSHOT_FORMAT = 'edm2-jax-phema-snapshot'
SNAPSHOT_DIR = 'snapshots'
_STATE_RE = re.compile(r'^state-(\d{9})$')
_SNAP_RE = re.compile(r'^phema-(\d{12})-(\d+\.\d{3})\.npz$')
# Fields that may change between a save and a resume (they do not enter the state's arithmetic).
RESUMABLE_CHANGES = ('duration', 'snapshot_every', 'checkpoint_every')


# ---------------------------------------------------------------------------------------------------
# Whole-state checkpoints.

def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _state_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STATE_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the floating-point leaves of `tree` holding a NaN or ±inf (one reduction each, on device)."""
    leaves = [(jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
              if jnp.issubdtype(a.dtype, jnp.inexact)]
    finite = jax.device_get([jnp.isfinite(a).all() for _, a in leaves])  # dispatched together, one fetch
    return [path for (path, _), ok in zip(leaves, finite) if not ok]


def check_finite(state: EDM2State) -> None:
    """FloatingPointError naming the non-finite leaves: a diverged state must not overwrite good ones."""
    bad = nonfinite_leaves(state)
    if bad:
        raise FloatingPointError(f'the training state at step {int(state.step)} holds non-finite values '
                                 f'in {", ".join(bad[:3])}{" …" if len(bad) > 3 else ""}: the run diverged '
                                 '(lower --lr); nothing was saved, earlier states and snapshots are kept')


def has_snapshots(run_dir) -> bool:
    return (Path(run_dir) / SNAPSHOT_DIR).is_dir()


def history_snapshot_time(times, fraction: float) -> int:
    """The latest snapshot time at or before fraction × the last one (the first if none is)."""
    times = sorted(times)
    return max([t for t in times if t <= fraction * times[-1]], default=times[0])


def export_history(run_dir, fraction: float, sigma_rel: float, log=print) -> Path | None:
    """<run>/history-<t>-<σ_rel>/, the run's own network as a guide: the post-hoc EMA σ_rel at the
    snapshot time t of `history_snapshot_time`, exported once (atomically; a concurrent export of
    the same guide is kept). None when run_dir holds no snapshots."""
    run = Path(run_dir)
    if not has_snapshots(run):
        return None
    t = history_snapshot_time({s.t for s in list_snapshots(run)}, fraction)
    dst = run / f'history-{t:012d}-{sigma_rel:.3f}'
    if not dst.exists():
        log(f'exporting the history guide {dst} (σ_rel {sigma_rel:.3f} at {t} images)')
        try:
            export_posthoc(run, {sigma_rel: dst}, t=t)
        except FileExistsError:
            pass
    return dst


def save_state(run_dir, state: EDM2State, extra: dict | None = None, *, keep: int = 2) -> Path:
    """Writes `state` (+ JSON-able `extra`) to run_dir/state-<step>/ atomically; keeps the newest `keep`.
    A state with non-finite values is refused (FloatingPointError) before anything is written."""
    run_dir = Path(run_dir)
    check_finite(state)
    step = int(state.step)
    leaves = jax.tree.leaves(state)
    meta = {'format': STATE_FORMAT, 'config': state.config.to_dict(), 'step': step,
            'images_seen': step * state.config.batch_size, 'extra': extra or {}, 'leaf_paths': _paths(state)}
    dst = checkpoint.save_variables(run_dir / f'state-{step:09d}',
                                    {f'{i:06d}': leaf for i, leaf in enumerate(leaves)}, meta, overwrite=True)
    for _, old in _state_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _config_differences(stored: dict, current: dict) -> list[str]:
    return [k for k in sorted(set(stored) | set(current))
            if k not in RESUMABLE_CHANGES and stored.get(k) != current.get(k)]


def latest_state(run_dir, template: EDM2State) -> tuple[EDM2State, dict] | None:
    """(state, extra) from the newest state-* directory of `run_dir`, or None if there is none.

    `template`: a state or `training.abstract_train_state(cfg, mesh)`; the restored arrays take its
    shapes, dtypes and shardings and its config. The stored TrainConfig must equal the template's
    except for RESUMABLE_CHANGES.
    """
    dirs = _state_dirs(Path(run_dir))
    if not dirs:
        return None
    path = dirs[-1][1]
    meta = checkpoint.read_meta(path)
    if meta.get('format') != STATE_FORMAT or not isinstance(meta.get('config'), dict):
        raise UserError(f'not a training state (format {meta.get("format")!r})', where=str(path),
                        fix='remove it, or use another --run_dir')
    diff = _config_differences(meta['config'], json.loads(json.dumps(template.config.to_dict())))
    if diff:
        raise UserError(f'stored TrainConfig differs from the current one in {diff}', where=str(path),
                        fix='use another --run_dir')
    if meta.get('leaf_paths') != _paths(template):
        raise UserError('stored state structure does not match the template', where=str(path),
                        fix='use another --run_dir')
    leaves, treedef = jax.tree.flatten(template)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {f'{i:06d}': getattr(leaf, 'sharding', None) or default for i, leaf in enumerate(leaves)}
    stored, _ = checkpoint.load_variables(path, sharding=shardings)
    restored = [stored[f'{i:06d}'] for i in range(len(leaves))]
    for p, a, b in zip(meta['leaf_paths'], restored, leaves):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise UserError(f'{p} stored as {a.dtype}{list(a.shape)}, template {b.dtype}{list(b.shape)}',
                            where=str(path), fix='use another --run_dir')
    state = jax.tree.unflatten(treedef, restored)
    bad = nonfinite_leaves(state)
    if bad:
        raise UserError(f'holds non-finite values in {", ".join(bad[:3])} (a diverged run)', where=str(path),
                        fix='delete this state to resume from an earlier one, or start a new --run_dir '
                            'with a lower --lr')
    return state, meta.get('extra', {})


# ---------------------------------------------------------------------------------------------------
# EMA snapshots and post-hoc reconstruction.

class Snapshot(NamedTuple):
    t: int              # images seen
    sigma_rel: float
    path: Path


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f'{prefix}/{key}'
        out.update(_flatten(name, value) if isinstance(value, dict) else {name: np.asarray(value)})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split('/')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_snapshot(run_dir, state: EDM2State) -> list[Path]:
    """Writes every tracked EMA profile at t = images seen to run_dir/snapshots/ (one .npz each);
    a state with non-finite values is refused (FloatingPointError) before anything is written."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    t = state.images_seen
    if t <= 0:
        raise ValueError('a snapshot needs at least one training step (t > 0)')
    check_finite(state)
    folder.mkdir(parents=True, exist_ok=True)
    buffers = _flatten('buffers', jax.device_get(state.buffers))
    written = []
    for sigma_rel, avg in zip(state.ema.sigma_rels, state.ema.averages):
        meta = {'format': SNAPSHOT_FORMAT, 't': t, 'sigma_rel': sigma_rel, 'step': int(state.step),
                'network': state.config.trained_network.to_dict()}
        arrays = {**_flatten('params', jax.device_get(avg)), **buffers, '__meta__': np.array(json.dumps(meta))}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        dst = folder / f'phema-{t:012d}-{sigma_rel:.3f}.npz'
        files.write_bytes(dst, buf.getvalue())
        written.append(dst)
    return written


def list_snapshots(run_dir) -> list[Snapshot]:
    """All EMA snapshots of a run, sorted by (t, σ_rel); σ_rel read from each file's meta."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    snaps = []
    for p in folder.iterdir():
        if _SNAP_RE.match(p.name):
            meta = read_snapshot(p)[1]
            snaps.append(Snapshot(int(meta['t']), float(meta['sigma_rel']), p))
    return sorted(snaps, key=lambda s: (s.t, s.sigma_rel))


def read_snapshot(path) -> tuple[dict, dict]:
    """(variables {'params', 'buffers'} as numpy, meta) of one snapshot file."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z['__meta__']))
        if meta.get('format') != SNAPSHOT_FORMAT:
            raise ValueError(f'{path}: not an EMA snapshot')
        variables = _unflatten({k: z[k] for k in z.files if k != '__meta__'})
    return variables, meta


def read_snapshot_network(path) -> Network:
    """The network of one of the run's snapshot files (numpy variables)."""
    variables, meta = read_snapshot(path)
    return Network(EDM2Config.from_dict(meta['network']), variables)


def reconstruct_phema(run_dir, sigma_rels: Sequence[float], t: int | None = None, *,
                      snapshots: Sequence[Snapshot] | None = None, load=read_snapshot_network
                      ) -> dict[float, Network]:
    """Post-hoc EMA (edm2-spec §6.1): for each target σ_rel, θ* = Σ_i x_i θ_i over every snapshot with
    t_i ≤ T (both tracked profiles), x from `ema.posthoc_coefficients` (float64 least squares, columns
    summing to 1). T (images) must be a snapshot time; default the latest. Buffers and the config are
    the last snapshot's. snapshots/load: another source (default the run's files, `list_snapshots`):
    its `Snapshot`s and load(path) → Network, e.g. NVIDIA's raw snapshots (`convert.raw_snapshots`).
    """
    snaps = list_snapshots(run_dir) if snapshots is None else list(snapshots)
    if not snaps:
        raise FileNotFoundError(f'{run_dir}: no EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}')
    times = sorted({s.t for s in snaps})
    T = times[-1] if t is None else int(t)
    if T not in times:
        raise ValueError(f'--time {T} is not a snapshot time; available: {times}')
    sigma_rels = [float(s) for s in sigma_rels]
    if not sigma_rels:
        raise ValueError('no target sigma_rels given')
    used = [s for s in snaps if s.t <= T]
    coeffs = posthoc_coefficients([s.t for s in used], [s.sigma_rel for s in used], T, sigma_rels)
    sums: list[Any] = [None] * len(sigma_rels)
    first = None
    for snap, x in zip(used, coeffs):
        net = load(snap.path)
        first = first or net.config
        if net.config != first:
            raise UserError(f'the snapshots hold different networks ({net.config} vs {first})',
                            where=str(snap.path), fix='give the snapshots of one training run')
        for k, xk in enumerate(x):
            term = jax.tree.map(lambda a: xk * np.asarray(a, np.float64), net.variables['params'])
            sums[k] = term if sums[k] is None else jax.tree.map(np.add, sums[k], term)
    return {s: Network(net.config, {'params': jax.tree.map(lambda a: np.asarray(a, np.float32), acc),
                                    'buffers': jax.tree.map(np.asarray, net.variables['buffers'])})
            for s, acc in zip(sigma_rels, sums)}


def network_dir_name(sigma_rel: float, t: int | None = None) -> str:
    """`network-<σ_rel:.3f>`, or `network-<t:012d>-<σ_rel:.3f>` when exported at a chosen time t."""
    return f'network-{sigma_rel:.3f}' if t is None else f'network-{t:012d}-{sigma_rel:.3f}'


def export_posthoc(run_dir, targets: dict[float, Path], *, t: int | None = None, decoder=None,
                   overwrite: bool = False, snapshots: Sequence[Snapshot] | None = None,
                   load=read_snapshot_network) -> dict[float, Path]:
    """The one post-hoc EMA export: for each {σ_rel: directory} of `targets`, the reconstruction at
    snapshot time `t` (default the latest) written checkpoint.load-able, its source (run directory,
    σ_rel, images seen) recorded. decoder: checkpoint meta (a dict or a DecoderSpec, or a function
    of nothing that gives one after the snapshots are read), default {'type': 'rgb'} (pixel-space
    training). snapshots/load: as `reconstruct_phema`. Returns `targets`."""
    snaps = list_snapshots(run_dir) if snapshots is None else list(snapshots)
    if not snaps:
        raise UserError(f'no EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}', where=str(run_dir),
                        fix='give a run directory of experiments.train')
    T = max(s.t for s in snaps) if t is None else int(t)
    nets = reconstruct_phema(run_dir, list(targets), T, snapshots=snaps, load=load)
    decoder = decoder() if callable(decoder) else decoder
    for sigma_rel, dst in targets.items():
        source = {'run_dir': str(Path(run_dir).absolute()), 'sigma_rel': float(sigma_rel), 'images_seen': T}
        checkpoint.save(dst, nets[float(sigma_rel)], source=source, decoder=decoder or {'type': 'rgb'},
                        overwrite=overwrite)
    return targets


def export_network(src, dst, *, sigma_rel: float | None = None, t: int | None = None,
                   decoder: dict | None = None, overwrite: bool = False) -> Path:
    """Writes a checkpoint.load-able directory `dst` from
      - a Network (as is),
      - an EDM2State: its tracked EMA profile `sigma_rel` (None: the raw trained weights),
      - a run directory: the post-hoc EMA `sigma_rel` (required) at snapshot time `t` (default latest),
        via `export_posthoc`.
    The config records the trained dropout rate. decoder: checkpoint meta, default {'type': 'rgb'}
    (pixel-space training).
    """
    if not isinstance(src, (Network, EDM2State)):
        if sigma_rel is None:
            raise ValueError('exporting from a run directory needs sigma_rel')
        return export_posthoc(src, {float(sigma_rel): Path(dst)}, t=t, decoder=decoder,
                              overwrite=overwrite)[float(sigma_rel)]
    source = None
    if isinstance(src, Network):
        net = src
    else:
        net = src.network(sigma_rel)
        source = {'images_seen': src.images_seen, 'sigma_rel': sigma_rel}
    return checkpoint.save(dst, net, source=source, decoder=decoder or {'type': 'rgb'}, overwrite=overwrite)

r"""Train an EDM2 network (edm2-spec §6): resumable, logged, with post-hoc EMA export at the end.

    python -m experiments.train --preset=fmnist-main --run_dir=$HOME/.cache/edm2-jax/fmnist/fmnist-main
    python -m experiments.train --config=my_config.json --data=images.zip --run_dir=runs/mine

Run directory:
  run.json              preset, data source and TrainConfig of the run (a rerun with a different
                        configuration is refused before anything is written)
  state-<step>/         resumable training states (every `checkpoint_every` images and at exit)
  snapshots/            EMA snapshots (every `snapshot_every` images and at the end)
  training_log.jsonl    one JSON line per --log_every steps: step, images, loss, lr, images/s, …
  loss.png              loss curve (at the end)
  network-<σ_rel>/      post-hoc EMA reconstructions (checkpoint.load-able), at the end
  done.json             summary of the finished run

A rerun resumes from the newest state; batches are a pure function of (seed, step) and the noise of
each example a function of (seed, its position in the data stream), so an interrupted and resumed run
ends with the same weights as an uninterrupted one. Ctrl-C saves a state before exiting.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from absl import app, flags

from edm2_jax.errors import UserError, cli_main
from edm2_jax.io import remove_temporaries, save_figure, write_json, write_text
from edm2_jax.train_presets import EXPORT_SIGMA_RELS, PRESET_DATA, TRAIN_PRESETS

FLAGS = flags.FLAGS
RUN_FORMAT = 'edm2-jax-train-run'
LOG_FILE = 'training_log.jsonl'


def define_flags() -> None:
    """The CLI flags (defined only when run as a script, so importing this module from another
    script or a test cannot clash with its flags)."""
    flags.DEFINE_enum('preset', None, list(TRAIN_PRESETS), 'Training preset (edm2_jax/train_presets.py).')
    flags.DEFINE_string('config', None, 'JSON file of a TrainConfig (TrainConfig.to_dict()), instead of --preset.')
    flags.DEFINE_string('run_dir', None, 'Run directory (created; resumed if it holds a run).')
    flags.DEFINE_string('data', None, "Training data: 'fashion-mnist', an image folder / .zip, or a .npz "
                        "(default: the preset's; resized to the network's resolution).")
    flags.DEFINE_integer('duration', None, 'Override: training length in images.')
    flags.DEFINE_integer('batch', None, 'Override: global batch size.')
    flags.DEFINE_float('lr', None, 'Override: reference learning rate lr_ref.')
    flags.DEFINE_integer('seed', None, 'Override: the run seed (data order, noise, dropout, init).')
    flags.DEFINE_list('export_std', None, "EMA lengths σ_rel exported at the end (default: the preset's; "
                      '0.10 with --config).')
    flags.DEFINE_integer('log_every', 20, 'Steps per line of training_log.jsonl.')
    flags.DEFINE_integer('devices', None, 'Number of local devices for data parallelism (default: all). '
                         'On CPU, more than one simulates host devices.')
    flags.DEFINE_integer('stop_after_steps', None, 'Testing: stop once the run reaches this many steps.')
    flags.DEFINE_enum('stop_kind', 'kill', ['kill', 'save'], "With --stop_after_steps: 'kill' exits without "
                      "saving anything (as a killed process), 'save' writes a training state first.")
    flags.DEFINE_bool('progress', True, 'Show a progress bar.')


# ---------------------------------------------------------------------------------------------------
# Settings: everything is checked before data or devices are touched.

def resolve_settings(f) -> dict:
    """The run's settings (TrainConfig, data source, export list, …) from the flags, or ValueError."""
    from edm2_jax.ema import sigma_rel_to_gamma
    from edm2_jax.training import TrainConfig
    if (f.preset is None) == (f.config is None):
        raise ValueError('give exactly one of --preset and --config')
    if f.run_dir is None:
        raise ValueError('give --run_dir')
    if f.preset is not None:
        cfg, data = TRAIN_PRESETS[f.preset], PRESET_DATA[f.preset]
        export = EXPORT_SIGMA_RELS[f.preset]
    else:
        try:
            cfg = TrainConfig.from_dict(json.loads(Path(f.config).read_text()))
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UserError are ValueErrors
            raise UserError(str(e), where=f'--config {f.config}',
                            fix='write it from TrainConfig.to_dict() (JSON)') from None
        data, export = None, (0.10,)
    changes = {k: v for k, v in (('duration', f.duration), ('batch_size', f.batch), ('lr_ref', f.lr),
                                 ('seed', f.seed)) if v is not None}
    cfg = cfg.replace(**changes)  # TrainConfig validates
    data = f.data or data
    if data is None:
        raise ValueError(f'--preset={f.preset} has no default data set: give --data')
    if os.path.exists(data):
        data = str(Path(data).absolute())  # the run record names the same files from any directory
    if f.export_std is not None:
        try:
            export = tuple(float(v) for v in f.export_std)
        except ValueError:
            raise ValueError(f'--export_std: expected numbers, got {",".join(f.export_std)!r}') from None
    for s in export:
        sigma_rel_to_gamma(s)  # ValueError names the valid range
    if f.log_every < 1:
        raise ValueError(f'--log_every must be >= 1, got {f.log_every}')
    if f.devices is not None and f.devices < 1:
        raise ValueError(f'--devices must be >= 1, got {f.devices}')
    if f.devices is not None and cfg.batch_size % f.devices:
        raise ValueError(f'batch size {cfg.batch_size} is not divisible by --devices={f.devices}')
    if f.stop_after_steps is not None and f.stop_after_steps < 1:
        raise ValueError(f'--stop_after_steps must be >= 1, got {f.stop_after_steps}')
    return dict(config=cfg, preset=f.preset, data=data, run_dir=Path(f.run_dir), export=export,
                log_every=f.log_every, devices=f.devices, stop_after_steps=f.stop_after_steps,
                stop_kind=f.stop_kind, progress=f.progress)


def run_record(s: dict) -> dict:
    return {'format': RUN_FORMAT, 'preset': s['preset'], 'data': s['data'], 'config': s['config'].to_dict()}


def check_run_dir(s: dict) -> None:
    """Refuses a run directory holding a run of another configuration (or data) — before any write."""
    from edm2_jax.train_state import RESUMABLE_CHANGES
    path = s['run_dir'] / 'run.json'
    if not path.is_file():
        if s['run_dir'].is_dir() and any(p.name.startswith('state-') for p in s['run_dir'].iterdir()):
            raise ValueError(f'{s["run_dir"]} holds training states but no run.json: not a run of this script')
        return
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from None
    current = json.loads(json.dumps(run_record(s)))
    if stored.get('format') != RUN_FORMAT:
        raise ValueError(f'{path}: not a training run record')
    diffs = [] if stored.get('data') == current['data'] else [f"data ({stored.get('data')!r} vs {current['data']!r})"]
    old, new = stored.get('config', {}), current['config']
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            diffs.append(f'{key} ({old.get(key)!r} vs {new.get(key)!r})')
    if diffs:
        raise ValueError(f'{s["run_dir"]} holds a run of a different configuration: it differs in '
                         f'{"; ".join(diffs)}. Use another --run_dir (nothing was changed).')


# ---------------------------------------------------------------------------------------------------
# Files.

def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(run_dir: Path, step: int) -> None:
    """Drops log lines past `step` (written by a run killed after its last saved state)."""
    lines = read_log(run_dir)
    kept = [rec for rec in lines if rec['step'] <= step]
    if len(kept) != len(lines):
        write_text(run_dir / LOG_FILE, ''.join(json.dumps(rec) + '\n' for rec in kept))


def plot_loss(run_dir: Path, records: list[dict]) -> Path:
    """loss.png: training loss (mean per log window) and learning rate against images seen."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    images = [r['images'] / 1e3 for r in records]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(images, [r['loss'] for r in records], lw=1)
    ax.set_ylabel('loss (per image, EDM2 objective)')
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax_lr.plot(images, [r['lr'] for r in records], lw=1, color='tab:orange')
    ax_lr.set_ylabel('lr')
    ax_lr.set_xlabel('training images (k)')
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = save_figure(run_dir / 'loss.png', fig, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The run.

def load_data(s: dict):
    """(images uint8 [N,R,R,C], labels int [N] or None) at the network's resolution, checked."""
    from edm2_jax.data import load_images
    net = s['config'].network
    data = load_images(s['data'], resolution=net.img_resolution)
    expected = (net.img_resolution, net.img_resolution, net.img_channels)
    if data.images.shape[1:] != expected:
        raise ValueError(f'--data {s["data"]}: images are {data.images.shape[1:]}, the network needs {expected}')
    if not net.label_dim:
        return data.images, None
    if data.labels is None:
        raise ValueError(f'--data {s["data"]} has no labels but the network is class-conditional '
                         f'(label_dim {net.label_dim})')
    if data.labels.min() < 0 or data.labels.max() >= net.label_dim:
        raise ValueError(f'--data {s["data"]}: labels must lie in [0, {net.label_dim})')
    return data.images, data.labels


def _mesh(devices: int | None):
    import jax
    from edm2_jax import parallel
    local = jax.local_devices()
    n = len(local) if devices is None else devices
    if n > len(local):
        raise ValueError(f'--devices={n} but only {len(local)} local devices exist')
    return None if n == 1 else parallel.data_mesh(local[:n])


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise FloatingPointError(f'training loss became {x}; the run diverged (lower --lr?)')
    return x


def train(s: dict) -> dict:
    """Runs (or resumes) the training of settings `s`; returns done.json's content, or
    {'stopped': step} when --stop_after_steps ended it early."""
    import jax
    import numpy as np
    from edm2_jax import data as data_lib, train_state, training

    cfg, run_dir = s['config'], s['run_dir']
    check_run_dir(s)
    remove_temporaries(run_dir, recursive=True)  # left by a process killed while saving
    images, labels = load_data(s)
    mesh = _mesh(s['devices'])
    num_devices = 1 if mesh is None else mesh.devices.size
    if cfg.batch_size % num_devices:
        raise ValueError(f'batch size {cfg.batch_size} is not divisible by {num_devices} devices')
    run_dir.mkdir(parents=True, exist_ok=True)

    restored = train_state.latest_state(run_dir, training.abstract_train_state(cfg, mesh))
    if restored is None:
        state, extra = training.init_train_state(cfg, jax.random.key(cfg.seed), mesh), {}
    else:
        state, extra = restored
    write_json(run_dir / 'run.json', run_record(s))
    b = cfg.batch_size
    step = int(state.step)
    total_steps = -(-cfg.duration // b)
    done_path = run_dir / 'done.json'
    if step >= total_steps and done_path.is_file():
        return json.loads(done_path.read_text())
    done_path.unlink(missing_ok=True)
    truncate_log(run_dir, step)
    elapsed = float(extra.get('elapsed_s', 0.0))
    step_fn = training.make_train_step(cfg, mesh)
    eye = np.eye(cfg.network.label_dim, dtype=np.float32) if labels is not None else None

    def save():
        train_state.save_state(run_dir, state, {'elapsed_s': elapsed + time.perf_counter() - start,
                                                'data': s['data']})

    bar = None
    if s['progress']:
        from tqdm import tqdm
        bar = tqdm(total=total_steps * b, initial=step * b, unit='img', unit_scale=True, desc=run_dir.name,
                   dynamic_ncols=True, file=sys.stderr)
    log = open(run_dir / LOG_FILE, 'a')
    start = window_start = time.perf_counter()
    losses, first_step_s, saved_step = [], None, step
    try:
        while step < total_steps:
            idx = data_lib.batch_indices(len(images), b, cfg.seed, step)
            x = data_lib.to_model_range(images[idx])
            y = None if eye is None else eye[labels[idx]]
            ids = np.arange(step * b, (step + 1) * b, dtype=np.int64)
            state, metrics = step_fn(state, x, y, ids)
            losses.append(metrics['loss'])
            step += 1
            if first_step_s is None:
                jax.block_until_ready(metrics['loss'])
                first_step_s = time.perf_counter() - start  # includes compilation
            before, after = (step - 1) * b, step * b
            if step % s['log_every'] == 0 or step == total_steps:
                loss = _finite(float(np.mean(jax.device_get(losses))))
                now = time.perf_counter()
                rec = {'step': step, 'images': after, 'loss': loss, 'lr': float(metrics['lr']),
                       'images_per_s': round(len(losses) * b / (now - window_start), 2),
                       'elapsed_s': round(elapsed + now - start, 2), 'time': time.time()}
                log.write(json.dumps(rec) + '\n')
                log.flush()
                losses, window_start = [], now
                if bar is not None:
                    bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
            if training.crossed(before, after, cfg.snapshot_every) or step == total_steps:
                train_state.save_snapshot(run_dir, state)
            if training.crossed(before, after, cfg.checkpoint_every) or step == total_steps:
                save()
                saved_step = step
            if bar is not None:
                bar.update(b)
            if s['stop_after_steps'] is not None and step >= s['stop_after_steps'] and step < total_steps:
                if s['stop_kind'] == 'save' and saved_step != step:
                    save()
                return {'stopped': step}
    except KeyboardInterrupt:
        if saved_step != step:
            save()
        raise
    finally:
        log.close()
        if bar is not None:
            bar.close()
    train_time = elapsed + time.perf_counter() - start

    records = read_log(run_dir)
    plot_loss(run_dir, records)
    targets = {float(sr): run_dir / train_state.network_dir_name(sr) for sr in s['export']}
    train_state.export_posthoc(run_dir, targets, overwrite=True)
    exported = {f'{sr:.3f}': dst.name for sr, dst in targets.items()}
    window = records[-max(1, len(records) // 10):]
    summary = {
        'preset': s['preset'], 'data': s['data'], 'config': cfg.to_dict(),
        'steps': step, 'images': step * b, 'train_time_s': round(train_time, 1),
        'first_step_s_this_process': None if first_step_s is None else round(first_step_s, 2),
        'images_per_s': round(step * b / train_time, 2) if train_time else None,  # incl. compilation
        'images_per_s_median_window': float(np.median([r['images_per_s'] for r in records[1:]]))
        if len(records) > 1 else None,
        'final_loss': records[-1]['loss'] if records else None,
        'final_loss_last10pct': float(np.mean([r['loss'] for r in window])) if records else None,
        'networks': exported, 'devices': num_devices, 'platform': jax.devices()[0].platform,
        'jax_version': jax.__version__,
    }
    write_json(done_path, summary)
    return summary


@cli_main('train', catch=(ValueError, FileNotFoundError, FloatingPointError))
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    s = resolve_settings(FLAGS)
    import jax
    if s['devices'] and s['devices'] > 1:
        jax.config.update('jax_num_cpu_devices', s['devices'])  # CPU only; accelerators ignore it
    summary = train(s)
    if 'stopped' in summary:
        print(f"train: stopped at step {summary['stopped']} (--stop_after_steps, --stop_kind={s['stop_kind']})")
        sys.exit(3 if s['stop_kind'] == 'kill' else 0)
    print(f"train: done: {summary['images']} images in {summary['train_time_s']:.0f} s "
          f"({summary['images_per_s']} img/s), final loss {summary['final_loss']:.4f}, networks "
          f"{', '.join(summary['networks'].values())} in {s['run_dir']}")


if __name__ == '__main__':
    define_flags()
    app.run(main)

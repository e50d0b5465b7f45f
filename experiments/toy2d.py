"""The 2-D toy experiment (docs/toy2d-spec.md): takes the main model and the two guides from
experiments/toy2d_models (or trains them, cached with orbax under --outdir/models; the main model with
its run's EMA snapshots, for the history guides), samples with every guidance method from common start
points, and writes figure.png, metrics.json (method → metric → value, with the exact-vs-exact row
'exact') and metrics.md.

  python -m experiments.toy2d                  # the demo: 113 s on a 2-core CPU (shared, load 4), bundled models
  python -m experiments.toy2d --quick          # tiny models, < 1 min (tests / CI)
  python -m experiments.toy2d --large          # 4× the samples (16384 per method), the same models
  python -m experiments.toy2d --sweep          # + in-situ (p, w) heat-maps (sweep.png)
  python -m experiments.toy2d --full           # toy2d-spec §9 grids, --large, 3 training × 3 sampling seeds (hours)

It ends with the paths it wrote and the per-family summary; the full table is in metrics.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm.auto import tqdm

from edm2_jax import checkpoint, io
from edm2_jax.errors import cli_main
from edm2_jax.toy import metrics as metrics_lib
from edm2_jax.toy import fractal as mixture_lib
from edm2_jax.toy import plot as plot_lib
from edm2_jax.toy import report
from edm2_jax.toy import train as train_lib
from edm2_jax.toy.methods import Method, Model
from edm2_jax.toy import methods as methods_lib
from edm2_jax.toy.model import ToyConfig

FLAGS = flags.FLAGS
flags.DEFINE_string('outdir', 'toy2d_out', 'Output directory (models are cached in OUTDIR/models).')
flags.DEFINE_bool('quick', False, 'Tiny models and few samples (a test; well under 2 minutes).')
flags.DEFINE_bool('large', False, 'The figure\'s sample count: 16384 samples per method instead of 4096 '
                  '(the same models).')
flags.DEFINE_bool('full', False, "The spec's full grids with 3 training x 3 sampling seeds (hours).")
flags.DEFINE_bool('sweep', False, 'Also run the in-situ (p, w) grid and draw sweep.png.')
flags.DEFINE_bool('retrain', False, 'Train the models even if cached or bundled ones exist.')
flags.DEFINE_integer('num_samples', None, 'Samples per method (default 4096; --large, --full 16384; --quick 2048).')
flags.DEFINE_list('train_seeds', None, 'Training seeds (default 0; --full 0,1,2).')
flags.DEFINE_list('sample_seeds', None, 'Sampling seeds (start points; default 1; --full 1,2,3).')
flags.DEFINE_float('dropout_train_rate', 0.0, 'If > 0, also train a main model WITH dropout at this rate '
                   "(denoiser readout) and evaluate in-situ guidance on it ('trained-dropout' rows).")
flags.DEFINE_bool('figure', True, 'Write figure.png.')
flags.DEFINE_bool('trajectories', None, 'Draw the zoomed trajectories in the figure (default: on, off with --quick).')


class Setting(NamedTuple):
    main_width: int
    guide_width: int
    main_steps: int
    guide_steps: int
    batch: int
    num_samples: int
    figure_grid: int
    main_snapshots: int   # EMA snapshots of the main run (every 1/main_snapshots of it; 0: none, no history rows)


DEMO = Setting(64, 32, 4096, 512, 4096, 1 << 12, 200, 8)    # LARGE's models (shared cache), ¼ of its samples
LARGE = Setting(64, 32, 4096, 512, 4096, 1 << 14, 300, 8)
QUICK = Setting(16, 8, 256, 64, 512, 2048, 120, 0)
FIGURE_W = {'cfg': 3.0, 'ag': 2.0, 'insitu': 2.0}      # the paper's operating points (w = g − 1)
SELF_GUIDE_W = 2.0   # the figure's skip-layer and sigma-shift panels: best row at this w (as in-situ)


# ---------------------------------------------------------------------------------------------------
# Models (trained once, cached).

def model_specs(s: Setting, dropout_rate: float) -> dict[str, train_lib.TrainSpec]:
    specs = {
        'main': train_lib.TrainSpec('A', ToyConfig(s.main_width), s.main_steps, s.batch, snapshots=s.main_snapshots),
        'ag': train_lib.TrainSpec('A', ToyConfig(s.guide_width), s.guide_steps, s.batch),
        'cfg': train_lib.TrainSpec('AB', ToyConfig(s.guide_width), s.guide_steps, s.batch),
    }
    if dropout_rate > 0:
        specs['drop'] = train_lib.TrainSpec('A', ToyConfig(s.main_width, readout='denoiser'), s.main_steps,
                                            s.batch, dropout_rate=dropout_rate)
    return specs


# The default demo's models (training seed 0), trained by this script and saved with `save_bundled`:
# the demo starts sampling at once; --retrain trains them again (about 4 minutes on 2 CPU cores).
BUNDLED = Path(__file__).with_name('toy2d_models')


def _spec_meta(spec: train_lib.TrainSpec, seed: int) -> dict:
    d = spec._asdict()
    d['config'] = spec.config._asdict()
    return {'format': 'edm2-jax-toy2d', 'seed': seed, 'spec': d}


def _to_tree(params):
    return {'gain': params['gain'], 'weights': {str(i): w for i, w in enumerate(params['weights'])}}


def _from_tree(tree):
    ws = tree['weights']
    return {'gain': jnp.asarray(tree['gain']), 'weights': tuple(jnp.asarray(ws[str(i)]) for i in range(len(ws)))}


def _stacked(snapshots) -> dict:
    """The snapshots' parameters stacked along a leading axis (in `TrainSpec.snapshot_points` order)."""
    return _to_tree(jax.tree.map(lambda *a: np.stack(a), *[s.params for s in snapshots]))


def _unstacked(params, spec: train_lib.TrainSpec) -> list[train_lib.Snapshot]:
    return [train_lib.Snapshot(t, s, jax.tree.map(lambda a: a[i], params))
            for i, (t, s) in enumerate(spec.snapshot_points())]


def _npz_arrays(params, prefix: str = '') -> dict:
    return {f'{prefix}gain': np.asarray(params['gain'])} | {f'{prefix}w{i}': np.asarray(w)
                                                           for i, w in enumerate(params['weights'])}


def _npz_params(z, prefix: str = ''):
    count = sum(k.startswith(f'{prefix}w') for k in z.files)
    return {'gain': jnp.asarray(z[f'{prefix}gain']),
            'weights': tuple(jnp.asarray(z[f'{prefix}w{i}']) for i in range(count))}


def _bundled(name: str, seed: int, spec: train_lib.TrainSpec):
    """The shipped (parameters, snapshots) of NAME-seedS if trained with exactly these settings, else None."""
    path = BUNDLED / f'{name}-seed{seed}.npz'
    if not path.is_file():
        return None
    with np.load(path) as z:
        if json.loads(str(z['meta'])) != json.loads(json.dumps(_spec_meta(spec, seed))):
            return None
        snapshots = _unstacked(_npz_params(z, 'snapshot_'), spec) if spec.snapshots else []
        return _npz_params(z), snapshots


def save_bundled(outdir, seed: int = 0) -> None:
    """Ships OUTDIR/models/*-seedS (models this script trained, with their snapshots) as BUNDLED/*.npz."""
    for path in sorted((Path(outdir) / 'models').glob(f'*-seed{seed}')):
        tree, meta = checkpoint.load_variables(path)
        snapshots = _npz_arrays(_from_tree(tree['snapshots']), 'snapshot_') if 'snapshots' in tree else {}
        io.save_npz(BUNDLED / f'{path.name}.npz', meta=np.asarray(json.dumps(meta)),
                    **_npz_arrays(_from_tree(tree)), **snapshots)


def get_model(outdir: Path, name: str, spec: train_lib.TrainSpec, seed: int, retrain: bool
              ) -> tuple[Model, list[train_lib.Snapshot], float]:
    """Loads OUTDIR/models/NAME-seedS if its stored spec matches, else the bundled model if it
    matches, else trains and saves it. Returns the model, its run's EMA snapshots (`spec.snapshots`)
    and the training wall time (0 when loaded)."""
    path = outdir / 'models' / f'{name}-seed{seed}'
    meta = _spec_meta(spec, seed)
    if not retrain and not path.exists() and (bundled := _bundled(name, seed, spec)) is not None:
        return Model(bundled[0], spec.config), bundled[1], 0.0
    if path.exists() and not retrain:
        try:
            tree, stored = checkpoint.load_variables(path)
            if stored == json.loads(json.dumps(meta)):
                snapshots = _unstacked(_from_tree(tree['snapshots']), spec) if spec.snapshots else []
                return Model(_from_tree(tree), spec.config), snapshots, 0.0
            logging.info('%s: cached model has different settings; retraining', path)
        except (FileNotFoundError, ValueError) as e:
            logging.warning('%s: cannot load (%s); retraining', path, e)
    t0 = time.time()
    key = jax.random.fold_in(jax.random.key(seed), sum(map(ord, name)))
    params, _, snapshots = train_lib.train(spec, key, desc=f'train {name} (seed {seed})')
    jax.block_until_ready(params)
    elapsed = time.time() - t0
    tree = _to_tree(params) | ({'snapshots': _stacked(snapshots)} if snapshots else {})
    checkpoint.save_variables(path, tree, meta, overwrite=True)
    return Model(params, spec.config), snapshots, elapsed


def history_guides(snapshots, spec: train_lib.TrainSpec) -> dict[str, Model]:
    """The `toy.methods.HISTORY` guides of a run from its snapshots (`toy.methods.history_model`)."""
    total = spec.steps * spec.batch
    return {name: methods_lib.history_model(snapshots, spec.config, sigma_rel or spec.ema_sigma_rel,
                                            round(total * fraction))
            for name, (fraction, sigma_rel) in methods_lib.HISTORY.items()}


# ---------------------------------------------------------------------------------------------------
# Evaluation.

def evaluate_methods(methods, models, noise, keys, reference, tau, key, desc, keep=None):
    """Metrics per method; the samples are also stored in `keep` (name → samples) if given."""
    out = {}
    for m in tqdm(methods, desc=desc, mininterval=1.0):
        x = methods_lib.sample(m, models, noise, keys)
        out[m.name] = metrics_lib.evaluate(x, reference, tau=tau, key=key)
        if keep is not None:
            keep[m.name] = x
    return out


def zoom_start_points(key, n_candidates=4096, spacing=0.045, sigma=0.03):
    """Exact draws from p_A(·; 0.03) inside the zoom view, thinned greedily to a minimum spacing."""
    (cx, cy), h = plot_lib.ZOOM
    x = np.asarray(mixture_lib.draw(mixture_lib.mixture('A'), key, n_candidates, sigma))
    x = x[(np.abs(x[:, 0] - cx) < h) & (np.abs(x[:, 1] - cy) < h)]
    kept = []
    for p in x:
        if all(np.hypot(*(p - q)) >= spacing for q in kept):
            kept.append(p)
    return np.asarray(kept, np.float32).reshape(-1, 2)


def dropout_sanity(models, key, rates):
    """Held-out per-σ loss with dropout off, one pass, and the mean of 32 passes (toy2d-spec §9 item 4)."""
    rows = {}
    for name, rate in rates.items():
        m = models[name]
        classes = 'A'
        for sigma in (0.02, 0.1, 0.5):
            k = jax.random.fold_in(key, int(sigma * 1000))
            rows[f'{name} p={rate:g} σ={sigma:g}'] = {
                'off': train_lib.heldout_loss(m.params, m.config, classes, sigma, k),
                'one_pass': train_lib.heldout_loss(m.params, m.config, classes, sigma, k, dropout_rate=rate),
                'mean_32': train_lib.heldout_loss(m.params, m.config, classes, sigma, k, dropout_rate=rate,
                                                  passes=32)}
    return rows


@cli_main('toy2d')
def main(argv):
    del argv
    if FLAGS.quick and (FLAGS.full or FLAGS.large):
        raise app.UsageError('--quick excludes --large and --full')
    if not 0.0 <= FLAGS.dropout_train_rate < 1.0:
        raise app.UsageError('--dropout_train_rate must lie in [0, 1)')
    setting = QUICK if FLAGS.quick else LARGE if FLAGS.large or FLAGS.full else DEMO
    n = FLAGS.num_samples or setting.num_samples
    if n < 64:
        raise app.UsageError('--num_samples must be >= 64')
    try:
        train_seeds = [int(s) for s in (FLAGS.train_seeds or (['0', '1', '2'] if FLAGS.full else ['0']))]
        sample_seeds = [int(s) for s in (FLAGS.sample_seeds or (['1', '2', '3'] if FLAGS.full else ['1']))]
    except ValueError as e:
        raise app.UsageError(f'--train_seeds / --sample_seeds must be comma-separated integers ({e})')
    methods = (methods_lib.quick_methods() if FLAGS.quick else methods_lib.full_methods() if FLAGS.full
               else methods_lib.default_methods())
    if FLAGS.sweep:
        have = {m.name for m in methods}
        methods += [m for m in methods_lib.sweep_methods() if m.name not in have]
    if FLAGS.dropout_train_rate > 0:
        methods += methods_lib.trained_dropout_methods(FLAGS.dropout_train_rate)
    outdir = Path(FLAGS.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tau = metrics_lib.outlier_threshold(jax.random.key(12345))
    specs = model_specs(setting, FLAGS.dropout_train_rate)
    runs, train_time, sanity, fig_data = [], {}, {}, None
    for ts in train_seeds:
        models = {}
        for name, spec in specs.items():
            models[name], snapshots, train_time[f'{name}-seed{ts}'] = get_model(outdir, name, spec, ts, FLAGS.retrain)
            models |= history_guides(snapshots, spec) if snapshots else {}
        if ts == train_seeds[0]:
            rates = {'main': 0.05} | ({'drop': FLAGS.dropout_train_rate} if 'drop' in models else {})
            sanity = dropout_sanity(models, jax.random.key(777), rates)
        for ss in sample_seeds:
            key = jax.random.key(ss)
            noise, keys = methods_lib.start_points(jax.random.fold_in(key, 0), n)
            reference = mixture_lib.draw(mixture_lib.mixture('A'), jax.random.fold_in(key, 1), n)
            exact = mixture_lib.draw(mixture_lib.mixture('A'), jax.random.fold_in(key, 2), n)
            mkey = jax.random.fold_in(key, 3)
            res = {'exact': metrics_lib.evaluate(exact, reference, tau=tau, key=mkey)}
            runs.append(res)
            plain = [m for m in methods if not m.name.startswith(methods_lib.TRAINED_DROPOUT)]
            keep = {} if fig_data is None else None
            res |= evaluate_methods([Method('exact_ode')] + plain, models, noise, keys, reference, tau, mkey,
                                    f'sample+metrics (train seed {ts}, sample seed {ss})', keep)
            if 'drop' in models:
                dm = dict(models, main=models['drop'])
                res |= evaluate_methods([m for m in methods if m.name.startswith(methods_lib.TRAINED_DROPOUT)], dm,
                                        noise, keys, reference, tau, mkey, 'trained-dropout model')
            if fig_data is None:
                fig_data = (models, keep)
    mean, std = report.aggregate(runs)
    t_eval = time.time()
    if FLAGS.figure:
        models, samples = fig_data
        best = report.pick_insitu(mean, FIGURE_W['insitu'])
        panel_methods = [('Ground truth (exact-score ODE)', Method('exact_ode')), ('No guidance', Method('none')),
                         (f'CFG w={FIGURE_W["cfg"]:g}', methods_lib.cfg(FIGURE_W['cfg'])),
                         (f'Autoguidance w={FIGURE_W["ag"]:g}', methods_lib.ag(FIGURE_W['ag'])),
                         (best.replace('in-situ', 'In-situ'), next(m for m in methods if m.name == best))]
        for prefix, title in (('skip-layer l=', 'Skip-layer'), ('sigma-shift δ=', 'Sigma-shift')):
            if any(m.name.startswith(prefix) and m.name.endswith(f' w={SELF_GUIDE_W:g}') for m in methods):
                chosen = report.pick_insitu(mean, SELF_GUIDE_W, prefix)
                panel_methods.append((title + chosen[len(prefix.split(' ')[0]):],
                                      next(m for m in methods if m.name == chosen)))
        zoom = jnp.asarray(zoom_start_points(jax.random.key(4)))
        t_zoom = methods_lib.time_steps(sigma_max=0.03)
        zkeys = jax.random.split(jax.random.key(5), zoom.shape[0])
        trajectories = not FLAGS.quick if FLAGS.trajectories is None else FLAGS.trajectories
        panels = []
        for title, m in tqdm(panel_methods, desc='figure'):
            x = samples[m.name]
            traj = (methods_lib.sample(m, models, zoom / t_zoom[0], zkeys, t_zoom, trajectory=True)
                    if trajectories else None)
            panels.append((title, x, traj))
        plot_lib.overview_figure(outdir / 'figure.png', panels, grid=setting.figure_grid)
    if FLAGS.sweep:
        ps, ws = methods_lib.SWEEP_P, methods_lib.SWEEP_W
        values = {k: np.array([[mean[methods_lib.insitu(w, p).name][k] for w in ws] for p in ps])
                  for k in ('outlier', 'escape', 'branch_tv', 'leaf_recall', 'mmd_02')}
        plot_lib.sweep_figure(outdir / 'sweep.png', ps, ws, values, mean['none'])
    info = {'setting': setting._asdict(), 'num_samples': n, 'train_seeds': train_seeds,
            'sample_seeds': sample_seeds, 'tau': tau, 'train_time_s': train_time,
            'wall_time_s': time.time() - t_start, 'train_total_s': sum(train_time.values()),
            'figure_s': time.time() - t_eval, 'machine': f'{os.cpu_count()}-core CPU, {jax.default_backend()}'}
    report.write_outputs(outdir, mean, std, len(runs), info, sanity)
    print(report.summary(mean))
    written = (['models/'] * (outdir / 'models').is_dir() + ['figure.png'] * FLAGS.figure  # models/: trained here
               + ['sweep.png'] * FLAGS.sweep + ['metrics.md', 'metrics.json'] + ['metrics_std.json'] * (len(runs) > 1)
               + ['run.json'])
    print(f'\nwrote in {info["wall_time_s"]:.0f} s ({info["machine"]}):\n'
          + '\n'.join(f'  {outdir / n}' for n in written))


if __name__ == '__main__':
    app.run(main)

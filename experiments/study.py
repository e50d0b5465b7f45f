r"""The guidance study on class-conditional Fashion-MNIST models: every guidance method of the
sampler, each tuned on one seed set and reported on others (the library: `edm2_jax.study`).

    python -m experiments.study --cache=cache --evaluator_cache=cache/fmnist/evaluator --out=study
    python -m experiments.study --main=main:M1,main-drop:M2 --guide=G --uncond=U \
        --evaluator_cache=E --out=study [--quick] [--methods=none,insitu,...]

Networks are checkpoint directories (`edm2_jax.checkpoint.load`). `--cache` takes them from the
`make train` layout `<cache>/fmnist/<preset>/network-<std>/` (STUDY_NETWORKS: the presets
fmnist-main, fmnist-main-drop, fmnist-guide, fmnist-uncond; --std picks the EMA length when there
are several), with further training seeds of the main models as extra main models
(`<cache>/fmnist/fmnist-main-seed1/` → model fmnist-main-seed1); --main/--guide/--uncond override
it. The 'history' guide of a main model is its own run's network at an early snapshot or a shorter
EMA (--history_time, --history_std), exported once into the run directory as
`<run>/history-<t>-<σ_rel>/` when the main network lies in a run directory with snapshots/, or given
with --history=NAME:DIR. Without a guide, an unconditional network or a history guide the methods
needing them are skipped (and listed as skipped).

Protocol (`edm2_jax.study.protocol`), the same for every method: Heun with --num_steps steps;
requested label = seed mod 10 (balanced). Each setting of a method's grid is scored on the tuning
seeds 0 … tune_n − 1; the setting with the lowest FD-FMNIST is the tuned point, which is then scored
on --report_sets disjoint seed sets of report_n images (seeds 10⁶·k + i, k = 1, 2, …) and reported
as the mean over the sets with normal bootstrap 95 % intervals (--resamples; rows resampled within
each set, the same resamples for every method, so the differences to no guidance, in-situ and
autoguidance are paired, with percentile intervals).
The in-situ σ-schedules move in-situ's tuned (w, p) across σ, and APG runs last, on the guided
method with the lowest tuning FD. Metrics come from the Fashion-MNIST evaluator
(`edm2_jax.metrics.fmnist`: FD-FMNIST, KID, precision, recall, class accuracy); a row of real
training images scored the same way gives the floor.

Resumable: every (model, method, setting, seed set) result is its own JSON file under
OUT/runs/, written atomically (a report set's evaluator features first, beside it); a rerun skips the
files that exist. Outputs: OUT/results.json (model → method → setting → metrics, intervals),
OUT/results.md (each method at its tuned point, with network evaluations per image and the paired
difference to no guidance on the shared report seeds; models of several training seeds compared),
OUT/plots/ (FD vs recall per method over its grid; the in-situ (w, p) heat map) and
OUT/grids/<model>/<method>.png (the first report seeds at the tuned point, one class per column, the
same seeds for every method).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from absl import app, flags

from edm2_jax.errors import UserError, cli_main
from edm2_jax.study.grids import Context
from edm2_jax.study.protocol import Protocol, Scored, check_protocol
from edm2_jax.study.report import RESAMPLES, SEED_SUFFIX
from edm2_jax.study.runner import check_methods, check_tuned_on, plan, run_study

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI flags, defined only when run as a script: tests import this module beside other scripts
    (experiments.evaluate, …) whose flags share names."""
    flags.DEFINE_list('main', None, 'Main networks as NAME:DIR (or DIR, named by its folder), comma separated.')
    flags.DEFINE_string('guide', None, 'Guide network directory (autoguidance, hybrid).')
    flags.DEFINE_string('uncond', None, 'Unconditional network directory (CFG).')
    flags.DEFINE_list('history', None, 'History guides as NAME:DIR (NAME: a main model), comma separated; '
                      'default: built from each main network\'s run directory.')
    flags.DEFINE_float('history_time', 0.25, 'History guide built from a run: its snapshot at this fraction '
                       'of the run (the latest at or before it).')
    flags.DEFINE_float('history_std', 0.10, 'History guide built from a run: its EMA length σ_rel.')
    flags.DEFINE_string('cache', None, 'make-train cache root: <cache>/fmnist/<preset>/network-<std>/.')
    flags.DEFINE_string('std', None, 'EMA length of the network-<std> directories under --cache (needed '
                        'when there are several).')
    flags.DEFINE_string('evaluator_cache', None, 'Directory of the Fashion-MNIST evaluator and its '
                        'reference statistics (trained there on first use).')
    flags.DEFINE_string('out', None, 'Output directory.')
    flags.DEFINE_bool('quick', False, 'Tiny counts and grids (tests).')
    flags.DEFINE_list('methods', None, 'Only these methods (names as in results.md; apg = the APG row).')
    flags.DEFINE_integer('num_steps', None, 'Sampler steps (default 32; --quick 4).')
    flags.DEFINE_integer('tune_n', None, 'Images per grid point for tuning (default 2000; --quick 20).')
    flags.DEFINE_integer('report_n', None, 'Images per report seed set (default 2000; --quick 20).')
    flags.DEFINE_integer('report_sets', 3, 'Report seed sets (sampling seed offsets).')
    flags.DEFINE_integer('batch', 500, 'Images per sampler call.')
    flags.DEFINE_integer('grid_n', None, 'Images per method grid PNG, a multiple of 10 (default 100; --quick 20).')
    flags.DEFINE_bool('reference', True, 'Also score real training images (the floor row).')
    flags.DEFINE_bool('dry_run', False, 'Only print the plan (untrained networks stand in as their train '
                      'presets\' configurations): settings, images and network evaluations per '
                      'method (upper bounds), then exit.')
    flags.DEFINE_integer('pr_refs', 0, 'KID and precision/recall against the features of the first N test '
                         'images (0 = all 10,000); FD always uses the full test statistics.')
    flags.DEFINE_string('tuned_on', None, 'A main model whose tuned settings every other main model uses '
                        '(e.g. a second training seed run at the first seed\'s settings); default: each tunes its own.')
    flags.DEFINE_integer('resamples', RESAMPLES, 'Bootstrap resamples of the report sets (0: no intervals).')


def protocol_from_flags(f) -> Protocol:
    quick = f.quick
    pick = lambda v, full, small: v if v is not None else (small if quick else full)  # noqa: E731
    p = Protocol(num_steps=pick(f.num_steps, 32, 4), tune_n=pick(f.tune_n, 2000, 20),
                 report_n=pick(f.report_n, 2000, 20), report_sets=f.report_sets, batch=f.batch,
                 grid_n=pick(f.grid_n, 100, 20), quick=quick)
    check_protocol(p)
    return p


# The study's role of a network → the `make train` preset (edm2_jax/train_presets.py) that trains it.
STUDY_NETWORKS = {'main': 'fmnist-main', 'main-drop': 'fmnist-main-drop', 'guide': 'fmnist-guide',
                  'uncond': 'fmnist-uncond'}


def cache_network(cache: Path, preset: str, std: str | None) -> Path | None:
    """<cache>/fmnist/<preset>/network-<std>/ (the only one when std is None); None if absent."""
    run = cache / 'fmnist' / preset
    found = sorted(run.glob('network-*'))
    if std is not None:
        found = [d for d in found if _same_std(d.name.removeprefix('network-'), std)]
    if len(found) > 1:
        raise UserError(f'holds several networks {[d.name for d in found]}', where=str(run),
                        fix='pick one with --std')
    return found[0] if found else None


def _same_std(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a == b


# Further training seeds `make train` trains (`make train-seeds` adds fmnist-main-drop-seed1).
TRAINED_SEEDS = ('fmnist-main-seed1',)
MAIN_PRESETS = (STUDY_NETWORKS['main'], STUDY_NETWORKS['main-drop'])


def seed_runs(cache: Path) -> list[str]:
    """The runs <cache>/fmnist/<main preset>-seed<k>/ (further training seeds of the main models)."""
    return sorted(d.name for d in (cache / 'fmnist').glob('*-seed*')
                  if SEED_SUFFIX.search(d.name) and SEED_SUFFIX.sub('', d.name) in MAIN_PRESETS)


def _named(items) -> dict[str, Path]:
    """NAME:DIR (or DIR, named by its folder) → {name: Path}."""
    out = {}
    for item in items:
        name, sep, d = item.rpartition(':')
        out[name if sep else Path(d).name] = Path(d)
    return out


def planned_networks(f):
    """(main name → network, guide, uncond, main name → history guide) for --dry_run: the plan needs
    only configurations, so a network not trained yet stands in as its train preset's configuration
    (no weights read), and so does the history guide it will be built from."""
    from edm2_jax import Network, checkpoint, train_state
    from edm2_jax.train_presets import TRAIN_PRESETS

    def network(preset, path):
        if path is not None:
            return Network(checkpoint.network_config(path, checkpoint.read_meta(path)), {})
        return Network(TRAIN_PRESETS[SEED_SUFFIX.sub('', preset)].trained_network, {})
    cache = Path(f.cache) if f.cache else None

    def found(preset):
        return None if cache is None else cache_network(cache, preset, f.std)
    if f.main:
        dirs = _named(f.main)
    else:
        names = [*MAIN_PRESETS, *TRAINED_SEEDS, *(seed_runs(cache) if cache else [])]
        dirs = {name: found(name) for name in dict.fromkeys(names)}
    mains = {name: network(name, d) for name, d in dirs.items()}
    histories = _named(f.history or [])
    planned = {name: network(name, histories[name]) if name in histories else mains[name]
               for name, d in dirs.items() if name in histories or d is None or train_state.has_snapshots(d.parent)}
    guide = network(STUDY_NETWORKS['guide'], Path(f.guide) if f.guide else found(STUDY_NETWORKS['guide']))
    uncond = network(STUDY_NETWORKS['uncond'], Path(f.uncond) if f.uncond else found(STUDY_NETWORKS['uncond']))
    return mains, guide, uncond, planned


def resolve_networks(f) -> tuple[dict[str, Path], Path | None, Path | None]:
    """(main name → dir, guide dir, uncond dir) from --main/--guide/--uncond and --cache."""
    mains, guide, uncond = {}, None, None
    if f.cache:
        cache = Path(f.cache)
        for name in [*MAIN_PRESETS, *seed_runs(cache)]:
            d = cache_network(cache, name, f.std)
            if d is not None:
                mains[name] = d
        guide = cache_network(cache, STUDY_NETWORKS['guide'], f.std)
        uncond = cache_network(cache, STUDY_NETWORKS['uncond'], f.std)
    if f.main:
        mains = _named(f.main)
    guide = Path(f.guide) if f.guide else guide
    uncond = Path(f.uncond) if f.uncond else uncond
    if not mains:
        raise UserError('no main network', where='--main',
                        fix='give --main=NAME:DIR,... or --cache with trained fmnist-main*')
    for d in [*mains.values(), guide, uncond]:
        if d is not None and not (Path(d) / 'config.json').is_file():
            raise UserError('not a network checkpoint directory (no config.json)', where=str(d))
    return mains, guide, uncond


# ---------------------------------------------------------------------------------------------------
# The history guide: the main network's own run at an early snapshot or a shorter EMA.

def check_history_flags(f, mains) -> dict[str, Path]:
    """The --history directories by main name, after checking every history flag."""
    from edm2_jax.ema import sigma_rel_to_gamma
    if not 0 < f.history_time <= 1:
        raise UserError(f'must lie in (0, 1], got {f.history_time}', where='--history_time')
    try:
        sigma_rel_to_gamma(f.history_std)
    except ValueError as e:
        raise UserError(str(e), where='--history_std') from None
    given = _named(f.history or [])
    if set(given) - set(mains):
        raise UserError(f'names {sorted(set(given) - set(mains))} are not main models', where='--history',
                        fix=f'main models: {sorted(mains)}')
    return given


def fmnist_scorer(evaluator_cache, pr_refs: int = 0, log: Callable = print) -> Callable:
    """score(uint8 images [N,R,R,1], requested labels) → Scored(metrics, features) with the
    Fashion-MNIST evaluator: FD against the test split's statistics at resolution R; KID and
    precision/recall against the test features (the first pr_refs of them when > 0, for speed); class
    accuracy. score.reference(R): those statistics and features (the bootstrap's reference). A cached
    classifier is used with the settings it was trained with (`experiments.fmnist_evaluator
    --steps`); else it is trained here."""
    from edm2_jax import checkpoint
    from edm2_jax.metrics import fmnist
    cached = Path(evaluator_cache) / 'classifier'
    settings = fmnist.TrainSettings()
    if cached.exists():
        settings = fmnist.TrainSettings(**checkpoint.read_meta(cached)['settings'])
    evaluator = fmnist.load_or_train_evaluator(evaluator_cache, settings, log=log)
    refs = {}

    def reference(r):
        if r not in refs:
            ref = fmnist.reference_stats(evaluator, evaluator_cache, r)
            refs[r] = ref._replace(features=ref.features[:pr_refs], labels=ref.labels[:pr_refs]) if pr_refs else ref
        return refs[r]

    def score(images, labels) -> Scored:
        ref = reference(images.shape[1])
        features, logits = fmnist.image_features(evaluator, images, ref)
        return Scored(fmnist.evaluate_features(features, logits, labels, ref), features)
    score.evaluator, score.reference = evaluator, reference
    score.info = dict(test_accuracy=evaluator.test_accuracy, settings=evaluator.meta.get('settings'),
                      fingerprint=evaluator.fingerprint, pr_refs=pr_refs or 10000)
    return score


def train_split_sets(protocol: Protocol) -> Callable:
    """reference(R): disjoint slices of the training split, report_n each, as a generator at R sees them."""
    from edm2_jax.data import load_fashion_mnist, resize
    images, labels = load_fashion_mnist('train')
    n = protocol.report_n
    if n * protocol.report_sets > len(images):
        raise ValueError(f'--reference needs {n * protocol.report_sets} training images, have {len(images)}')
    return lambda r: [(resize(images[k * n:(k + 1) * n], r), labels[k * n:(k + 1) * n])
                      for k in range(protocol.report_sets)]


@cli_main('study', catch=(ValueError,))  # ValueError: the protocol's checks, --methods, a checkpoint that fails to load
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS.out or not FLAGS.evaluator_cache:
        raise UserError('--out and --evaluator_cache are required')
    protocol = protocol_from_flags(FLAGS)
    from edm2_jax import checkpoint, train_state
    if FLAGS.dry_run:
        models, guide, uncond, histories = planned_networks(FLAGS)
        check_history_flags(FLAGS, models)
    else:
        mains, guide_dir, uncond_dir = resolve_networks(FLAGS)
        given = check_history_flags(FLAGS, mains)
        models = {name: checkpoint.load(d) for name, d in mains.items()}
        guide = None if guide_dir is None else checkpoint.load(guide_dir)
        uncond = None if uncond_dir is None else checkpoint.load(uncond_dir)
        wanted = FLAGS.methods is None or 'history' in FLAGS.methods     # else no export is needed
        history_dirs = {name: given.get(name) or train_state.export_history(d.parent, FLAGS.history_time,
                                                                               FLAGS.history_std)
                        for name, d in mains.items() if wanted}
        histories = {name: checkpoint.load(d) for name, d in history_dirs.items() if d is not None}
    ctx_of = lambda name, net: Context(net.config, guide, uncond, histories.get(name))  # noqa: E731
    check_methods(models, ctx_of, FLAGS.methods, protocol.quick)
    check_tuned_on(models, FLAGS.tuned_on)
    if FLAGS.dry_run:
        rows = plan(models, ctx_of, protocol, FLAGS.methods)
        for r in rows:
            print(f"{r['model']:>22} {r['method']:>20}: {r['settings']:3d} settings, {r['images']:8d} images, "
                  f"{r['evals']:.4g} network evaluations")
        print(f"total: {sum(r['images'] for r in rows)} images, {sum(r['evals'] for r in rows):.4g} network "
              'evaluations (upper bound)')
        return
    start = time.time()
    score = fmnist_scorer(FLAGS.evaluator_cache, FLAGS.pr_refs)
    reference = train_split_sets(protocol) if FLAGS.reference else None
    results = run_study(models, ctx_of, score, FLAGS.out, protocol, only=FLAGS.methods, reference=reference,
                        feature_refs=score.reference, resamples=FLAGS.resamples, evaluator=score.info,
                        tuned_on=FLAGS.tuned_on,
                        log=lambda s: print(s, flush=True))
    print(f"study: {results['meta']['results_computed_this_run']} results computed in "
          f'{time.time() - start:.0f} s; see {Path(FLAGS.out) / "results.md"}')


if __name__ == '__main__':
    define_flags()
    app.run(main)

r"""The guidance study (issue 13): every guidance method of the sampler on class-conditional
Fashion-MNIST models, each tuned on one seed set and reported on others.

    python -m experiments.study --cache=cache --evaluator_cache=cache/fmnist/evaluator --out=study
    python -m experiments.study --main=main:M1,main-drop:M2 --guide=G --uncond=U \
        --evaluator_cache=E --out=study [--quick] [--methods=none,insitu,...]

Networks are checkpoint directories (`edm2_jax.checkpoint.load`). `--cache` takes them from the
`make train` layout `<cache>/fmnist/<preset>/network-<std>/` (presets fmnist-main, fmnist-main-drop,
fmnist-guide, fmnist-uncond; --std picks the EMA length when there are several); --main/--guide/
--uncond override it. Without a guide or an unconditional network the methods needing them are
skipped (and listed as skipped).

Protocol, the same for every method: Heun with --num_steps steps; requested label = seed mod 10
(balanced). Each setting of a method's grid is scored on the tuning seeds 0 … tune_n − 1; the
setting with the lowest FD-FMNIST is the tuned point, which is then scored on --report_sets disjoint
seed sets of report_n images (seeds 10⁶·k + i, k = 1, 2, …) and reported as mean ± std (ddof 1).
The in-situ σ-schedules move in-situ's tuned (w, p) across σ, and APG runs last, on the guided
method with the lowest tuning FD. Metrics come from
`edm2_jax.metrics.fmnist.evaluate_images` (FD-FMNIST, precision, recall, class accuracy); a row of
real training images scored the same way gives the floor.

Resumable: every (model, method, setting, seed set) result is its own JSON file under
OUT/runs/, written atomically; a rerun skips the files that exist. Outputs: OUT/results.json
(model → method → setting → metrics), OUT/results.md (each method at its tuned point, with network
evaluations per image and the paired difference to no guidance on the shared report seeds),
OUT/plots/ (FD vs recall per method over its grid; the in-situ (w, p) heat map) and
OUT/grids/<model>/<method>.png (the first report seeds at the tuned point, one class per column, the
same seeds for every method).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from absl import app, flags, logging

from edm2_jax import io
from experiments import study_methods as SM
from experiments.cpu_convolutions import use_eigen_convolutions

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI flags, defined only when run as a script: tests import this module beside other scripts
    (experiments.evaluate, …) whose flags share names."""
    flags.DEFINE_list('main', None, 'Main networks as NAME:DIR (or DIR, named by its folder), comma separated.')
    flags.DEFINE_string('guide', None, 'Guide network directory (autoguidance, hybrid).')
    flags.DEFINE_string('uncond', None, 'Unconditional network directory (CFG).')
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
    flags.DEFINE_integer('report_n', None, 'Images per report seed set (default 10000; --quick 20).')
    flags.DEFINE_integer('report_sets', 3, 'Report seed sets (sampling seed offsets).')
    flags.DEFINE_integer('batch', 500, 'Images per sampler call.')
    flags.DEFINE_integer('grid_n', None, 'Images per method grid PNG, a multiple of 10 (default 100; --quick 20).')
    flags.DEFINE_bool('reference', True, 'Also score real training images (the floor row).')
    flags.DEFINE_bool('dry_run', False, 'Only print the plan: settings, images and network evaluations per '
                      'method (upper bounds), then exit.')
    flags.DEFINE_bool('cpu_conv_via_eigen', True, 'On XLA:CPU (jaxlib 0.10), run convolutions through '
                      'Eigen instead of YNNPACK (~2× faster sampling; experiments/cpu_convolutions.py).')
    flags.DEFINE_integer('pr_refs', 0, 'Precision/recall against the features of the first N test images '
                         '(0 = all 10,000); FD always uses the full test statistics.')


REPORT_BASE = 10 ** 6
SCHEDULE = 'insitu-schedule'   # derived from the tuned 'insitu' point, which it therefore also runs
DATA_ROW = 'real images (train split)'
METRICS = ('fd_fmnist', 'precision', 'recall', 'class_accuracy')


class Protocol(NamedTuple):
    num_steps: int
    tune_n: int
    report_n: int
    report_sets: int
    batch: int
    grid_n: int
    quick: bool = False

    @property
    def chunk(self) -> int:
        """The fixed sampler batch: every call has this shape (padding rows are dropped)."""
        return min(self.batch, self.tune_n, self.report_n)

    def seeds(self, seed_set: str) -> np.ndarray:
        if seed_set == 'tune':
            return np.arange(self.tune_n)
        k = int(seed_set.removeprefix('report'))
        return REPORT_BASE * (k + 1) + np.arange(self.report_n)

    @property
    def report_names(self) -> list[str]:
        return [f'report{k}' for k in range(self.report_sets)]


def protocol_from_flags(f) -> Protocol:
    quick = f.quick
    pick = lambda v, full, small: v if v is not None else (small if quick else full)  # noqa: E731
    p = Protocol(num_steps=pick(f.num_steps, 32, 4), tune_n=pick(f.tune_n, 2000, 20),
                 report_n=pick(f.report_n, 10000, 20), report_sets=f.report_sets, batch=f.batch,
                 grid_n=pick(f.grid_n, 100, 20), quick=quick)
    check_protocol(p)
    return p


def check_protocol(p: Protocol):
    if p.num_steps < 1 or p.batch < 1 or p.report_sets < 1:
        raise ValueError('num_steps, batch and report_sets must be >= 1')
    if p.tune_n < 2 or p.report_n < 2:
        raise ValueError('tune_n and report_n must be >= 2 (a covariance needs two images)')
    if p.grid_n % 10 or not 0 < p.grid_n <= p.report_n:
        raise ValueError(f'grid_n must be a positive multiple of 10 and <= report_n, got {p.grid_n}')


# ---------------------------------------------------------------------------------------------------
# Sampling.

def sample_images(net, seeds, kwargs: dict, p: Protocol) -> tuple[np.ndarray, int]:
    """uint8 images [N, R, R, C] for `seeds` (label = seed mod label_dim) with sample(**kwargs), in fixed
    batches of p.chunk (the last padded with further seeds), so every call reuses one compilation.
    Also returns the number of samples that were not finite."""
    import jax
    from edm2_jax import sampling
    from edm2_jax.data import to_uint8
    seeds = np.asarray(seeds, np.int64)
    label_dim = net.config.label_dim
    out, bad = [], 0
    for start in range(0, len(seeds), p.chunk):
        chunk = seeds[start:start + p.chunk]
        n = len(chunk)
        padded = np.concatenate([chunk, chunk[-1] + 1 + np.arange(p.chunk - n)])
        inputs = sampling.network_inputs(net, padded)
        labels = np.eye(label_dim, dtype=np.float32)[padded % label_dim] if label_dim else None
        x = sampling.sample(net, inputs.noise, labels, keys=inputs.keys, num_steps=p.num_steps, **kwargs)
        x = np.asarray(jax.device_get(x))[:n]
        finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
        bad += int((~finite).sum())
        out.append(to_uint8(np.where(finite[:, None, None, None], x, 0.0)))
    return np.concatenate(out), bad


def requested_labels(net, seeds):
    return (np.asarray(seeds) % net.config.label_dim).astype(np.int32) if net.config.label_dim else None


def compile_count() -> int:
    from edm2_jax import sampling
    return sampling._sample._cache_size()


# ---------------------------------------------------------------------------------------------------
# Result files.

def write_json(path: Path, obj) -> None:
    """NaN kept as the JSON literal: the results read back as floats (a resumed study formats them)."""
    io.write_text(path, json.dumps(obj, indent=1, allow_nan=True) + '\n')


def result_path(out: Path, model: str, method: str, sid: str, seed_set: str) -> Path:
    return out / 'runs' / model / method / sid / f'{seed_set}.json'


class Runner:
    """Computes (or reads back) one result file per (model, method, setting, seed set)."""

    def __init__(self, out: Path, protocol: Protocol, score: Callable, log: Callable = print):
        self.out, self.p, self.score, self.log = out, protocol, score, log
        self.computed = 0
        self.compiles: dict[tuple[str, str], int] = {}

    def result(self, model: str, net, ctx: SM.Context, method: SM.Method, setting: dict, seed_set: str):
        sid = SM.setting_id(setting)
        path = result_path(self.out, model, method.name, sid, seed_set)
        if path.is_file():
            return json.loads(path.read_text())
        kwargs = method.build(setting, ctx)
        seeds = self.p.seeds(seed_set)
        before = compile_count()
        start = time.perf_counter()
        images, bad = sample_images(net, seeds, kwargs, self.p)
        sample_s = time.perf_counter() - start
        key = (model, method.name)
        self.compiles[key] = self.compiles.get(key, 0) + compile_count() - before
        start = time.perf_counter()
        metrics = _metrics(self.score(images, requested_labels(net, seeds)))
        score_s = time.perf_counter() - start
        if seed_set == 'report0':  # the image grid's source; written before the JSON that marks it done
            io.save_npz(path.with_suffix('.npz'), images=images[:self.p.grid_n])
        res = dict(model=model, method=method.name, setting=setting, setting_id=sid, seed_set=seed_set,
                   seeds=dict(first=int(seeds[0]), count=len(seeds)), num_steps=self.p.num_steps,
                   nfe_per_image=SM.nfe_per_image(kwargs, net.config, self.p.num_steps),
                   metrics=metrics, nonfinite_samples=bad, sample_s=round(sample_s, 3),
                   score_s=round(score_s, 3))
        write_json(path, res)
        self.computed += 1
        self.log(f'{model} {method.name} [{sid}] {seed_set}: fd {metrics.get("fd_fmnist", float("nan")):.3f} '
                 f'({sample_s:.1f} s sampling, {score_s:.1f} s scoring)')
        return res

    def reference(self, resolution: int, seed_set: str, images, labels):
        """The real-image floor row at a generator resolution, scored like the samples."""
        path = result_path(self.out, '_data', 'train-split', f'{resolution}x{resolution}', seed_set)
        if path.is_file():
            return json.loads(path.read_text())
        metrics = _metrics(self.score(images, labels))
        res = dict(seed_set=seed_set, count=len(images), resolution=resolution, metrics=metrics)
        write_json(path, res)
        self.computed += 1
        return res


# ---------------------------------------------------------------------------------------------------
# The study.

def _metrics(scores: dict) -> dict:
    """The study's metrics as floats (None, e.g. class accuracy without labels, becomes NaN)."""
    return {k: float('nan') if scores.get(k) is None else float(scores[k]) for k in METRICS}


def _fd(res) -> float:
    v = res['metrics'].get('fd_fmnist', float('nan'))
    return v if math.isfinite(v) else float('inf')


def tuned_index(tune_results: list[dict]) -> int:
    """The grid point with the lowest tuning FD (the first one on ties)."""
    return int(np.argmin([_fd(r) for r in tune_results]))


def summarize(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, values=v.tolist())


def report_summary(results: list[dict]) -> dict:
    keys = results[0]['metrics'].keys()
    return {k: summarize([r['metrics'][k] for r in results]) for k in keys}


def run_model(runner: Runner, model: str, net, ctx: SM.Context, only=None) -> dict:
    """Tunes and reports every method for one main network; returns method → its entry."""
    wanted = lambda name: only is None or name in only  # noqa: E731
    methods = [m for m in SM.all_methods(ctx, runner.p.quick)
               if wanted(m.name) or (m.name == 'insitu' and wanted(SCHEDULE))]
    entries, tuned = {}, {}

    def tune(m):
        results = [runner.result(model, net, ctx, m, s, 'tune') for s in m.grid]
        tuned[m.name] = (m, m.grid[tuned_index(results)])
        entries[m.name] = results
    for m in methods:
        tune(m)
    if wanted(SCHEDULE):
        tune(SM.schedule_method(tuned['insitu'][1], quick=runner.p.quick))
    guided = [n for n in entries if n != 'none']
    if guided and wanted('apg'):
        best = min(guided, key=lambda n: min(_fd(r) for r in entries[n]))
        tune(SM.apg_method(*tuned[best], quick=runner.p.quick))
    out = {}
    for name, (m, best_setting) in tuned.items():
        report = [runner.result(model, net, ctx, m, best_setting, k) for k in runner.p.report_names]
        sid = SM.setting_id(best_setting)
        out[name] = {}
        for r in entries[name]:
            e = dict(setting=r['setting'], nfe_per_image=r['nfe_per_image'], tune=r['metrics'],
                     tuned=r['setting_id'] == sid)
            if e['tuned']:
                e['report'] = report_summary(report)
                e['nonfinite_samples'] = sum(x['nonfinite_samples'] for x in report)
            out[name][r['setting_id']] = e
    add_paired_differences(out)
    return out


def add_paired_differences(methods: dict) -> None:
    """Each tuned report gains `vs_none`: per metric, (method − none) on each report set. The sets'
    seeds are shared by all methods, so the paired difference is free of the sets' own variation,
    which dominates the ± std of either row at small sample counts."""
    if 'none' not in methods:
        return
    base = tuned_entry(methods['none'])[1]['report']
    for entry in methods.values():
        e = tuned_entry(entry)[1]
        e['vs_none'] = {k: summarize(np.subtract(s['values'], base[k]['values']).tolist())
                        for k, s in e['report'].items()}


def plan(models: dict, ctx_of: Callable, p: Protocol, only=None) -> list[dict]:
    """Per (model, method): grid size, images sampled and network evaluations (full-image units).
    Reports are counted at the grid's most expensive setting and APG at the costliest guided method's
    cost (the tuned points are not known in advance), so the totals are upper bounds."""
    rows = []
    for name, net in models.items():
        ctx = ctx_of(net)
        methods = [m for m in SM.all_methods(ctx, p.quick) if only is None or m.name in only]
        if only is None or SCHEDULE in only:   # its grid size and cost do not depend on the base point
            base = next(m for m in SM.all_methods(ctx, p.quick) if m.name == 'insitu').grid[0]
            methods.append(SM.schedule_method(base, p.quick))
        costs = {}
        for m in methods:
            costs[m.name] = [SM.nfe_per_image(m.build(s, ctx), ctx.config, p.num_steps) for s in m.grid]
        guided = [m for m in methods if m.name != 'none']
        if guided and (only is None or 'apg' in only):
            top = max(guided, key=lambda m: max(costs[m.name]))
            apg = SM.apg_method(top, top.grid[0], p.quick)
            methods.append(apg)
            costs[apg.name] = [max(costs[top.name])] * len(apg.grid)
        for m in methods:
            nfe = costs[m.name]
            rows.append(dict(model=name, method=m.name, settings=len(nfe),
                             images=len(nfe) * p.tune_n + p.report_sets * p.report_n,
                             evals=sum(nfe) * p.tune_n + max(nfe) * p.report_sets * p.report_n))
    return rows


def check_methods(models: dict, ctx_of: Callable, only, quick: bool) -> None:
    if only is not None:
        known = {'apg', SCHEDULE} | {m.name for net in models.values() for m in SM.all_methods(ctx_of(net), quick)}
        if set(only) - known:
            raise ValueError(f'unknown methods {sorted(set(only) - known)}; known: {sorted(known)}')


def run_study(models: dict, ctx_of: Callable, score: Callable, out, protocol: Protocol, *,
              only=None, reference: Callable | None = None, evaluator: dict | None = None,
              log: Callable = print) -> dict:
    """models: name → Network; ctx_of(net) → study_methods.Context; score(uint8 images [N,R,R,C],
    requested labels | None) → metrics dict; reference(R) → per report set (uint8 images at R,
    labels) of real images, or None for no floor row; evaluator: what to record about the scorer.
    Writes every output under `out` and returns the results dict."""
    check_protocol(protocol)
    check_methods(models, ctx_of, only, protocol.quick)
    out = Path(out)
    runner = Runner(out, protocol, score, log)
    results = dict(meta=dict(protocol=protocol._asdict(), report_seed_base=REPORT_BASE,
                             label_rule='seed mod label_dim', std='ddof=1 over report sets',
                             evaluator=evaluator, skipped={}), models={}, data={})
    for name, net in models.items():
        if reference is not None:
            r = net.config.img_resolution
            rows = [runner.reference(r, k, *sets) for k, sets in zip(protocol.report_names, reference(r))]
            results['data'][name] = report_summary(rows)
        ctx = ctx_of(net)
        results['models'][name] = run_model(runner, name, net, ctx, only)
        results['meta']['skipped'][name] = SM.skipped_methods(ctx)
    results['meta']['results_computed_this_run'] = runner.computed
    results['meta']['compiles_this_run'] = {f'{model}/{method}': n for (model, method), n in runner.compiles.items()}
    write_outputs(results, out, protocol)
    return results


# ---------------------------------------------------------------------------------------------------
# Outputs.

def tuned_entry(method_entry: dict) -> tuple[str, dict]:
    return next((sid, e) for sid, e in method_entry.items() if e['tuned'])


def _pm(s: dict, digits: int) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def grid_edges(method_entry: dict) -> list[str]:
    """The axes on which the tuned setting sits at the end of a product grid ('w↑': the largest w
    tried, 'p↓': the smallest p): there the optimum may lie outside the grid."""
    settings = [e['setting'] for e in method_entry.values()]
    axes = {k: sorted({s[k] for s in settings}) for k in settings[0]}
    if len(settings) != math.prod(len(v) for v in axes.values()):
        return []                                     # not a product grid (schedules, APG on a base)
    best = tuned_entry(method_entry)[1]['setting']
    return [f'{k}↑' if best[k] == v[-1] else f'{k}↓' for k, v in axes.items()
            if len(v) > 1 and best[k] in (v[0], v[-1])]


def _paired(e: dict, metric: str) -> str:
    d = e.get('vs_none', {}).get(metric)
    if d is None:
        return '–'
    return f"{d['mean']:+.2f} ({', '.join(f'{v:+.2f}' for v in d['values'])})"


def results_markdown(results: dict, protocol: Protocol) -> str:
    p = protocol
    lines = [f'Heun {p.num_steps} steps; tuned on {p.tune_n} images (seeds 0–{p.tune_n - 1}), reported '
             f'on {p.report_sets} × {p.report_n} other images (mean ± std over the sets); requested '
             'label = seed mod 10. w is the guidance weight (g = 1 + w). NFE: network evaluations per '
             'image.', '']
    lines += ['ΔFD vs none: the paired difference (method − none) on each report set, which share their '
              'seeds: mean, then the per-set values. "edge: w↑" marks a tuned point at the end of its '
              'grid (here the largest w), where the optimum may lie beyond the grid.', '']
    head = ('| method | tuned setting | FD-FMNIST ↓ | ΔFD vs none | precision ↑ | recall ↑ | class acc. ↑ '
            '| NFE | tune FD |')
    for model, methods in results['models'].items():
        lines += [f'### {model}', '', head, '|' + '---|' * 9]
        if model in results['data']:
            d = results['data'][model]
            lines.append(f'| {DATA_ROW} | – | {_pm(d["fd_fmnist"], 2)} | – | {_pm(d["precision"], 3)} | '
                         f'{_pm(d["recall"], 3)} | {_pm(d["class_accuracy"], 3)} | – | – |')
        for name, entry in methods.items():
            sid, e = tuned_entry(entry)
            r = e['report']
            edges = grid_edges(entry)
            sid += f' (edge: {", ".join(edges)})' if edges else ''
            lines.append(f'| {name} | {sid} | {_pm(r["fd_fmnist"], 2)} | {_paired(e, "fd_fmnist")} | '
                         f'{_pm(r["precision"], 3)} | {_pm(r["recall"], 3)} | {_pm(r["class_accuracy"], 3)} | '
                         f'{e["nfe_per_image"]:g} | {e["tune"]["fd_fmnist"]:.2f} |')
        skipped = results['meta']['skipped'].get(model) or {}
        if skipped:
            lines += ['', 'Skipped: ' + '; '.join(f'{k} ({v})' for k, v in skipped.items()) + '.']
        lines.append('')
    return '\n'.join(lines)


def plot_tradeoffs(results: dict, path: Path, model: str) -> None:
    """FD vs recall over each method's tuning grid (tuned point starred)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    methods = results['models'][model]
    cols = 4
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, methods.items()):
        pts = [(e['tune']['recall'], e['tune']['fd_fmnist'], e['tuned']) for e in entry.values()]
        x, y, t = map(np.asarray, zip(*pts))
        ax.plot(x, y, 'o', ms=4, color='tab:blue')
        ax.plot(x[t], y[t], '*', ms=12, color='tab:red')
        if model in results['data']:
            ax.axhline(results['data'][model]['fd_fmnist']['mean'], color='gray', lw=0.8, ls='--')
        if 'none' in methods and name != 'none':
            e = tuned_entry(methods['none'])[1]['tune']
            ax.plot(e['recall'], e['fd_fmnist'], 'x', ms=7, color='gray')
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('recall', fontsize=8)
        ax.set_ylabel('FD-FMNIST', fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis('off')
    fig.suptitle(f'{model}: tuning grid, FD vs recall (★ tuned; × no guidance; dashed: real images)',
                 fontsize=10)
    fig.tight_layout()
    io.save_figure(path, fig, dpi=100)
    plt.close(fig)


def plot_insitu_heatmap(results: dict, path: Path, model: str) -> bool:
    """Tuning FD of in-situ (all blocks) over its (w, p) grid."""
    entry = results['models'][model].get('insitu')
    if not entry:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ws = sorted({e['setting']['w'] for e in entry.values()})
    ps = sorted({e['setting']['p'] for e in entry.values()})
    fd = np.full((len(ps), len(ws)), np.nan)
    for e in entry.values():
        fd[ps.index(e['setting']['p']), ws.index(e['setting']['w'])] = e['tune']['fd_fmnist']
    fig, ax = plt.subplots(figsize=(1.0 + 1.1 * len(ws), 1.0 + 0.8 * len(ps)))
    im = ax.imshow(fd, origin='lower', cmap='viridis_r', aspect='auto')
    for i in range(len(ps)):
        for j in range(len(ws)):
            ax.text(j, i, f'{fd[i, j]:.1f}', ha='center', va='center', fontsize=7,
                    color='k' if fd[i, j] < np.nanmean(fd) else 'w')
    ax.set_xticks(range(len(ws)), [f'{w:g}' for w in ws])
    ax.set_yticks(range(len(ps)), [f'{p:g}' for p in ps])
    ax.set_xlabel('w (g = 1 + w)')
    ax.set_ylabel('dropout p')
    none = results['models'][model].get('none')
    title = f'{model}: in-situ tuning FD-FMNIST'
    if none:
        title += f' (none: {tuned_entry(none)[1]["tune"]["fd_fmnist"]:.1f})'
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    io.save_figure(path, fig, dpi=100)
    plt.close(fig)
    return True


def write_grid(src: Path, dst: Path) -> None:
    """One class per column (label = seed mod 10, report seeds start at a multiple of 10)."""
    with np.load(src) as z:
        images = z['images']
    n, r, _, c = images.shape
    rows = n // 10
    grid = images[:rows * 10].reshape(rows, 10, r, r, c).transpose(0, 2, 1, 3, 4).reshape(rows * r, 10 * r, c)
    scale = max(1, 64 // r)
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    io.save_png(dst, grid)


def write_outputs(results: dict, out: Path, protocol: Protocol) -> None:
    write_json(out / 'results.json', results)
    io.write_text(out / 'results.md', results_markdown(results, protocol))
    for model, methods in results['models'].items():
        plot_tradeoffs(results, out / 'plots' / f'tradeoff-{model}.png', model)
        plot_insitu_heatmap(results, out / 'plots' / f'insitu-heatmap-{model}.png', model)
        for name, entry in methods.items():
            sid, _ = tuned_entry(entry)
            write_grid(result_path(out, model, name, sid, 'report0').with_suffix('.npz'),
                       out / 'grids' / model / f'{name}.png')


# ---------------------------------------------------------------------------------------------------
# Command line.

TRAIN_PRESETS = {'main': 'fmnist-main', 'main-drop': 'fmnist-main-drop', 'guide': 'fmnist-guide',
                 'uncond': 'fmnist-uncond'}


def cache_network(cache: Path, preset: str, std: str | None) -> Path | None:
    """<cache>/fmnist/<preset>/network-<std>/ (the only one when std is None); None if absent."""
    run = cache / 'fmnist' / preset
    found = sorted(run.glob('network-*'))
    if std is not None:
        found = [d for d in found if _same_std(d.name.removeprefix('network-'), std)]
    if len(found) > 1:
        raise ValueError(f'{run} holds several networks {[d.name for d in found]}: pick one with --std')
    return found[0] if found else None


def _same_std(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a == b


def resolve_networks(f) -> tuple[dict[str, Path], Path | None, Path | None]:
    """(main name → dir, guide dir, uncond dir) from --main/--guide/--uncond and --cache."""
    mains, guide, uncond = {}, None, None
    if f.cache:
        cache = Path(f.cache)
        for name in ('main', 'main-drop'):
            d = cache_network(cache, TRAIN_PRESETS[name], f.std)
            if d is not None:
                mains[TRAIN_PRESETS[name]] = d
        guide = cache_network(cache, TRAIN_PRESETS['guide'], f.std)
        uncond = cache_network(cache, TRAIN_PRESETS['uncond'], f.std)
    if f.main:
        mains = {}
        for item in f.main:
            name, sep, d = item.rpartition(':')
            mains[name if sep else Path(d).name] = Path(d)
    guide = Path(f.guide) if f.guide else guide
    uncond = Path(f.uncond) if f.uncond else uncond
    if not mains:
        raise ValueError('no main network: give --main=NAME:DIR,... or --cache with trained fmnist-main*')
    for d in [*mains.values(), guide, uncond]:
        if d is not None and not (Path(d) / 'config.json').is_file():
            raise ValueError(f'{d} is not a network checkpoint directory (no config.json)')
    return mains, guide, uncond


def fmnist_scorer(evaluator_cache, pr_refs: int = 0, log: Callable = print) -> Callable:
    """score(uint8 images [N,R,R,1], requested labels) with the Fashion-MNIST evaluator: FD against
    the test split's statistics at resolution R, precision/recall against the test features (the
    first pr_refs of them when > 0, for speed), class accuracy. A cached classifier is used with the
    settings it was trained with (`experiments.fmnist_evaluator --steps`); else it is trained here."""
    from edm2_jax import checkpoint
    from edm2_jax.metrics import fmnist
    cached = Path(evaluator_cache) / 'classifier'
    settings = fmnist.TrainSettings()
    if cached.exists():
        settings = fmnist.TrainSettings(**checkpoint.read_meta(cached)['settings'])
    evaluator = fmnist.load_or_train_evaluator(evaluator_cache, settings, log=log)
    refs = {}

    def score(images, labels):
        r = images.shape[1]
        if r not in refs:
            ref = fmnist.reference_stats(evaluator, evaluator_cache, r)
            refs[r] = ref._replace(features=ref.features[:pr_refs], labels=ref.labels[:pr_refs]) if pr_refs else ref
        return fmnist.evaluate_images(evaluator, images, labels, refs[r])
    score.evaluator = evaluator
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
    try:
        if not FLAGS.out or not FLAGS.evaluator_cache:
            raise ValueError('--out and --evaluator_cache are required')
        protocol = protocol_from_flags(FLAGS)
        mains, guide_dir, uncond_dir = resolve_networks(FLAGS)
    except ValueError as e:
        sys.exit(f'study: error: {e}')
    if FLAGS.cpu_conv_via_eigen:
        use_eigen_convolutions()
    from edm2_jax import checkpoint
    models = {name: checkpoint.load(d) for name, d in mains.items()}
    guide = None if guide_dir is None else checkpoint.load(guide_dir)
    uncond = None if uncond_dir is None else checkpoint.load(uncond_dir)
    ctx_of = lambda net: SM.Context(net.config, guide, uncond)  # noqa: E731
    try:
        check_methods(models, ctx_of, FLAGS.methods, protocol.quick)
    except ValueError as e:
        sys.exit(f'study: error: {e}')
    if FLAGS.dry_run:
        rows = plan(models, ctx_of, protocol, FLAGS.methods)
        for r in rows:
            print(f"{r['model']:>18} {r['method']:>20}: {r['settings']:3d} settings, {r['images']:8d} images, "
                  f"{r['evals']:.4g} network evaluations")
        print(f"total: {sum(r['images'] for r in rows)} images, {sum(r['evals'] for r in rows):.4g} network "
              'evaluations (upper bound)')
        return
    start = time.time()
    score = fmnist_scorer(FLAGS.evaluator_cache, FLAGS.pr_refs)
    reference = train_split_sets(protocol) if FLAGS.reference else None
    try:
        results = run_study(models, ctx_of, score, FLAGS.out,
                            protocol, only=FLAGS.methods, reference=reference, evaluator=score.info,
                            log=lambda s: print(s, flush=True))
    except ValueError as e:
        sys.exit(f'study: error: {e}')
    print(f"study: {results['meta']['results_computed_this_run']} results computed in "
          f'{time.time() - start:.0f} s; see {Path(FLAGS.out) / "results.md"}')


if __name__ == '__main__':
    define_flags()
    app.run(main)

"""The study's outputs from its results dict: bootstrap intervals of the tuned points
(`add_intervals`), results.md (each method at its tuned point, with the paired difference to no
guidance, grid-edge marks and the comparison across training seeds), results.json, the trade-off
plots and the in-situ heat map under plots/, and the image grids under grids/<model>/.

Everything here reads the results and the report sets' image and feature files the runner left;
nothing samples.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from edm2_jax import io
from edm2_jax.metrics import bootstrap as B
from edm2_jax.study.protocol import Protocol, result_path, write_result

DATA_ROW = 'real images (train split)'
# The bootstrapped metrics: the study's name → the bootstrap statistic's.
BOOTSTRAPPED = {'fd_fmnist': 'fd', 'kid': 'kid', 'precision': 'precision', 'recall': 'recall'}
BOOTSTRAP_SEED = 0
RESAMPLES = 200      # the report's cost, see add_intervals
PAIRED = ('none', 'insitu', 'autoguidance')   # rows every method is compared with on the same resamples


def tuned_entry(method_entry: dict) -> tuple[str, dict]:
    """(setting id, entry) of the tuned point in a method's results."""
    return next((sid, e) for sid, e in method_entry.items() if e['tuned'])


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


# ---------------------------------------------------------------------------------------------------
# Bootstrap intervals.

def load_features(paths: list[Path]) -> list[np.ndarray] | None:
    """The report sets' feature rows, or None when a file is missing (a result of an older study)."""
    if not all(p.is_file() for p in paths):
        return None
    out = []
    for p in paths:
        with np.load(p) as z:
            out.append(z['features'])
    return out


def _interval(value: float, replicates, normal: bool = False, level: float = 0.95) -> dict:
    low, high = (B.normal_interval(value, replicates, level) if normal
                 else B.percentile_interval(replicates, level))
    return dict(value=float(value), low=low, high=high)


def add_intervals(methods: dict, features_of: Callable, reference: Callable[[], B.Reference],
                  num_resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> None:
    """Each tuned entry of one model's `methods` whose report features exist (features_of(method,
    setting id) → one [n, D] array per report set, or None) gains `intervals`: per metric of
    BOOTSTRAPPED, the mean over the report sets of the set's value, and its normal bootstrap 95 %
    interval (value ∓ 1.96 bootstrap standard errors: FD's resamples sit above its value by its
    small-sample bias, so a percentile interval can miss the value), the rows resampled within each
    set (`bootstrap.mean_over_strata`). Every method draws the same resamples (one seed, the same set
    sizes), and row i of a set is seed i's image for every method, so `vs_<base>_intervals` (method −
    base on the same resamples, whose biases nearly cancel: a percentile interval; base in PAIRED)
    is the paired difference.
    reference() → the prepared reference set (called once, only if some features exist).

    Cost, measured on random 128-d features, 3 sets × 2,000 rows, 200 resamples, on the shared
    2-core container: 5.4 s per method against 2,000 reference rows (--pr_refs=2000), 10.7 s against
    all 10,000, with OPENBLAS_NUM_THREADS=1; 26 s and 33 s with OpenBLAS's two threads competing
    with other work. So 2–4 minutes per model of 20 methods (up to 11 on a busy machine)."""
    values, reps, sizes, ref = {}, {}, {}, None
    for name, entry in methods.items():
        sid, e = tuned_entry(entry)
        feats = features_of(name, sid)
        if feats is None:
            continue
        ref = ref or reference()
        per_set = [B.statistics(ref, f) for f in feats]
        sizes[name] = [len(f) for f in feats]
        stats = {m: B.mean_over_strata([s[b] for s in per_set], sizes[name]) for m, b in BOOTSTRAPPED.items()}
        values[name] = {m: f(np.ones(sum(sizes[name]), np.int64)) for m, f in stats.items()}
        reps[name] = B.replicates(stats, sizes[name], num_resamples, seed)
        e['intervals'] = {m: _interval(values[name][m], reps[name][m], normal=True) for m in stats}
    for base in [b for b in PAIRED if b in reps]:
        for name in [n for n in reps if sizes[n] == sizes[base]]:   # the same draws only for the same sizes
            tuned_entry(methods[name])[1][f'vs_{base}_intervals'] = {
                m: _interval(values[name][m] - values[base][m], reps[name][m] - reps[base][m])
                for m in BOOTSTRAPPED}


# ---------------------------------------------------------------------------------------------------
# results.md.

def _fmt(v: float, digits: int, sign: bool = False) -> str:
    return f"{v:{'+' if sign else ''}.{digits}f}"


def _ci(i: dict, digits: int, scale: float = 1.0, sign: bool = False) -> str:
    return (f"{_fmt(scale * i['value'], digits, sign)} [{_fmt(scale * i['low'], digits, sign)}, "
            f"{_fmt(scale * i['high'], digits, sign)}]")


def _cell(e: dict, metric: str, digits: int, scale: float = 1.0) -> str:
    """value [lo, hi] when bootstrapped, else mean ± std over the report sets ('–': not measured)."""
    if metric in e.get('intervals', {}):
        return _ci(e['intervals'][metric], digits, scale)
    s = e['report'].get(metric)
    if s is None or not np.isfinite(s['mean']):
        return '–'
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _paired(e: dict, metric: str) -> str:
    if metric in e.get('vs_none_intervals', {}):
        return _ci(e['vs_none_intervals'][metric], 2, sign=True)
    d = e.get('vs_none', {}).get(metric)
    if d is None:
        return '–'
    return f"{d['mean']:+.2f} ({', '.join(f'{v:+.2f}' for v in d['values'])})"


def _flops(e: dict) -> str:
    ratio = e.get('flops_vs_none')
    return '–' if ratio is None else f'{ratio:.2f}'


def _legend(results: dict, p: Protocol) -> list[str]:
    boot = results['meta'].get('bootstrap')
    lines = [f'Heun {p.num_steps} steps; tuned on {p.tune_n} images (seeds 0–{p.tune_n - 1}), reported on '
             f'{p.report_sets} × {p.report_n} other images; requested label = seed mod 10. w is the guidance '
             'weight (g = 1 + w). NFE: network evaluations per image (2·steps − 1 unguided; a guide pass '
             'doubles it, the mean of k dropout passes (insitu-avgk) makes it (1 + k)×). FLOPs ×: XLA\'s '
             'FLOP count of sampling one image over the unguided one (a smaller guide network, a shared '
             'encoder or an interval cost less than their NFE says).', '']
    if boot:
        lines += [f'FD, KID, precision, recall: the mean over the report sets [normal bootstrap 95 % '
                  f'interval, ± 1.96 standard errors: {boot["resamples"]} resamples (seed {boot["seed"]}), '
                  'each set\'s images resampled within the set; FD\'s own small-sample bias, the same for '
                  'every method at one n, is not in it]. ΔFD vs none: the paired difference (method − none) '
                  'on the same resamples (the sets share their seeds, so a resampled row is the same seed '
                  'for both) [its percentile interval]. Class accuracy, and rows without feature files: mean ± std over the sets '
                  '(ΔFD: mean, then the per-set values).', '']
    else:
        lines += ['Mean ± std over the report sets. ΔFD vs none: the paired difference (method − none) on '
                  'each report set, which share their seeds: mean, then the per-set values.', '']
    if results['meta'].get('tuned_on'):
        lines += [f'Settings: every model other than {results["meta"]["tuned_on"]} is run at the settings tuned '
                  f'on {results["meta"]["tuned_on"]} (its own grids are not run; "tune FD" is its score there).', '']
    lines += ['KID ×10³: the unbiased kernel distance (MMD², cubic kernel) of the evaluator features to '
              'the reference features, both standardized by the reference statistics, times 1000. "edge: w↑" marks a tuned point at the end of its grid '
              '(here the largest w), where the optimum may lie beyond the grid.', '']
    return lines


def results_markdown(results: dict, protocol: Protocol) -> str:
    lines = _legend(results, protocol)
    head = ('| method | tuned setting | FD-FMNIST ↓ | ΔFD vs none | KID ×10³ ↓ | precision ↑ | recall ↑ '
            '| class acc. ↑ | NFE | FLOPs × | tune FD |')
    for model, methods in results['models'].items():
        lines += [f'### {model}', '', head, '|' + '---|' * 11]
        if model in results['data']:
            d = {'report': results['data'][model]}
            lines.append(f'| {DATA_ROW} | – | {_cell(d, "fd_fmnist", 2)} | – | {_cell(d, "kid", 2, 1e3)} | '
                         f'{_cell(d, "precision", 3)} | {_cell(d, "recall", 3)} | {_cell(d, "class_accuracy", 3)} '
                         '| – | – | – |')
        for name, entry in methods.items():
            sid, e = tuned_entry(entry)
            edges = grid_edges(entry)
            sid += f' (edge: {", ".join(edges)})' if edges else ''
            lines.append(f'| {name} | {sid} | {_cell(e, "fd_fmnist", 2)} | {_paired(e, "fd_fmnist")} | '
                         f'{_cell(e, "kid", 2, 1e3)} | {_cell(e, "precision", 3)} | {_cell(e, "recall", 3)} | '
                         f'{_cell(e, "class_accuracy", 3)} | {e["nfe_per_image"]:g} | {_flops(e)} | '
                         f'{e["tune"]["fd_fmnist"]:.2f} |')
        lines += paired_markdown(methods)
        skipped = results['meta']['skipped'].get(model) or {}
        if skipped:
            lines += ['', 'Skipped: ' + '; '.join(f'{k} ({v})' for k, v in skipped.items()) + '.']
        lines.append('')
    return '\n'.join(lines + seeds_markdown(results))


def paired_markdown(methods: dict) -> list[str]:
    """Each method against in-situ and autoguidance, paired (PAIRED; where their features exist): the
    differences in FD, KID and recall with percentile 95 % intervals."""
    bases = [b for b in PAIRED[1:] if any(f'vs_{b}_intervals' in tuned_entry(m)[1] for m in methods.values())]
    if not bases:
        return []
    cols = [(b, m, label) for b in bases for m, label in (('fd_fmnist', 'ΔFD'), ('kid', 'ΔKID ×10³'),
                                                           ('recall', 'Δrecall'))]
    lines = ['', 'Paired against ' + ' and '.join(bases) + ' (method − that row on the same resamples, '
             'percentile 95 % intervals):', '',
             '| method | ' + ' | '.join(f'{label} vs {b}' for b, _, label in cols) + ' |', '|---' * (1 + len(cols)) + '|']
    digits = {'fd_fmnist': (2, 1.0), 'kid': (2, 1e3), 'recall': (3, 1.0)}
    for name, entry in methods.items():
        e = tuned_entry(entry)[1]
        cells = ['–' if m not in e.get(f'vs_{b}_intervals', {}) else
                 _ci(e[f'vs_{b}_intervals'][m], digits[m][0], digits[m][1], sign=True) for b, m, _ in cols]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


SEED_SUFFIX = re.compile(r'-seed\d+$')


def seed_groups(names) -> dict[str, list[str]]:
    """Models trained with several seeds (named <base> and <base>-seed<k>): base → their names."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(SEED_SUFFIX.sub('', name), []).append(name)
    return {base: group for base, group in groups.items() if len(group) > 1}


def seeds_markdown(results: dict) -> list[str]:
    """Per model trained with several seeds, each method's report FD and ΔFD vs none on every seed's
    model, and their plain mean over the seeds."""
    lines = []
    for base, names in seed_groups(results['models']).items():
        models = [results['models'][n] for n in names]
        how = ('at the settings tuned on ' + results['meta']['tuned_on'] if results['meta'].get('tuned_on')
               else 'tuned')
        lines += [f'### {base} across training seeds ({", ".join(names)})', '',
                  f'Each method {how} and reported on every seed\'s model as above; "mean": the plain mean '
                  'over the seeds\' rows.', '',
                  '| method | tuned settings | FD-FMNIST per seed | mean FD | ΔFD vs none per seed | mean ΔFD |',
                  '|' + '---|' * 6]
        for name in [m for m in models[0] if all(m in ms for ms in models)]:
            tuned = [tuned_entry(ms[name]) for ms in models]
            fd = [e['report']['fd_fmnist']['mean'] for _, e in tuned]
            delta = [e.get('vs_none', {}).get('fd_fmnist', {}).get('mean', float('nan')) for _, e in tuned]
            lines.append(f'| {name} | {"; ".join(sid for sid, _ in tuned)} | {", ".join(f"{v:.2f}" for v in fd)} '
                         f'| {np.mean(fd):.2f} | {", ".join(f"{v:+.2f}" for v in delta)} | {np.mean(delta):+.2f} |')
        lines.append('')
    return lines


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
    write_result(out / 'results.json', results)
    io.write_text(out / 'results.md', results_markdown(results, protocol))
    for model, methods in results['models'].items():
        plot_tradeoffs(results, out / 'plots' / f'tradeoff-{model}.png', model)
        plot_insitu_heatmap(results, out / 'plots' / f'insitu-heatmap-{model}.png', model)
        for name, entry in methods.items():
            sid, _ = tuned_entry(entry)
            write_grid(result_path(out, model, name, sid, 'report0').with_suffix('.npz'),
                       out / 'grids' / model / f'{name}.png')

"""The study's outputs from its results dict: results.md (each method at its tuned point, with the
paired difference to no guidance and grid-edge marks), results.json, the trade-off plots and the
in-situ heat map under plots/, and the image grids under grids/<model>/.

Everything here reads the results and the report0 image files the runner left; nothing samples.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edm2_jax import io
from edm2_jax.study.protocol import Protocol, result_path, write_result

DATA_ROW = 'real images (train split)'


def tuned_entry(method_entry: dict) -> tuple[str, dict]:
    """(setting id, entry) of the tuned point in a method's results."""
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
    write_result(out / 'results.json', results)
    io.write_text(out / 'results.md', results_markdown(results, protocol))
    for model, methods in results['models'].items():
        plot_tradeoffs(results, out / 'plots' / f'tradeoff-{model}.png', model)
        plot_insitu_heatmap(results, out / 'plots' / f'insitu-heatmap-{model}.png', model)
        for name, entry in methods.items():
            sid, _ = tuned_entry(entry)
            write_grid(result_path(out, model, name, sid, 'report0').with_suffix('.npz'),
                       out / 'grids' / model / f'{name}.png')

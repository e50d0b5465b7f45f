"""The toy study's report: metrics aggregated over runs, the markdown table, the pre-declared
per-family scalars, the figure's choice of operating points, and the files written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edm2_jax import io
from edm2_jax.toy import metrics as metrics_lib


def aggregate(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and std over runs of method → metric → value."""
    mean, std = {}, {}
    for method in runs[0]:
        mean[method], std[method] = {}, {}
        for metric in runs[0][method]:
            v = np.array([r[method][metric] for r in runs], np.float64)
            mean[method][metric] = float(v.mean())
            std[method][metric] = float(v.std())
    return mean, std


def _fmt(v):
    return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'


def markdown_table(mean, std, n_runs):
    cols = metrics_lib.METRICS
    lines = ['| method | ' + ' | '.join(cols) + ' |', '| --- ' * (len(cols) + 1) + '|']
    for method, vals in mean.items():
        cells = [_fmt(vals[c]) + (f' ± {_fmt(std[method][c])}' if n_runs > 1 else '') for c in cols]
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


MAX_ESCAPE_FOR_KL = 0.01   # the k-NN entropy term rewards samples thrown far away: ignore such rows


def summary(mean):
    """Scalars per method family: min KL clip (over settings with escape rate ≤ 1 %, since the
    clipped-log-p KL estimate turns meaningless when samples are thrown far away), and min branch TV
    among settings whose outlier rate is at most ¾ of the unguided one."""
    limit = 0.75 * mean['none']['outlier']
    fams = {}
    for method, vals in mean.items():
        if method in ('exact', 'exact_ode'):
            continue
        fams.setdefault(method.split(' ')[0], []).append((method, vals))
    lines = [f'| family | min KL clip, escape ≤ {MAX_ESCAPE_FOR_KL:g} (at) | min branch TV with outlier ≤ '
             f'{limit:.3g} (at) | min outlier rate (at) |', '| --- | --- | --- | --- |']

    def best(items, metric):
        if not items:
            return '— (none qualifies)'
        m, v = min(items, key=lambda t: t[1][metric])
        return f'{v[metric]:.3g} ({m})'
    for fam, items in fams.items():
        kl_ok = [t for t in items if t[1]['escape'] <= MAX_ESCAPE_FOR_KL]
        tv_ok = [t for t in items if t[1]['outlier'] <= limit]
        lines.append(f'| {fam} | {best(kl_ok, "kl_clip")} | {best(tv_ok, "branch_tv")} | {best(items, "outlier")} |')
    return '\n'.join(lines)


def write_outputs(outdir: Path, mean, std, n_runs, info: dict, sanity: dict):
    io.write_text(outdir / 'metrics.json', json.dumps(mean, indent=1) + '\n')
    if n_runs > 1:
        io.write_text(outdir / 'metrics_std.json', json.dumps(std, indent=1) + '\n')
    io.write_text(outdir / 'run.json', json.dumps({**info, 'dropout_sanity': sanity}, indent=1) + '\n')
    md = ['# Toy 2-D guidance comparison', '',
          f'{info["num_samples"]} samples per method; {n_runs} run(s) (training seeds {info["train_seeds"]} × '
          f'sampling seeds {info["sample_seeds"]}){" — mean ± std" if n_runs > 1 else ""}. '
          f'Outlier threshold τ = {info["tau"]:.3f} (1 % quantile of log p_A of exact samples). '
          f'Row `exact`: a second exact sample set (noise floor); `exact_ode`: the sampler with the exact score.',
          '', markdown_table(mean, std, n_runs), '', '## Per family (pre-declared scalars)', '', summary(mean)]
    if sanity:
        md += ['', '## Dropout sanity: held-out loss (σ² · score MSE)', '',
               '| model / σ | dropout off | one pass | mean of 32 passes |', '| --- | --- | --- | --- |']
        md += [f'| {k} | {v["off"]:.4g} | {v["one_pass"]:.4g} | {v["mean_32"]:.4g} |' for k, v in sanity.items()]
    md += ['', f'Wall time: {info["wall_time_s"]:.0f} s ({info["machine"]}).', '']
    io.write_text(outdir / 'metrics.md', '\n'.join(md))


def pick_insitu(mean, w, prefix='in-situ p='):
    """The figure's in-situ (or other `prefix` family) point: among its rows at weight w with escape
    rate ≤ 1 %, the lowest KL clip (if none qualifies: the lowest outlier rate)."""
    rows = [m for m in mean if m.startswith(prefix) and m.endswith(f' w={w:g}')]
    ok = [m for m in rows if mean[m]['escape'] <= MAX_ESCAPE_FOR_KL]
    if ok:
        return min(ok, key=lambda m: mean[m]['kl_clip'])
    return min(rows, key=lambda m: mean[m]['outlier'])

"""Runs the study: every row's grid on the tuning seeds, the tuned point (lowest FD) on the report
sets, each method paired with no guidance on the shared report seeds, with bootstrap intervals from
the report sets' evaluator features.

Every result is read back from its file when it exists (`Runner.result`), so an interrupted study
resumes where it stopped. `plan` counts the work in advance (--dry_run).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edm2_jax import io
from edm2_jax.errors import UserError
from edm2_jax.metrics import bootstrap
from edm2_jax.study import grids
from edm2_jax.study.protocol import (METRICS, REPORT_BASE, Protocol, check_protocol, features_path,
                                     requested_labels, result_path, sample_images, write_result)
from edm2_jax.study.report import (BOOTSTRAP_SEED, RESAMPLES, add_intervals, load_features, tuned_entry,
                                   write_outputs)

APG = 'apg'   # the name that selects the APG row (it is named apg-<base method> in the results)


def compile_count() -> int:
    from edm2_jax import sampling
    return sampling._sample._cache_size()


class Runner:
    """Computes (or reads back) one result file per (model, method, setting, seed set)."""

    def __init__(self, out: Path, protocol: Protocol, score: Callable, log: Callable = print):
        self.out, self.p, self.score, self.log = out, protocol, score, log
        self.computed = 0
        self.compiles: dict[tuple[str, str], int] = {}

    def result(self, model: str, net, ctx: grids.Context, method: grids.Method, setting: dict, seed_set: str):
        sid = grids.setting_id(setting)
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
        scored = self.score(images, requested_labels(net, seeds))
        metrics = _metrics(scored.metrics)
        score_s = time.perf_counter() - start
        # The bootstrap's rows and the image grid's source, written before the JSON that marks it done.
        if seed_set != 'tune':
            io.save_npz(features_path(self.out, model, method.name, sid, seed_set),
                        features=np.asarray(scored.features, np.float32))
        if seed_set == 'report0':
            io.save_npz(path.with_suffix('.npz'), images=images[:self.p.grid_n])
        res = dict(model=model, method=method.name, setting=setting, setting_id=sid, seed_set=seed_set,
                   seeds=dict(first=int(seeds[0]), count=len(seeds)), num_steps=self.p.num_steps,
                   nfe_per_image=grids.nfe_per_image(kwargs, net.config, self.p.num_steps),
                   metrics=metrics, nonfinite_samples=bad, sample_s=round(sample_s, 3),
                   score_s=round(score_s, 3))
        write_result(path, res)
        self.computed += 1
        self.log(f'{model} {method.name} [{sid}] {seed_set}: fd {metrics.get("fd_fmnist", float("nan")):.3f} '
                 f'({sample_s:.1f} s sampling, {score_s:.1f} s scoring)')
        return res

    def reference(self, resolution: int, seed_set: str, images, labels):
        """The real-image floor row at a generator resolution, scored like the samples."""
        path = result_path(self.out, '_data', 'train-split', f'{resolution}x{resolution}', seed_set)
        if path.is_file():
            return json.loads(path.read_text())
        metrics = _metrics(self.score(images, labels).metrics)
        res = dict(seed_set=seed_set, count=len(images), resolution=resolution, metrics=metrics)
        write_result(path, res)
        self.computed += 1
        return res


# ---------------------------------------------------------------------------------------------------
# Selection and summaries.

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
    """Per metric, mean ± std over the report sets (NaN for a metric an older result lacks)."""
    return {k: summarize([r['metrics'].get(k, float('nan')) for r in results]) for k in METRICS}


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


# ---------------------------------------------------------------------------------------------------
# The study.

def run_model(runner: Runner, model: str, net, ctx: grids.Context, only=None, fixed: dict | None = None) -> dict:
    """Tunes and reports every method for one main network; returns method → its entry. fixed: method
    → a setting tuned elsewhere (`tuned_settings`), which replaces that method's grid."""
    wanted = lambda name: only is None or name in only  # noqa: E731
    methods = [m for m in grids.all_methods(ctx, runner.p.quick)
               if wanted(m.name) or (m.name == 'insitu' and wanted(grids.SCHEDULE))]
    entries, tuned = {}, {}

    def tune(m):
        if fixed and m.name in fixed:
            m = dataclasses.replace(m, grid=(fixed[m.name],))
        results = [runner.result(model, net, ctx, m, s, 'tune') for s in m.grid]
        tuned[m.name] = (m, m.grid[tuned_index(results)])
        entries[m.name] = results
    for m in methods:
        tune(m)
    if wanted(grids.SCHEDULE):
        tune(grids.schedule_method(tuned['insitu'][1], quick=runner.p.quick))
    guided = [n for n in entries if n != 'none' and n not in grids.RULE_ROWS]
    if guided and wanted(APG):
        given = [n for n in guided if fixed and f'apg-{n}' in fixed]    # the base chosen where it was tuned
        best = given[0] if given else min(guided, key=lambda n: min(_fd(r) for r in entries[n]))
        tune(grids.apg_method(*tuned[best], quick=runner.p.quick))
    out = {}
    unguided = grids.flops_per_image({'method': 'none'}, net, runner.p.num_steps)
    for name, (m, best_setting) in tuned.items():
        report = [runner.result(model, net, ctx, m, best_setting, k) for k in runner.p.report_names]
        sid = grids.setting_id(best_setting)
        out[name] = {}
        for r in entries[name]:
            e = dict(setting=r['setting'], nfe_per_image=r['nfe_per_image'], tune=r['metrics'],
                     tuned=r['setting_id'] == sid)
            if e['tuned']:
                e['report'] = report_summary(report)
                e['nonfinite_samples'] = sum(x['nonfinite_samples'] for x in report)
                flops = grids.flops_per_image(m.build(best_setting, ctx), net, runner.p.num_steps)
                e['flops_per_image'] = flops
                e['flops_vs_none'] = None if flops is None or not unguided else flops / unguided
            out[name][r['setting_id']] = e
    add_paired_differences(out)
    return out


def tuned_settings(model_entry: dict) -> dict:
    """method → its tuned setting, from one model's entries (`run_model`)."""
    return {name: tuned_entry(entry)[1]['setting'] for name, entry in model_entry.items()}


def plan(models: dict, ctx_of: Callable, p: Protocol, only=None) -> list[dict]:
    """Per (model, method): grid size, images sampled and network evaluations (full-image units).
    Reports are counted at the grid's most expensive setting and APG at the costliest guided method's
    cost (the tuned points are not known in advance), so the totals are upper bounds."""
    rows = []
    for name, net in models.items():
        ctx = ctx_of(name, net)
        methods = [m for m in grids.all_methods(ctx, p.quick) if only is None or m.name in only]
        if only is None or grids.SCHEDULE in only:   # its grid size and cost do not depend on the base point
            base = next(m for m in grids.all_methods(ctx, p.quick) if m.name == 'insitu').grid[0]
            methods.append(grids.schedule_method(base, p.quick))
        costs = {}
        for m in methods:
            costs[m.name] = [grids.nfe_per_image(m.build(s, ctx), ctx.config, p.num_steps) for s in m.grid]
        guided = [m for m in methods if m.name != 'none']
        if guided and (only is None or APG in only):
            top = max(guided, key=lambda m: max(costs[m.name]))
            apg = grids.apg_method(top, top.grid[0], p.quick)
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
        known = {APG, grids.SCHEDULE} | {m.name for name, net in models.items()
                                         for m in grids.all_methods(ctx_of(name, net), quick)}
        if set(only) - known:
            raise UserError(f'unknown methods {sorted(set(only) - known)}', where='--methods',
                            fix=f'known: {sorted(known)}')


def check_tuned_on(models, tuned_on: str | None) -> None:
    if tuned_on is not None and tuned_on not in models:
        raise UserError(f'{tuned_on!r} is not a main model', where='--tuned_on', fix=f'one of {sorted(models)}')


def run_study(models: dict, ctx_of: Callable, score: Callable, out, protocol: Protocol, *,
              only=None, reference: Callable | None = None, feature_refs: Callable | None = None,
              resamples: int = RESAMPLES, evaluator: dict | None = None, tuned_on: str | None = None,
              log: Callable = print) -> dict:
    """models: name → Network; ctx_of(name, net) → grids.Context; score(uint8 images [N,R,R,C],
    requested labels | None) → protocol.Scored (metrics, features); reference(R) → per report set
    (uint8 images at R, labels) of real images, or None for no floor row; feature_refs(R) → what
    score compares features with at R (.mu, .sigma: FD; .features: KID, precision, recall), for
    bootstrap intervals over `resamples` resamples (0: none); evaluator: what to record
    about the scorer; tuned_on: a model whose tuned settings every other model uses instead of
    tuning its own grids (run first). Writes every output under `out` and returns the results dict."""
    check_protocol(protocol)
    check_tuned_on(models, tuned_on)
    if tuned_on is not None:
        models = {tuned_on: models[tuned_on], **models}
    check_methods(models, ctx_of, only, protocol.quick)
    if resamples < 0 or resamples == 1:
        raise UserError(f'need 0 (no intervals) or at least 2 resamples, got {resamples}', where='--resamples')
    out = Path(out)
    runner = Runner(out, protocol, score, log)
    results = dict(meta=dict(protocol=protocol._asdict(), report_seed_base=REPORT_BASE,
                             label_rule='seed mod label_dim', std='ddof=1 over report sets',
                             evaluator=evaluator, skipped={}, tuned_on=tuned_on), models={}, data={})
    intervals = feature_refs is not None and resamples > 0
    if intervals:
        results['meta']['bootstrap'] = dict(
            resamples=resamples, seed=BOOTSTRAP_SEED, level=0.95, statistic='mean over the report sets',
            resampling='rows within each report set; the same resamples for every method (paired)')
    prepared = functools.cache(lambda r: _prepared_reference(feature_refs(r)))
    for name, net in models.items():
        if reference is not None:
            r = net.config.img_resolution
            rows = [runner.reference(r, k, *sets) for k, sets in zip(protocol.report_names, reference(r))]
            results['data'][name] = report_summary(rows)
        ctx = ctx_of(name, net)
        fixed = None if tuned_on in (None, name) else tuned_settings(results['models'][tuned_on])
        results['models'][name] = run_model(runner, name, net, ctx, only, fixed)
        results['meta']['skipped'][name] = grids.skipped_methods(ctx)
        if intervals:
            start = time.perf_counter()
            add_intervals(results['models'][name], lambda method, sid: load_features(
                [features_path(out, name, method, sid, k) for k in protocol.report_names]),
                lambda: prepared(net.config.img_resolution), resamples)
            log(f'{name}: bootstrap intervals in {time.perf_counter() - start:.0f} s')
    results['meta']['results_computed_this_run'] = runner.computed
    results['meta']['compiles_this_run'] = {f'{model}/{method}': n for (model, method), n in runner.compiles.items()}
    write_outputs(results, out, protocol)
    return results


def _prepared_reference(refs) -> bootstrap.Reference:
    """KID on standardized features, as the Fashion-MNIST scorer's (`metrics.fmnist`)."""
    return bootstrap.reference(refs.features, ref_mu=refs.mu, ref_sigma=refs.sigma, kid_standardize=True)

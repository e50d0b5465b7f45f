"""The rows of the guidance study: each a method of the registry `edm2_jax.methods` with its
tuning grid.

A `Method` turns a *setting* (a flat dict of numbers, e.g. {'w': 1.0, 'p': 0.1}) into keyword
arguments of `sampling.sample`. Within one method every setting has the same static structure
(method name, perturbed blocks, presence of an interval or schedule), so its whole grid runs through
one compiled sampler: only traced numbers change. w is the guidance weight (EDM2's g = 1 + w).

Two rows are derived from tuned points: the in-situ σ-schedules move the tuned in-situ strength
across σ (`schedule_method`), and APG runs last, on top of the guided method with the lowest tuning
FD (`apg_method`). A guide's static structure includes how it draws its dropout masks (frozen, k
averaged draws, antithetic), so each such variant is its own row.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, NamedTuple

from edm2_jax import guidance as G
from edm2_jax import methods as registry
from edm2_jax import rules
from edm2_jax import sampling
from edm2_jax.config import block_specs


class Context(NamedTuple):
    """What a method can use besides the main network (None where not given)."""
    config: Any          # the main network's EDM2Config
    guide: Any = None    # weaker conditional network (autoguidance, hybrid)
    uncond: Any = None   # unconditional network (CFG)
    history: Any = None  # the main network's own run at a much shorter EMA ('history')


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    grid: tuple[dict, ...]
    build: Callable[[dict, Context], dict]   # setting → sample() kwargs (method, guidance, guide, …)
    needs: str | None = None                 # 'guide' | 'uncond' | 'history' | None


def setting_id(setting: dict) -> str:
    """A stable, file-name-safe id: 'w=1,p=0.1' (keys in the setting's order); 'default' when empty."""
    return ','.join(f'{k}={v:g}' for k, v in setting.items()) or 'default'


def _grid(**axes) -> tuple[dict, ...]:
    """The product of the axes (all numbers), as settings in row-major order."""
    keys = list(axes)
    return tuple(dict(zip(keys, map(float, values))) for values in itertools.product(*axes.values()))


def _g(setting, scale=1.0):
    return 1.0 + scale * setting['w']


# ---------------------------------------------------------------------------------------------------
# Grids. FULL is what the study runs; QUICK (tests) keeps the structure with one or two points.

FULL = dict(
    w=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
    w_fine=(0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0),   # CFG overshoots fast: finer at small w
    w_auto=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0),   # autoguidance, history: tuned at 0.25 before
    w_interval=(0.25, 0.5, 1.0, 2.0, 3.0),
    w_insitu=(0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0),
    p=(0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
    w_level=(0.5, 1.0, 2.0, 5.0), p_level=(0.1, 0.2, 0.4),   # blocks and levels: tuned at (2, 0.2) before
    w_variant=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0), p_variant=(0.05, 0.1, 0.2, 0.3, 0.5),   # frozen masks: tuned at w 0.25 before
    w_avg=(0.5, 1.0, 2.0, 5.0), p_avg=(0.05, 0.1, 0.25, 0.5),   # averaged draws: (1 + k)× the cost
    w_hybrid=(0.1, 0.25, 0.5, 1.0, 2.0),           # guided by the small guide: overshoots like autoguidance
    p_hybrid=(0.05, 0.1, 0.2),
    w_weak=(0.1, 0.25, 0.5, 1.0, 1.5),             # slg, swg: worst at every w, so one weaker point
    w_shift=(0.1, 0.5, 1.0, 2.0),
    intervals=((0.28, 5.42),),   # the σ range of Kynkäänniemi et al. 2024 (EDM2-S/XXL, ImageNet-512)
    shift=(0.1, 0.3, 1.0),
    schedule_sigmas=(0.2, 20.0),
    apg_eta=(0.0, 0.5), apg_momentum=(0.0, -0.5), apg_scale=(1.0, 2.0),
    rescale_phi=(0.3, 0.7, 1.0), zero_init=(0, 1),
)
QUICK = dict(
    w=(0.5, 2.0), w_fine=(0.5, 2.0), w_auto=(0.5,), w_interval=(2.0,), w_insitu=(0.5, 2.0), p=(0.1, 0.3),
    w_level=(1.0,), p_level=(0.2,), w_variant=(1.0,), p_variant=(0.2,), w_avg=(1.0,), p_avg=(0.2,),
    w_hybrid=(1.0,), p_hybrid=(0.2,), w_weak=(0.5,), w_shift=(1.0,),
    intervals=((0.28, 5.42),), shift=(0.3,), schedule_sigmas=(0.2, 20.0),
    apg_eta=(0.0,), apg_momentum=(0.0, -0.5), apg_scale=(1.0,),
    rescale_phi=(0.7,), zero_init=(1,),
)
AVERAGED = (2, 4)   # k of the averaged in-situ rows (k changes the compiled program: one row each)


def resolution_levels(config) -> dict[str, tuple[str, ...]]:
    """'RxR' → the names of all blocks (encoder and decoder) whose output has resolution R."""
    levels: dict[int, list[str]] = {}
    for s in block_specs(config):
        if s.kind == 'block':
            levels.setdefault(s.resolution, []).append(s.name)
    return {f'{r}x{r}': tuple(names) for r, names in sorted(levels.items(), reverse=True)}


def has_attention(config) -> bool:
    return any(s.num_heads > 0 for s in block_specs(config))


def _insitu(blocks):
    def build(s, ctx):
        return dict(method='insitu', guidance=_g(s), strength=s['p'], blocks=blocks)
    return build


def _insitu_terms(name, **options):
    """A registry in-situ variant on all blocks, as sampler terms (its options are static)."""
    return lambda s, ctx: dict(terms=registry.terms(name, s['w'], s['p'], blocks='all', **options))


def insitu_variants(g: dict) -> list[Method]:
    """Frozen masks, and the mean of k draws (k in AVERAGED; antithetic: the copies' masks are
    disjoint, which needs p ≤ 1/k)."""
    rows = [Method('insitu-frozen', _grid(w=g['w_variant'], p=g['p_variant']), _insitu_terms('insitu-frozen'))]
    for k in AVERAGED:
        rows.append(Method(f'insitu-avg{k}', _grid(w=g['w_avg'], p=g['p_avg']), _insitu_terms('insitu-avg', k=k)))
    for k in AVERAGED:
        rows.append(Method(f'insitu-avg{k}-anti', _grid(w=g['w_avg'], p=[p for p in g['p_avg'] if p <= 1 / k]),
                           _insitu_terms('insitu-avg', k=k, antithetic=True)))
    return rows


def _schedules(s, sigmas):
    """w(σ) and p(σ), linear in log σ between the two knots, constant beyond."""
    return (G.Schedule.linear(sigmas, [1 + s['w_lo'], 1 + s['w_hi']]),
            G.Schedule.linear(sigmas, [s['p_lo'], s['p_hi']]))


SCHEDULE = 'insitu-schedule'   # derived from the tuned 'insitu' point, which it therefore also runs
SCHEDULE_SCALES = (1.0, 2.0)


def schedule_grid(base: dict, scales=SCHEDULE_SCALES) -> tuple[dict, ...]:
    """σ-schedules of in-situ around its tuned point base = {w, p}: (w at low σ, w at high σ, p at low
    σ, p at high σ). Per scale s: p rising / falling with σ (s·p at one end, p/4 at the other, w
    constant) and w only at high / only at low σ (s·w at that end, 0 at the other, p constant).
    Moving the same strength across σ answers which noise levels carry the benefit; s = 2
    compensates for the half of the σ range that is switched off."""
    w, p = base['w'], base['p']
    out = []
    for k in scales:
        kp = min(k * p, 0.9)
        out += [dict(w_lo=w, w_hi=w, p_lo=p / 4, p_hi=kp), dict(w_lo=w, w_hi=w, p_lo=kp, p_hi=p / 4),
                dict(w_lo=0.0, w_hi=k * w, p_lo=p, p_hi=p), dict(w_lo=k * w, w_hi=0.0, p_lo=p, p_hi=p)]
    return tuple({k: float(v) for k, v in d.items()} for d in out)


def schedule_method(base: dict, quick: bool = False) -> Method:
    """In-situ with σ-schedules of w and p (linear in log σ between the knots), built on the tuned
    setting of 'insitu' (so it runs after it, like APG)."""
    sigmas = (QUICK if quick else FULL)['schedule_sigmas']
    grid = schedule_grid(base, SCHEDULE_SCALES[:1] if quick else SCHEDULE_SCALES)
    return Method(SCHEDULE, grid,
                  lambda s, ctx: dict(zip(('guidance', 'strength'), _schedules(s, sigmas)), method='insitu'))


def all_methods(ctx: Context, quick: bool = False) -> list[Method]:
    """Every method of the study that the given networks allow; 'insitu-schedule' and APG are derived
    from tuned points later (`schedule_method`, `apg_method`)."""
    g = QUICK if quick else FULL
    methods = [
        Method('none', ({},), lambda s, ctx: dict(method='none')),
        Method('cfg', _grid(w=g['w_fine']), lambda s, ctx: dict(method='cfg', guidance=_g(s), guide=ctx.uncond),
               needs='uncond'),
        Method('cfg-interval',
               tuple({**d, 'lo': lo, 'hi': hi} for d in _grid(w=g['w_interval']) for lo, hi in g['intervals']),
               lambda s, ctx: dict(method='cfg', guidance=_g(s), guide=ctx.uncond, interval=(s['lo'], s['hi'])),
               needs='uncond'),
        Method('cfg-rescale', _grid(w=g['w_fine'], phi=g['rescale_phi']),
               lambda s, ctx: dict(method='cfg', guidance=_g(s), guide=ctx.uncond, rule=rules.Rescale(s['phi'])),
               needs='uncond'),
        Method('cfg-zerostar', _grid(w=g['w_fine'], zero_init=g['zero_init']),
               lambda s, ctx: dict(method='cfg', guidance=_g(s), guide=ctx.uncond,
                                   rule=rules.ZeroStar(zero_init_steps=s['zero_init'])), needs='uncond'),
        Method('autoguidance', _grid(w=g['w_auto']),
               lambda s, ctx: dict(method='autoguidance', guidance=_g(s), guide=ctx.guide), needs='guide'),
        Method('history', _grid(w=g['w_auto']),
               lambda s, ctx: dict(method='history', guidance=_g(s), guide=ctx.history), needs='history'),
        Method('insitu', _grid(w=g['w_insitu'], p=g['p']), _insitu('all')),
        *insitu_variants(g),
        Method('insitu-encoder', _grid(w=g['w_level'], p=g['p_level']), _insitu('encoder')),
        Method('insitu-decoder', _grid(w=g['w_level'], p=g['p_level']), _insitu('decoder')),
    ]
    for level, names in resolution_levels(ctx.config).items():
        methods.append(Method(f'insitu-{level}', _grid(w=g['w_level'], p=g['p_level']), _insitu(names)))
    methods += [
        Method('hybrid', _grid(w=g['w_hybrid'], p=g['p_hybrid']),
               lambda s, ctx: dict(method='hybrid', guidance=_g(s), guide=ctx.guide, strength=s['p']),
               needs='guide'),
    ]
    if has_attention(ctx.config):
        methods.append(Method('pag', _grid(w=g['w'][:4]), lambda s, ctx: dict(method='pag', guidance=_g(s))))
    methods += [
        Method('slg', _grid(w=g['w_weak']), lambda s, ctx: dict(method='slg', guidance=_g(s))),
        Method('sigma-shift', _grid(w=g['w_shift'], delta=g['shift']),
               lambda s, ctx: dict(method='sigma-shift', guidance=_g(s), strength=s['delta'])),
        Method('swg', _grid(w=g['w_weak']), lambda s, ctx: dict(method='swg', guidance=_g(s))),
    ]
    return [m for m in methods if m.needs is None or getattr(ctx, m.needs) is not None]


def skipped_methods(ctx: Context) -> dict[str, str]:
    """Methods left out for these networks, with the reason."""
    out = {}
    if ctx.uncond is None:
        out.update({'cfg': 'no unconditional network (--uncond)', 'cfg-interval': 'no --uncond',
                    'cfg-rescale': 'no --uncond', 'cfg-zerostar': 'no --uncond'})
    if ctx.guide is None:
        out.update({'autoguidance': 'no guide network (--guide)', 'hybrid': 'no --guide'})
    if ctx.history is None:
        out['history'] = 'no history guide (--history, or a main network in a run directory with snapshots/)'
    if not has_attention(ctx.config):
        out['pag'] = 'the network has no attention'
    return out


APG_KEYS = ('apg_scale', 'eta', 'momentum')


def with_rule(kwargs: dict, rule) -> dict:
    """sample() kwargs with `rule` applied: to every term when they are given as terms."""
    if 'terms' in kwargs:
        return {**kwargs, 'terms': tuple(t.replace(rule=rule) for t in kwargs['terms'])}
    return {**kwargs, 'rule': rule}


RULE_ROWS = ('cfg-rescale', 'cfg-zerostar')  # rows that carry their own rule: not a base for APG


def apg_method(best: Method, best_setting: dict, quick: bool = False) -> Method:
    """APG (Sadat et al. 2025) on `best` at its tuned setting: the weights scaled by apg_scale (APG
    tolerates larger w), with projection η and momentum β as the grid; no norm threshold."""
    g = QUICK if quick else FULL
    grid = tuple({**best_setting, **d} for d in _grid(apg_scale=g['apg_scale'], eta=g['apg_eta'],
                                                       momentum=g['apg_momentum']))

    def build(s, ctx):
        base = {k: v for k, v in s.items() if k not in APG_KEYS}
        for k in ('w', 'w_lo', 'w_hi'):
            if k in base:
                base[k] *= s['apg_scale']
        return with_rule(best.build(base, ctx), rules.APG(eta=s['eta'], threshold=0.0, momentum=s['momentum']))
    return Method(f'apg-{best.name}', grid, build, best.needs)


# ---------------------------------------------------------------------------------------------------
# Cost: network evaluations per image.

SAMPLER_ARGS = ('method', 'guidance', 'strength', 'guide', 'blocks', 'window', 'rule', 'terms')


def _terms(kwargs: dict):
    return sampling.guidance_terms(**{k: v for k, v in kwargs.items() if k in SAMPLER_ARGS})


def nfe_per_image(kwargs: dict, config, num_steps: int) -> float:
    """Network evaluations per image of sample(**kwargs) (`methods.nfe_per_image`)."""
    return registry.nfe_per_image(_terms(kwargs), config, num_steps, kwargs.get('interval'))


def flops_per_image(kwargs: dict, net, num_steps: int) -> float | None:
    """XLA's FLOPs to sample one image with sample(**kwargs) (`profiling.flops_per_image`)."""
    from edm2_jax import profiling
    return profiling.flops_per_image(net, _terms(kwargs), num_steps, kwargs.get('interval'))

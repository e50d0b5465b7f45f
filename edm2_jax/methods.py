"""The registry of guidance methods: one entry per method, read by `sample`, the CLIs, the benchmark,
the study and the toy.

Each `Method` names its guide (none, the main network itself, a separate network, or optional), its
own strength (e.g. the dropout rate p of in-situ guidance) with its default, whether it takes a
block selection, its paper and cost, and makes a `guidance.Term` with one argument order:

    methods.term(name, w, strength=None, *, guide=None, blocks=None, window=None, **options)

w is the guidance weight (EDM2's g = 1 + w); options are a method's own (`Method.options`, e.g. the
number of dropout passes averaged by 'insitu-avg'). Adding a method is one entry here (plus its
perturbation in `edm2_jax.perturb`, if it needs a new one).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from edm2_jax import guidance as G
from edm2_jax import perturb as P

GUIDES = ('none', 'self', 'network', 'optional')  # what a method's guide is


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str                     # what the guide is, one line
    paper: str
    guide: str                       # one of GUIDES ('optional': a network, else the main one)
    make: Callable[..., G.Term]      # (w, strength, guide, blocks, window) → Term
    strength: str | None = None      # what the method's own strength means (None: it has none)
    default: float | None = None     # its default (None with a strength: it must be given)
    blocks: bool = False             # takes a block selection (`perturb.select_blocks` spellings)
    window: bool = False             # takes window=(size, stride)
    random: bool = False             # draws random numbers (needs per-sample keys)
    options: tuple = ()              # (name, default, meaning) of the method's own keyword options

    def help(self) -> str:
        parts = [f'{self.name}: {self.summary}']
        if self.strength:
            need = 'required' if self.default is None else f'default {self.default:g}'
            parts.append(f'strength = {self.strength} ({need})')
        if self.blocks:
            parts.append('takes blocks')
        parts += [f'{name} = {meaning} (default {default!r})' for name, default, meaning in self.options]
        return '; '.join(parts)


def _cfg(w, guide):
    if getattr(guide, 'config', None) is not None and guide.config.label_dim != 0:  # (the toy names its guides)
        raise ValueError('the CFG guide must be unconditional (label_dim 0); use autoguidance for a '
                         'conditional guide')
    return G.Term(w, guide, null_label=guide is None)


def _self(kind_maker):
    """make() of a self-guidance method: the main network under a perturbation."""
    return lambda w, s, guide, blocks, window: G.Term(w, perturbation=kind_maker(s, blocks, window))


def _insitu(**draws):
    """make() of in-situ guidance with the guide's randomness drawn as `draws` (guidance.Term)."""
    return lambda w, s, guide, blocks, window, **o: G.Term(w, perturbation=P.dropout(s, blocks),
                                                          **{k: f(o) for k, f in draws.items()})


def _edges(bands):
    """σ band edges of a frozen guide: () (one mask per sample) or increasing σ values."""
    return () if bands is None else tuple(float(b) for b in np.atleast_1d(bands))


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method('none', 'no guidance', '', 'none', lambda w, s, guide, blocks, window: None),
    Method('cfg', 'an unconditional guide network, or the main network with the null label',
           'Ho & Salimans 2022', 'optional', lambda w, s, guide, blocks, window: _cfg(w, guide)),
    Method('autoguidance', 'a weaker network of the same conditioning', 'Karras et al. 2024', 'network',
           lambda w, s, guide, blocks, window: G.Term(w, guide)),
    Method('insitu', 'the main network with dropout p in its residual branches',
           'in-situ autoguidance', 'self', _self(lambda s, b, _: P.dropout(s, b)),
           strength='dropout rate p in [0, 1)', blocks=True, random=True),
    Method('insitu-frozen', 'the main network with one dropout mask per sample, kept along the '
           'trajectory (or per σ band): one consistent thinned sub-network', 'frozen-mask in-situ', 'self',
           _insitu(frozen=lambda o: _edges(o['bands'])), strength='dropout rate p in [0, 1)', blocks=True,
           random=True, options=(('bands', None, 'σ edges between which a new mask is drawn'),)),
    Method('insitu-avg', 'the mean of k dropout passes of the main network (cost k guide passes)',
           'averaged in-situ', 'self',
           _insitu(average=lambda o: o['k'], antithetic=lambda o: o['antithetic']),
           strength='dropout rate p in [0, 1)', blocks=True, random=True,
           options=(('k', 2, 'dropout passes averaged'),
                    ('antithetic', False, 'copy j shifts the shared draw by j/k (disjoint drops, p <= 1/k)'))),
    Method('hybrid', 'a guide network with dropout p in its residual branches', 'autoguidance + in-situ',
           'network', lambda w, s, guide, blocks, window: G.Term(w, guide, perturbation=P.dropout(s, blocks)),
           strength='dropout rate p in [0, 1)', blocks=True, random=True),
    Method('pag', 'the main network with identity attention maps', 'Ahn et al. 2024', 'self',
           _self(lambda s, b, _: P.attention_identity(b, s)), strength='1 = on, 0 = off', default=1.0,
           blocks=True),
    Method('slg', 'the main network with blocks that pass only their skip path',
           'skip-layer guidance (SLG / STG-R)', 'self', _self(lambda s, b, _: P.skip(b, s)),
           strength='1 = on, 0 = off', default=1.0, blocks=True),
    Method('seg', 'the main network with Gaussian-blurred attention queries', 'Hong 2024', 'self',
           _self(lambda s, b, _: P.attention_blur(s, b)), strength='blur std in pixels (inf: the mean)',
           default=10.0, blocks=True),
    Method('tpg', 'the main network with its block inputs shuffled over positions',
           'token perturbation guidance', 'self', _self(lambda s, b, _: P.token_shuffle(b, s)),
           strength='1 = on, 0 = off', default=1.0, blocks=True, random=True),
    Method('sigma-shift', 'the main network at a higher noise level σ·(1 + δ)', 'self-guidance at σ(1 + δ)',
           'self', _self(lambda s, b, _: P.sigma_shift(s)), strength='δ > -1'),
    Method('swg', 'the main network on overlapping crops, averaged', 'Adaloglou et al. 2025 (M-SWG)',
           'self', _self(lambda s, b, window: P.window(*(window or (None, None)))), window=True),
    Method('history', 'the same run at a much shorter EMA or an early snapshot (experiments.phema '
           'exports it, from a run or NVIDIA\'s raw snapshots): autoguidance without a second run',
           'self-guidance from the training history', 'network',
           lambda w, s, guide, blocks, window: G.Term(w, guide)),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f'unknown guidance method {name!r}; choose from {", ".join(NAMES)}')
    return REGISTRY[name]


def term(name: str, w, strength=None, *, guide=None, blocks=None, window=None, **options) -> G.Term | None:
    """The guidance term of method `name` with weight w (a number, array or `guidance.Schedule`) and
    the method's own strength (None: its default) and options; None for 'none'. Raises ValueError for
    arguments the method does not take."""
    m = get(name)
    check_arguments(m, strength=strength, guide=guide, blocks=blocks, window=window)
    own = {o[0]: o[1] for o in m.options}
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise ValueError(f'method {m.name!r} takes no option {", ".join(unknown)}'
                         + (f' (its options: {", ".join(own)})' if own else ''))
    if m.guide == 'none':
        return None
    chosen = {k: v for k, v in options.items() if v is not None}
    return m.make(w, m.default if strength is None else strength, guide, blocks, window, **{**own, **chosen})


def terms(name: str | None, w, strength=None, *, guide=None, blocks=None, window=None,
          rule=None, **options) -> tuple[G.Term, ...]:
    """`term` as a tuple (empty for 'none' or None), with an optional rule (e.g. `rules.APG`)."""
    t = None if name is None else term(name, w, strength, guide=guide, blocks=blocks, window=window, **options)
    if t is None:
        if rule is not None:
            raise ValueError('a guidance rule needs a guidance method')
        return ()
    return (t if rule is None else t.replace(rule=rule),)


def weight(guidance):
    """w = g − 1 from EDM2's guidance g (a number, array or `guidance.Schedule`)."""
    if isinstance(guidance, G.Schedule):
        return guidance.map(lambda g: g - 1)
    concrete = G.concrete_values(guidance)
    return guidance - 1 if concrete is None else concrete - 1


def check_arguments(m: Method, *, strength=None, guide=None, blocks=None, window=None, guide_name='guide'):
    """Clear errors for what method `m` does not take or misses (before anything is loaded)."""
    if m.guide == 'network' and guide is None:
        raise ValueError(f'method {m.name!r} needs a {guide_name} network')
    if m.guide in ('self', 'none') and guide is not None:
        raise ValueError(f'method {m.name!r} ' + ('guides with the main network itself; give no '
                         f'{guide_name}' if m.guide == 'self' else f'takes no {guide_name}'))
    if strength is not None and m.strength is None:
        raise ValueError(f'method {m.name!r} has no strength')
    if strength is None and m.strength is not None and m.default is None:
        raise ValueError(f'method {m.name!r} needs its strength: {m.strength}')
    if blocks is not None and not m.blocks:
        raise ValueError(f'method {m.name!r} takes no block selection')
    if window is not None and not m.window:
        raise ValueError(f'method {m.name!r} takes no window')


BLOCKS_HELP = ('Blocks a perturbation acts on: all | encoder | decoder | bottleneck | a level RxR (e.g. 8x8) or '
               'one side of it (enc.8x8, dec.8x8) | block names (dec.8x8_block0 or dec_8x8_block0); a comma '
               'list of any of these.')


def help_text() -> str:
    """One line per method (for --method's help)."""
    return '\n'.join(REGISTRY[n].help() for n in NAMES)


# ---------------------------------------------------------------------------------------------------
# Cost: network evaluations per image.

def guide_cost(t: G.Term, config) -> float:
    """Network evaluations of a term's guide per guided evaluation, in full-image units: 1 for a
    guide pass, k for the mean of k (`Term.average`); for sliding windows the crops' total area over
    the image's."""
    for p in t.perturbations:
        if p.kind == 'window':
            size, stride = P.window_geometry(config, p.size, p.stride)
            crops = len(P.window_starts(config.img_resolution, size, stride)) ** 2
            return crops * (size / config.img_resolution) ** 2
    return float(t.average)


def evaluation_points(num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """(step, σ) of the Heun sampler's 2N − 1 denoiser evaluations, in float32 as the sampler runs
    them: the Euler evaluation of step i at t_i, its correction at t_{i+1} (no churn)."""
    from edm2_jax.sampling import sigma_steps
    t = np.asarray(sigma_steps(num_steps, sigma_min, sigma_max, rho), np.float32)
    return [(i, t[i]) for i in range(num_steps)] + [(i, t[i + 1]) for i in range(num_steps - 1)]


def _inside(interval, step, sigma) -> bool:
    if interval is None:
        return True
    if isinstance(interval, G.Interval):
        lo, hi, by_step = np.asarray(interval.lo), np.asarray(interval.hi), interval.by_step
    else:  # a (lo, hi) σ pair
        (lo, hi), by_step = interval, False
    if by_step:
        return bool(lo <= step <= hi)
    return bool(np.float32(lo) < sigma <= np.float32(hi))


def evaluation_counts(terms: Sequence[G.Term], num_steps: int, interval=None, sigma_min=0.002,
                      sigma_max=80.0, rho=7.0) -> tuple[int, list[int]]:
    """(the sampler's 2N − 1 evaluations, per term the evaluations inside both the sampler's interval
    and the term's own, where its guide runs)."""
    points = evaluation_points(num_steps, sigma_min, sigma_max, rho)
    return len(points), [sum(_inside(interval, i, s) and _inside(t.interval, i, s) for i, s in points)
                         for t in terms]


def nfe_per_image(terms: Sequence[G.Term], config, num_steps: int, interval=None, sigma_min=0.002,
                  sigma_max=80.0, rho=7.0) -> float:
    """Network evaluations per image: the 2N − 1 main evaluations plus, for every term, its guide's
    cost at each evaluation where it is guided (`evaluation_counts`). A prefix-shared guide counts as
    a full evaluation (its saving shows in FLOPs and time, not here)."""
    total, guided = evaluation_counts(terms, num_steps, interval, sigma_min, sigma_max, rho)
    return float(total) + sum(guide_cost(t, config) * n for t, n in zip(terms, guided))


def needs_guide(name: str) -> bool:
    return get(name).guide == 'network'


def takes_guide(name: str) -> bool:
    return get(name).guide in ('network', 'optional')


def describe(name: str) -> dict[str, Any]:
    """The registry entry as plain values (for summaries and the docs' method table)."""
    m = get(name)
    return {'name': m.name, 'summary': m.summary, 'paper': m.paper, 'guide': m.guide,
            'strength': m.strength, 'default': m.default, 'blocks': m.blocks,
            'options': {name: default for name, default, _ in m.options}}

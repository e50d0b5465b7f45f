"""Guidance methods on the toy models, expressed with `edm2_jax.guidance` and sampled with
`edm2_jax.sampling` (toy2d-spec §3, §9).

A `Method` is a list of `guidance.Term`s, D = D_main + Σ_i w_i (D_main − D_guide_i), made by the
registry `edm2_jax.methods` exactly as for EDM2 networks; a term's guide is None for the main model
itself (self-guidance) or another model's id such as 'ag', 'cfg' or a history guide of the main run
(`history_model`), and its `edm2_jax.perturb` perturbations (the MLP's kinds: dropout of hidden
activations with a fresh key per sample and evaluation, skip of hidden layers, sigma_shift; see
`toy.model`) have numbers or σ-Schedules as strengths. Numbers are traced, so a (w, p) or (w, δ) grid compiles once per shape.

The study's rows are made here too: one maker per family (`cfg`, `ag`, `insitu`, …), whose name carries
its settings, and the lists each mode of experiments/toy2d runs (`default_methods`, `quick_methods`,
`full_methods`, `sweep_methods`, `trained_dropout_methods`).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import guidance as G
from edm2_jax import methods as registry
from edm2_jax import rules as R
from edm2_jax.denoiser import check_draws
from edm2_jax import sampling
from edm2_jax import train_state
from edm2_jax.network import Network
from edm2_jax.toy import fractal as mixture_lib
from edm2_jax.toy import model as model_lib

NUM_STEPS, SIGMA_MIN, SIGMA_MAX, RHO = 32, 0.002, 5.0, 7.0


class Method(NamedTuple):
    name: str
    terms: tuple[G.Term, ...] = ()
    interval: tuple[float, float] | None = None   # guide only for σ ∈ (lo, hi]


class Model(NamedTuple):
    params: Any
    config: model_lib.ToyConfig


def history_model(snapshots, config: model_lib.ToyConfig, sigma_rel: float, t: int | None = None) -> Model:
    """The run's post-hoc EMA at `sigma_rel` and snapshot time t (examples seen; default the last) from
    its `toy.train.Snapshot`s: EDM2's reconstruction (`train_state.reconstruct_phema`) on the toy's
    parameters. At a tracked σ_rel and an early t it is the snapshot itself (an early-snapshot guide)."""
    refs = [train_state.Snapshot(s.t, s.sigma_rel, i) for i, s in enumerate(snapshots)]
    nets = train_state.reconstruct_phema('the toy run', [sigma_rel], t, snapshots=refs, load=lambda i: Network(
        config, {'params': jax.tree.map(np.asarray, snapshots[i].params), 'buffers': {}}))
    return Model(jax.tree.map(jnp.asarray, nets[float(sigma_rel)].variables['params']), config)


def _model_denoiser(config, params, perturbation=(), draws=None, sample_keys=None, index=0):
    """D of a model under `perturbation`; draws: the term's (frozen, average, antithetic) of
    `guidance.Term` (index: the term's, for its frozen stream)."""
    def once(x, sigma, keys, offset=None):
        kwargs = {}
        if perturbation:
            if any(p.kind == 'dropout' for p in perturbation):
                kwargs['keys'] = keys
            kwargs['perturbation'] = tuple(
                p.replace(strength=G.value_at(p.strength, sigma, jnp.float32),
                          offset=offset if p.kind == 'dropout' else None) for p in perturbation)
        return model_lib.denoise(params, config, x, sigma, **kwargs)

    def denoise(x, sigma, step, keys):
        if draws is None:
            return once(x, sigma, keys)
        t = G.Term(0.0, frozen=draws[0], average=draws[1], antithetic=draws[2])
        if t.frozen is not None:
            keys = G.guide_keys(t, index, keys, sample_keys, sigma)
        return G.averaged(lambda k, offset: once(x, sigma, k, offset), t, keys)
    return denoise


def _guided_denoiser(configs, params, weights, perturbations, interval, rules, draws=(), sample_keys=None):
    """configs/params: main first, then one per term; perturbations, rules and draws one per term."""
    main = _model_denoiser(configs[0], params[0])
    guides = [_model_denoiser(c, p, q, d, sample_keys, i)
              for i, (c, p, q, d) in enumerate(zip(configs[1:], params[1:], perturbations, draws or
                                                   (None,) * len(perturbations)))]
    if not guides:
        return main
    return G.guide_with(main, guides, list(weights), interval, rules=rules)


@functools.partial(jax.jit, static_argnames=('configs', 'draws', 'path'))
def _run(params, noise, keys, weights, perturbations, interval, rules, t_steps, *, configs, draws, path):
    denoise = _guided_denoiser(configs, params, weights, perturbations, interval, rules, draws, keys)
    return sampling.heun_loop(denoise, noise, keys, t_steps, return_trajectory=path)


@functools.partial(jax.jit, static_argnames='path')
def _run_exact(noise, t_steps, *, path):
    mix = mixture_lib.mixture('A')
    keys = jax.random.split(jax.random.key(0), noise.shape[0])  # unused: the exact ODE is deterministic
    return sampling.heun_loop(lambda x, s, step, k: mixture_lib.denoise(mix, x, s), noise, keys, t_steps,
                              return_trajectory=path)


def check_method(method: Method, models: dict[str, Model]):
    """Clear errors before any compilation."""
    for t in method.terms:
        if t.guide is not None and t.guide not in models:
            raise ValueError(f'{method.name}: unknown guide model {t.guide!r} (have {sorted(models)})')
        if t.guide is None and not t.perturbations:
            raise ValueError(f'{method.name}: the main model as its own guide needs a perturbation '
                             '(e.g. dropout)')
        perturbations = model_lib.resolve_perturbation(_model(models, t).config, t.perturbation)
        check_draws(t, perturbations, method.name)
    if method.interval is not None and not 0 <= method.interval[0] < method.interval[1]:
        raise ValueError(f'{method.name}: interval needs 0 <= lo < hi, got {method.interval}')


def _model(models, t):
    return models['main' if t.guide is None else t.guide]


def _inputs(method: Method, models: dict[str, Model]):
    check_method(method, models)
    chosen = [models['main']] + [_model(models, t) for t in method.terms]
    configs = tuple(m.config for m in chosen)
    params = tuple(m.params for m in chosen)
    weights = tuple(G.cast_value(t.weight, jnp.float32) for t in method.terms)
    perturbations = tuple(tuple(p.replace(strength=G.cast_value(p.strength, jnp.float32))
                                for p in model_lib.resolve_perturbation(c, t.perturbation))
                          for c, t in zip(configs[1:], method.terms))
    interval = None if method.interval is None else G.Interval.sigmas(*method.interval)
    rules = tuple(R.prepared(t.rule, jnp.float32, f'{method.name}: rule') for t in method.terms)
    draws = tuple((t.frozen, t.average, t.antithetic) for t in method.terms)
    return configs, params, weights, perturbations, interval, rules, draws


def time_steps(sigma_max: float = SIGMA_MAX, num_steps: int = NUM_STEPS):
    return sampling.sigma_steps(num_steps, SIGMA_MIN, sigma_max, RHO)


def start_points(key, n: int, sigma_max: float = SIGMA_MAX):
    """Common start points: exact draws from p_A(·; σ_max) (as the paper's toy), and per-sample sampler
    keys. Returned as (noise = x_0 / σ_max, keys) for `heun_loop`, which starts at noise · σ_max."""
    kx, kk = jax.random.split(key)
    x0 = mixture_lib.draw(mixture_lib.mixture('A'), kx, n, sigma_max)
    return x0 / sigma_max, jax.random.split(kk, n)


def sample(method: Method, models: dict[str, Model], noise, keys, t_steps=None, *, trajectory: bool = False):
    """Final samples [N, 2] of `method` (the main model is models['main']; 'exact_ode' uses the exact
    score); with trajectory=True the whole path x_0 … x_S [S+1, N, 2]."""
    t_steps = time_steps() if t_steps is None else t_steps
    if method.name == 'exact_ode':
        return _run_exact(noise, t_steps, path=trajectory)
    configs, params, weights, perturbations, interval, rules, draws = _inputs(method, models)
    return _run(params, noise, keys, weights, perturbations, interval, rules, t_steps, configs=configs,
                draws=draws, path=trajectory)


# ---------------------------------------------------------------------------------------------------
# The study's rows (experiments/toy2d).

INSITU_P_SCHEDULE = G.Schedule.linear([0.05, 1.0], [0.02, 0.1])  # declared before running
TRAINED_DROPOUT = 'trained-dropout'   # prefix of the rows sampled with the main model trained with dropout

# The main run's history guides: name → (time as a fraction of the run, σ_rel; None: the main model's).
# The early snapshots are the main model's EMA as it was then; σ_rel 0.002 is the short tracked profile
# itself, 0.005 a post-hoc reconstruction from both profiles.
HISTORY = {'history-early t=1/8': (1 / 8, None), 'history-early t=1/4': (1 / 4, None),
           'history-ema σ_rel=0.005': (1.0, 0.005), 'history-ema σ_rel=0.002': (1.0, 0.002)}

SKIP_LAYERS = (1, 2, 3)          # the hidden layers of the default 4-layer MLP
SHIFT_DELTAS = (0.1, 0.25, 0.5)
SWEEP_P = (0.01, 0.02, 0.05, 0.1, 0.2)   # the in-situ (p, w) grid of sweep.png
SWEEP_W = (0.25, 0.5, 1.0, 2.0, 3.0)


def cfg(w, interval=None):
    """CFG with the unconditional 'cfg' model (trained on classes A and B) as the guide, optionally
    only for σ in `interval`."""
    name = f'cfg w={w:g}' if interval is None else f'cfg-interval w={w:g} ({interval[0]:g},{interval[1]:g}]'
    return Method(name, registry.terms('cfg', w, guide='cfg'), interval)


def cfg_rule(w, name, rule):
    """CFG on the cfg model under a rule (edm2_jax.rules), e.g. CFG rescale or CFG-Zero*."""
    return Method(f'{name} w={w:g}', registry.terms('cfg', w, guide='cfg', rule=rule))


def ag(w):
    """Autoguidance with the smaller, shorter-trained 'ag' model of class A as the guide."""
    return Method(f'autoguidance w={w:g}', registry.terms('autoguidance', w, guide='ag'))


def insitu(w, p, prefix='in-situ'):
    """In-situ guidance: the main model with dropout at rate p as its own guide."""
    return Method(f'{prefix} p={p:g} w={w:g}', registry.terms('insitu', w, p))


def insitu_frozen(w, p):
    """In-situ with one dropout mask per sample, kept along the whole trajectory."""
    return Method(f'in-situ-frozen p={p:g} w={w:g}', registry.terms('insitu-frozen', w, p))


def insitu_avg(w, p, k, antithetic=False):
    """The mean of k dropout passes as the guide; the name carries its cost, (1 + k) evaluations."""
    name = f'in-situ-avg{"-anti" if antithetic else ""} k={k} p={p:g} w={w:g} (cost {1 + k}x)'
    return Method(name, registry.terms('insitu-avg', w, p, k=k, antithetic=antithetic))


def hybrid(w, p, guide):
    """The guide model with dropout at rate p as the guide."""
    return Method(f'hybrid-{guide} p={p:g} w={w:g}', registry.terms('hybrid', w, p, guide=guide))


def two_term(wc, wd, p, guide):
    """The guide model (weight wc) plus in-situ (weight wd, rate p)."""
    name = 'cfg' if guide == 'cfg' else 'autoguidance'
    return Method(f'{guide}+in-situ wc={wc:g} wd={wd:g} p={p:g}',
                  registry.terms(name, wc, guide=guide) + registry.terms('insitu', wd, p))


def insitu_schedule(w):
    """In-situ with the dropout rate following `INSITU_P_SCHEDULE` over σ."""
    return Method(f'in-situ-sched w={w:g} p=0.02..0.1', registry.terms('insitu', w, INSITU_P_SCHEDULE))


def skip_layer(w, layer):
    """Skip-layer guidance: the main model with hidden layer `layer` passing its input on (toy.model)."""
    return Method(f'skip-layer l={layer} w={w:g}', registry.terms('slg', w, blocks=(layer,)))


def sigma_shift(w, delta):
    """Self-guidance at a noisier level: the main model evaluated at σ·(1 + δ) as the guide."""
    return Method(f'sigma-shift δ={delta:g} w={w:g}', registry.terms('sigma-shift', w, delta))


def history(w, guide):
    """Self-guidance from the training history: the guide is one of `HISTORY`, made from the main run."""
    return Method(f'{guide} w={w:g}', registry.terms('history', w, guide=guide))


def default_methods():
    """Each method's figure operating point plus a small grid (one training seed): the self-guidance
    rows (in-situ, skip-layer, sigma-shift) each on a 3 strengths × w ∈ {1, 2} grid."""
    return ([Method('none'), cfg(1.0), cfg(3.0), cfg(3.0, (0.28, 2.9)), ag(1.0), ag(2.0)]
            + [insitu(w, p) for p in (0.02, 0.05, 0.1) for w in (1.0, 2.0)]
            + [skip_layer(w, i) for i in SKIP_LAYERS for w in (1.0, 2.0)]
            + [sigma_shift(w, d) for d in SHIFT_DELTAS for w in (1.0, 2.0)]
            + [insitu_frozen(w, p) for p in (0.05, 0.1) for w in (1.0, 2.0)]
            + [insitu_avg(2.0, p, k) for p in (0.05, 0.1) for k in (2, 4)] + [insitu_avg(2.0, 0.05, 2, True)]
            + [history(w, g) for g in HISTORY for w in (1.0, 2.0)]
            + [hybrid(2.0, 0.05, 'ag'), two_term(1.0, 1.0, 0.05, 'ag'), insitu_schedule(2.0)]
            + [cfg_rule(3.0, 'cfg-rescale φ=0.7', R.Rescale(0.7)),
               cfg_rule(3.0, 'cfg-zero* zero-init 1', R.ZeroStar(zero_init_steps=1))])


def quick_methods():
    """One row per family for the tiny --quick models (tests / CI)."""
    return [Method('none'), cfg(3.0), ag(2.0), insitu(2.0, 0.05), insitu(2.0, 0.1), skip_layer(2.0, 2),
            sigma_shift(2.0, 0.25), insitu_frozen(2.0, 0.05), insitu_avg(2.0, 0.05, 2)]


def full_methods():
    """Spec §9 grids."""
    ws = (0.25, 0.5, 1.0, 2.0, 3.0)
    out = [Method('none')] + [cfg(w) for w in ws] + [ag(w) for w in ws]
    out += [cfg(w, iv) for w in (1.0, 2.0, 3.0) for iv in ((0.0, 1.0), (0.05, 1.0), (0.28, 2.9))]
    out += [insitu(w, p) for p in (0.01, 0.02, 0.05, 0.1) for w in (0.25, 0.5, 1.0, 2.0)]
    for guide in ('cfg', 'ag'):
        for p in (0.02, 0.05):
            out += [two_term(wc, wd, p, guide) for wc in (0.25, 0.5, 1.0) for wd in (0.25, 0.5, 1.0)]
            out += [hybrid(w, p, guide) for w in (1.0, 2.0)]
    out += [insitu_schedule(w) for w in (1.0, 2.0)]
    out += [insitu_frozen(w, p) for p in (0.02, 0.05, 0.1) for w in (0.5, 1.0, 2.0)]
    out += [insitu_avg(w, p, k, anti) for k in (2, 4) for anti in (False, True) for p in (0.05, 0.1)
            for w in (1.0, 2.0)]
    out += [skip_layer(w, i) for i in SKIP_LAYERS for w in (0.25, 0.5, 1.0, 2.0)]
    out += [sigma_shift(w, d) for d in (0.05,) + SHIFT_DELTAS + (1.0,) for w in (0.25, 0.5, 1.0, 2.0)]
    out += [history(w, g) for g in HISTORY for w in (0.5, 1.0, 2.0)]
    return out


def sweep_methods():
    """The in-situ rows of the (p, w) grid `SWEEP_P` × `SWEEP_W` (sweep.png)."""
    return [insitu(w, p) for p in SWEEP_P for w in SWEEP_W]


def trained_dropout_methods(rate):
    """No guidance and in-situ at the training rate, sampled with the main model trained with dropout."""
    return [Method(f'{TRAINED_DROPOUT} none', ())] + [
        insitu(w, rate, f'{TRAINED_DROPOUT} in-situ') for w in (1.0, 2.0)]

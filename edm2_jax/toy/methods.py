"""Guidance methods on the toy models, expressed with `edm2_jax.guidance` and sampled with
`edm2_jax.sampling` (toy2d-spec §3, §9).

A `Method` is a list of `guidance.Term`s, D = D_main + Σ_i w_i (D_main − D_guide_i), made by the
registry `edm2_jax.methods` exactly as for EDM2 networks; a term's guide is None for the main model
itself (self-guidance) or another model's id such as 'ag', 'cfg' or a history guide of the main run
(`history_model`), and its `edm2_jax.perturb` perturbations (the MLP's kinds: dropout of hidden
activations with a fresh key per sample and evaluation, skip of hidden layers, sigma_shift; see
`toy.model`) have numbers or σ-Schedules as strengths. Numbers are traced, so a (w, p) or (w, δ) grid compiles once per shape.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import guidance as G
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

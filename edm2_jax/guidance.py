"""Guidance as composition of denoisers: D = D_main + Σ_i w_i(σ)·(D_main − D_guide_i).

A denoiser is any function `denoise(x, sigma, step, keys) -> D` (x [N, ...], sigma a 0-d array, step
the sampler's int step index, keys a typed key array [N], fresh per sample and per evaluation); the
sampler (`sampling.py`) sees nothing else. EDM2's `guidance` g is this module's 1 + w: its
`D_guide + g·(D_main − D_guide)` equals `D_main + (g − 1)·(D_main − D_guide)`.

This module is generic (any denoisers, e.g. the 2-D toy's MLPs): σ-schedules for w and p, the
guidance interval, `guided`, which evaluates the guides only inside the interval and each term's
guide only inside that term's own interval (`lax.cond`, so the saved evaluations are real), and the
guidance `Term`. `edm2_jax.denoiser` builds the EDM2 denoiser from `Network`s and terms (fused
passes); `edm2_jax.methods` is the registry of named methods that make terms.

All numbers (w, p, interval bounds, schedule values) are pytree leaves, so they are traced under
`jax.jit`; the method, the perturbed blocks and the fusion mode are static.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import rules as rules_lib

Denoiser = Callable[..., jax.Array]


def fold_keys(keys, data):
    """fold_in(keys[i], data) for every example: a new, independent stream per example."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


FROZEN = 1 << 30  # fold-in tag of the frozen streams (above any step index)


def guide_keys(t, i: int, keys, sample_keys, sigma):
    """The keys of term i's guide at one evaluation: fold_in(keys, i), fresh per evaluation; with
    t.frozen, fold_in(fold_in(sample_keys, FROZEN + band), i) with band the index of σ among the
    edges: the same at every evaluation of a sample within a band."""
    if t.frozen is None:
        return fold_keys(keys, i)
    if sample_keys is None:
        raise ValueError('a frozen guide needs the per-sample keys (sample_keys=) of the sampler')
    band = jnp.searchsorted(jnp.asarray(t.frozen, sigma.dtype), sigma) if t.frozen else 0
    return fold_keys(fold_keys(sample_keys, FROZEN + band), i)


def copy_keys(t, keys, j: int):
    """Keys of draw j of an averaged guide: draw 0 has the guide's own keys (so average = 1 is the
    plain guide), draw j ≥ 1 fold_in(keys, j) — or, antithetic, the shared keys."""
    return keys if j == 0 or t.antithetic else fold_keys(keys, j)


def copy_offset(t, j: int):
    """The dropout offset of draw j (None: unshifted)."""
    return j / t.average if t.antithetic and j else None


def averaged(draw: Callable, t, keys):
    """The mean of draw(keys_j, offset_j) over the term's draws (draw 0 alone when average = 1)."""
    outs = [draw(copy_keys(t, keys, j), copy_offset(t, j)) for j in range(t.average)]
    return outs[0] if len(outs) == 1 else functools.reduce(jnp.add, outs) / len(outs)


# ---------------------------------------------------------------------------------------------------
# Values that depend on σ.

@flax.struct.dataclass
class Schedule:
    """A value as a function of σ, piecewise in log σ (the paper's "adaptive scheduling").

    kind 'linear': `values[k]` at `sigmas[k]` (increasing), linear in log σ in between, constant
    beyond the ends. kind 'constant': `sigmas` are K increasing edges and `values` K + 1 levels;
    level k holds on (edges[k−1], edges[k]] (level 0 below edges[0], level K above edges[K−1]).
    """
    sigmas: jax.Array
    values: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default='linear')

    @classmethod
    def linear(cls, sigmas, values) -> Schedule:
        sigmas, values = _check_knots(sigmas, values, 0)
        return cls(sigmas, values, 'linear')

    @classmethod
    def constant(cls, edges, values) -> Schedule:
        edges, values = _check_knots(edges, values, 1)
        return cls(edges, values, 'constant')

    def __call__(self, sigma):
        sigma = jnp.asarray(sigma)
        if self.kind == 'linear':
            dtype = jnp.result_type(sigma.dtype, jnp.float32)
            return jnp.interp(jnp.log(sigma.astype(dtype)), jnp.log(self.sigmas.astype(dtype)),
                              self.values.astype(dtype))
        return self.values[jnp.searchsorted(self.sigmas.astype(sigma.dtype), sigma, side='left')]

    def map(self, fn) -> Schedule:
        """The same schedule with fn applied to its values (e.g. g → w = g − 1, or a dtype cast)."""
        return self.replace(values=fn(self.values))


def _check_knots(sigmas, values, extra):
    s, v = np.asarray(sigmas, np.float64), np.asarray(values, np.float64)
    if s.ndim != 1 or v.ndim != 1 or len(v) != len(s) + extra or len(s) < 1:
        raise ValueError(f'a schedule needs 1-D σ knots and {"one more value" if extra else "as many values"}'
                         f' than knots, got shapes {s.shape} and {v.shape}')
    if not (np.all(s > 0) and np.all(np.diff(s) > 0)):
        raise ValueError(f'schedule σ knots must be positive and increasing, got {s}')
    return jnp.asarray(s), jnp.asarray(v)  # float64 where 64-bit JAX is on, else float32


def value_at(value, sigma, dtype):
    """A number, array or Schedule evaluated at σ, as a 0-d array of `dtype`."""
    v = value(sigma) if isinstance(value, Schedule) else value
    return jnp.asarray(v).astype(dtype)


def cast_value(value, dtype):
    """Numbers and schedule values as arrays of a fixed dtype (stable jit cache keys)."""
    if isinstance(value, Schedule):
        return value.map(lambda v: jnp.asarray(v, dtype))
    return jnp.asarray(value, dtype)


def concrete_values(value) -> np.ndarray | None:
    """The numbers behind a value (all levels of a schedule), or None when they are traced."""
    v = value.values if isinstance(value, Schedule) else value
    try:
        return np.asarray(v, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# ---------------------------------------------------------------------------------------------------
# The guidance interval.

@flax.struct.dataclass
class Interval:
    """Where guidance applies: σ ∈ (lo, hi] of the evaluation (t̂ for the Euler evaluation, t_next for
    the Heun correction), or, with by_step, the sampler steps lo ≤ i ≤ hi (inclusive, both
    evaluations of a step, as in the guidance-interval paper's code)."""
    lo: jax.Array
    hi: jax.Array
    by_step: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def sigmas(cls, lo, hi, dtype=jnp.float32) -> Interval:
        if _is_concrete(lo, hi) and not 0 <= float(lo) < float(hi):
            raise ValueError(f'the guidance interval (σ_lo, σ_hi] needs 0 <= σ_lo < σ_hi, got ({lo}, {hi}]')
        return cls(jnp.asarray(lo, dtype), jnp.asarray(hi, dtype), False)

    @classmethod
    def steps(cls, start, stop, num_steps=None) -> Interval:
        if _is_concrete(start, stop):
            last = math.inf if num_steps is None else num_steps - 1
            if not 0 <= int(start) <= int(stop) <= last:
                raise ValueError(f'the guidance step interval [start, stop] needs 0 <= start <= stop <= '
                                 f'{last}, got [{start}, {stop}]')
        return cls(jnp.asarray(start, jnp.int32), jnp.asarray(stop, jnp.int32), True)

    @classmethod
    def fractions(cls, start, stop, num_steps: int) -> Interval:
        """diffusers' start/stop: active at steps int(start·N) <= i < int(stop·N) (N = num_steps; the
        products truncated as diffusers' guiders do; empty when they truncate to the same step)."""
        if _is_concrete(start, stop):
            if not 0 <= float(start) <= float(stop) <= 1:
                raise ValueError(f'guidance fractions [start, stop) need 0 <= start <= stop <= 1, got '
                                 f'[{start}, {stop})')
            first, end = int(float(start) * num_steps), int(float(stop) * num_steps)
        else:
            first, end = (jnp.floor(jnp.asarray(v, jnp.float32) * num_steps) for v in (start, stop))
        return cls(jnp.asarray(first, jnp.int32), jnp.asarray(end, jnp.int32) - 1, True)

    def __call__(self, sigma, step):
        if self.by_step:
            return (step >= self.lo) & (step <= self.hi)
        return (sigma > self.lo.astype(sigma.dtype)) & (sigma <= self.hi.astype(sigma.dtype))


def _is_concrete(*xs):
    return all(concrete_values(x) is not None for x in xs)


# ---------------------------------------------------------------------------------------------------
# Generic composition (any denoisers).

def guided(main: Denoiser, evaluate_all: Callable, weights: Sequence[Any],
           interval: Interval | None = None, *, intervals: Sequence[Any] | None = None,
           rules: Sequence[Any] | None = None, effective: Sequence[Any] | None = None) -> Denoiser:
    """D = D_main + Σ_i w_i(σ)·rule_i(D_main − D_i), with the guides evaluated only inside `interval`.

    main(x, σ, step, keys) → D_main is what runs where no term contributes; evaluate_all(x, σ, step,
    keys, active) → (D_main, [D_1, …]) runs elsewhere (it may fuse the passes). active: one entry per
    term, None (the term has no interval of its own) or a traced bool; evaluate_all should skip the
    work of inactive terms (`separately` and `denoiser.edm2_denoiser` do) — their D_i is ignored.
    weights: numbers, arrays or Schedules. intervals: per term, None or an `Interval` outside which
    that term contributes nothing. effective: per term, None or σ → bool, False where the term's
    guide is the main network itself (e.g. a dropout rate of 0). Where every term has weight 0 or is
    not effective, only `main` runs (`lax.cond`): the result is the unguided one, bit for bit.
    rules: per term, None (linear) or a rule of `edm2_jax.rules` (a rule's `finish`, if it has one,
    acts on the summed prediction at every evaluation); with any rule the denoiser is stateful: it carries `init_state(x)` and is called as denoise(x, σ, step, keys, state) →
    (D, state) (`heun_loop` does this).
    """
    k = len(weights)
    intervals = tuple(intervals or (None,) * k)
    rules = tuple(rules or (None,) * k)
    effective = tuple(effective or (None,) * k)
    stateful = any(r is not None for r in rules)

    def weights_at(sigma):
        """Every term's weight at this σ, computed once per evaluation."""
        return tuple(value_at(w, sigma, jnp.result_type(sigma)) for w in weights)

    def combined(x, sigma, step, keys, ws, state=None):
        active = tuple(None if iv is None else iv(sigma, step) for iv in intervals)
        d_main, d_guides = evaluate_all(x, sigma, step, keys, active)
        out, new_state = d_main, []
        for i, (w, d) in enumerate(zip(ws, d_guides, strict=True)):
            w = w.astype(d_main.dtype)
            if rules[i] is None:
                term = w * (d_main - d)
            else:
                term, running = rules[i](w, d_main, d, rules_lib.At(x, sigma, step), state[i])
            if active[i] is not None:
                term = jnp.where(active[i], term, jnp.zeros_like(term))
                if rules[i] is not None:
                    running = jnp.where(active[i], running, state[i])
            out = out + term
            new_state.append(running if rules[i] is not None else state[i] if stateful else None)
        return (out, tuple(new_state)) if stateful else out

    def contributes(ws, sigma, step):
        """Whether any term adds something at this evaluation (traced)."""
        live = [jnp.any(w != 0) if e is None else jnp.any(w != 0) & e(sigma) for w, e in zip(ws, effective)]
        on = functools.reduce(jnp.logical_or, live)
        return on if interval is None else on & interval(sigma, step)

    def denoise(x, sigma, step, keys):
        ws = weights_at(sigma)
        return jax.lax.cond(contributes(ws, sigma, step), combined, lambda *a: main(*a[:4]),
                            x, sigma, step, keys, ws)

    if not stateful:
        return denoise

    finishes = [r.finish for r in rules if hasattr(r, 'finish')]

    def denoise_with_state(x, sigma, step, keys, state):
        ws = weights_at(sigma)
        out, state = jax.lax.cond(contributes(ws, sigma, step), combined, lambda *a: (main(*a[:4]), a[5]),
                                  x, sigma, step, keys, ws, state)
        for finish in finishes:  # e.g. CFG-Zero*'s zero-init, at every evaluation
            out = finish(out, rules_lib.At(x, sigma, step))
        return out, state

    def init_state(x):
        return tuple(jnp.zeros_like(x) for _ in range(k))
    denoise_with_state.init_state = init_state
    return denoise_with_state


def gated(active, fn: Callable, *args):
    """fn(*args), run only where `active` (None: always); elsewhere zeros of its output's shape, and
    its work is skipped (`lax.cond`, the predicate traced)."""
    if active is None:
        return fn(*args)

    def zeros(*_):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
    return jax.lax.cond(active, fn, zeros, *args)


def separately(main: Denoiser, *guides: Denoiser) -> Callable:
    """evaluate_all for independent denoisers: main, then guide i with its own keys fold_in(keys, i),
    each guide run only while its term is active."""
    def evaluate_all(x, sigma, step, keys, active=None):
        active = active or (None,) * len(guides)
        return main(x, sigma, step, keys), [gated(a, g, x, sigma, step, fold_keys(keys, i))
                                             for i, (g, a) in enumerate(zip(guides, active, strict=True))]
    return evaluate_all


def guide_with(main: Denoiser, guides: Sequence[Denoiser], weights: Sequence[Any],
               interval: Interval | None = None, intervals: Sequence[Any] | None = None,
               rules: Sequence[Any] | None = None) -> Denoiser:
    """The guided denoiser of independent denoisers (e.g. the toy's main and guide MLPs); `intervals`
    and `rules`: one per term (None or an `Interval`; None or a rule), as in `guided`."""
    if len(guides) != len(weights):
        raise ValueError(f'{len(guides)} guides but {len(weights)} weights')
    return guided(main, separately(main, *guides), weights, interval, intervals=intervals, rules=rules)




# ---------------------------------------------------------------------------------------------------
# Guidance terms.

@flax.struct.dataclass
class Term:
    """One guidance term w·rule(D_main − D_guide); build them with `edm2_jax.methods`.

    guide: a separate network (the toy: a model id), or None for the main network itself (its
    parameters shared). null_label: the guide sees the all-zero label (CFG on a conditional network).
    perturbation: None or `perturb.Perturbation`(s) that degrade the guide (strength: number, array
    or Schedule of σ). interval: None or an `Interval` for this term alone. rule: None (linear) or a
    rule of `edm2_jax.rules`.

    How a random guide (dropout, token shuffle) draws its randomness (static, see `guide_keys`):
    frozen: None — fresh at every evaluation; a tuple of σ edges — drawn once per sample and kept
    for the whole trajectory (() ) or within each σ band between the edges, so the guide is one
    consistent perturbed network. average: the guide is the mean of this many draws. antithetic:
    the draws share one key, dropout copy j shifted by j/average (`perturb.dropout`'s offset).
    """
    weight: Any
    guide: Any = None
    null_label: bool = flax.struct.field(pytree_node=False, default=False)
    perturbation: Any = None
    interval: Any = None
    rule: Any = None
    frozen: Any = flax.struct.field(pytree_node=False, default=None)
    average: int = flax.struct.field(pytree_node=False, default=1)
    antithetic: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shared(self) -> bool:
        return self.guide is None

    @property
    def perturbations(self) -> tuple:
        p = self.perturbation
        return () if p is None else (p,) if not isinstance(p, (tuple, list)) else tuple(p)

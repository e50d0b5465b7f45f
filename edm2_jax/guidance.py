"""Guidance as composition of denoisers: D = D_main + Σ_i w_i(σ)·(D_main − D_guide_i).

A denoiser is any function `denoise(x, sigma, step, keys) -> D` (x [N, ...], sigma a 0-d array, step
the sampler's int step index, keys a typed key array [N], fresh per sample and per evaluation); the
sampler (`sampling.py`) sees nothing else. EDM2's `guidance` g is this module's 1 + w: its
`D_guide + g·(D_main − D_guide)` equals `D_main + (g − 1)·(D_main − D_guide)`.

The first half of the module is generic (any denoisers, e.g. the 2-D toy's MLPs): σ-schedules for w
and p, the guidance interval, and `guided`, which evaluates the guides only inside the interval, and
each term's guide only inside that term's own interval (`lax.cond`, so the saved evaluations are
real). The second half builds EDM2 denoisers from `Network`s: each guidance `Term` names its guide (a
separate network, or the main network itself with dropout p, a null label or any
`perturb.Perturbation`), its own interval and rule (linear or `APG`), and the terms that share the
main network's parameters are evaluated in one fused pass over the stacked batch [x; x; …] (with a
shared prefix via `Network.paired` / `Network.stacked`), specialised to the terms active at the step.

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

Denoiser = Callable[..., jax.Array]
FUSIONS = ('prefix', 'fused', 'unfused')


def fold_keys(keys, data):
    """fold_in(keys[i], data) for every example: a new, independent stream per example."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


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

    def __call__(self, sigma, step):
        if self.by_step:
            return (step >= self.lo) & (step <= self.hi)
        return (sigma > self.lo.astype(sigma.dtype)) & (sigma <= self.hi.astype(sigma.dtype))


def _is_concrete(*xs):
    return all(concrete_values(x) is not None for x in xs)


# ---------------------------------------------------------------------------------------------------
# Generic composition (any denoisers).

@flax.struct.dataclass
class APG:
    """Adaptive Projected Guidance (Sadat et al. 2025) for one term's update Δ = D_main − D_guide.

    Per example (over all pixels and channels): with momentum β the update becomes the running
    average Δ + β·Δ_prev (state carried across the sampler's evaluations, both Heun evaluations of a
    step count); with threshold r > 0 it is rescaled to norm ≤ r; then it is split into its parts
    parallel and orthogonal to D_main and the parallel part is scaled by η. The term adds w·Δ'.
    η = 1, r = 0 (no rescale), β = 0 is the linear rule. All three are traced.
    """
    eta: Any = 0.0
    threshold: Any = 0.0
    momentum: Any = 0.0

    def __call__(self, delta, d_main, running):
        axes = tuple(range(1, delta.ndim))
        dt = delta.dtype
        running = delta + jnp.asarray(self.momentum, dt) * running
        delta = running
        r = jnp.asarray(self.threshold, dt)
        norm = jnp.sqrt(jnp.sum(jnp.square(delta), axis=axes, keepdims=True))
        scale = jnp.where(r > 0, jnp.minimum(1, r / jnp.maximum(norm, jnp.finfo(dt).tiny)), 1)
        delta = delta * scale
        unit = d_main / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(d_main), axis=axes, keepdims=True)),
                                    jnp.finfo(dt).tiny)
        parallel = jnp.sum(delta * unit, axis=axes, keepdims=True) * unit
        return (delta - parallel) + jnp.asarray(self.eta, dt) * parallel, running


def guided(main: Denoiser, evaluate_all: Callable, weights: Sequence[Any],
           interval: Interval | None = None, *, intervals: Sequence[Any] | None = None,
           rules: Sequence[Any] | None = None) -> Denoiser:
    """D = D_main + Σ_i w_i(σ)·rule_i(D_main − D_i), with the guides evaluated only inside `interval`.

    main(x, σ, step, keys) → D_main is what runs outside the interval; evaluate_all(x, σ, step, keys,
    active) → (D_main, [D_1, …]) runs inside it (it may fuse the passes). active: one entry per term,
    None (the term has no interval of its own) or a traced bool; evaluate_all should skip the work of
    inactive terms (`separately` and `edm2_denoiser` do) — their D_i is ignored. weights: numbers,
    arrays or Schedules. intervals: per term, None or an `Interval` outside which that term
    contributes nothing. rules: per term, None (linear) or an `APG`; with any APG the denoiser is
    stateful: it carries `init_state(x)` and is called as denoise(x, σ, step, keys, state) →
    (D, state) (`heun_loop` does this).
    """
    k = len(weights)
    intervals = tuple(intervals or (None,) * k)
    rules = tuple(rules or (None,) * k)
    stateful = any(r is not None for r in rules)

    def combined(x, sigma, step, keys, state=None):
        active = tuple(None if iv is None else iv(sigma, step) for iv in intervals)
        d_main, d_guides = evaluate_all(x, sigma, step, keys, active)
        out, new_state = d_main, []
        for i, (w, d) in enumerate(zip(weights, d_guides, strict=True)):
            delta = d_main - d
            if rules[i] is not None:
                delta, running = rules[i](delta, d_main, state[i])
            term = value_at(w, sigma, d_main.dtype) * delta
            if active[i] is not None:
                term = jnp.where(active[i], term, jnp.zeros_like(term))
                if rules[i] is not None:
                    running = jnp.where(active[i], running, state[i])
            out = out + term
            new_state.append(running if rules[i] is not None else state[i] if stateful else None)
        return (out, tuple(new_state)) if stateful else out

    if not stateful:
        if interval is None:
            return combined

        def denoise(x, sigma, step, keys):
            return jax.lax.cond(interval(sigma, step), combined, main, x, sigma, step, keys)
        return denoise

    def denoise_with_state(x, sigma, step, keys, state):
        if interval is None:
            return combined(x, sigma, step, keys, state)
        return jax.lax.cond(interval(sigma, step), combined, lambda *a: (main(*a[:4]), a[4]),
                            x, sigma, step, keys, state)

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
               interval: Interval | None = None, intervals: Sequence[Any] | None = None) -> Denoiser:
    """The guided denoiser of independent denoisers (e.g. the toy's main and guide MLPs); `intervals`:
    one per term (None or an `Interval`), outside which that guide is not run."""
    if len(guides) != len(weights):
        raise ValueError(f'{len(guides)} guides but {len(weights)} weights')
    return guided(main, separately(main, *guides), weights, interval, intervals=intervals)


# ---------------------------------------------------------------------------------------------------
# EDM2 networks: guidance terms and their (fused) evaluation.

@flax.struct.dataclass
class Term:
    """One guidance term w·(D_main − D_guide).

    guide: a separate network, or None for the main network itself (shares its parameters).
    dropout_rate: None (no dropout) or p (number or Schedule), applied in the blocks `perturb`
    (None/'all', 'encoder', 'decoder', or block names) with a fresh key per sample and evaluation.
    null_label: the guide sees the all-zero label (CFG on a conditional network).
    perturbation: None or `perturb.Perturbation`(s) applied to the guide (strength: number, array or
    Schedule of σ). interval: None or an `Interval` for this term alone. rule: None (linear) or `APG`.
    """
    weight: Any
    dropout_rate: Any = None
    guide: Any = None
    null_label: bool = flax.struct.field(pytree_node=False, default=False)
    perturb: Any = flax.struct.field(pytree_node=False, default=None)
    perturbation: Any = None
    interval: Any = None
    rule: Any = None

    @property
    def shared(self) -> bool:
        return self.guide is None


def insitu(w, p, perturb=None) -> Term:
    """In-situ autoguidance: the main network with dropout p as its own guide."""
    return Term(w, p, None, False, perturb)


def autoguidance(guide, w) -> Term:
    """Autoguidance (Karras et al. 2024): a weaker network of the same conditioning as guide."""
    return Term(w, None, guide)


def cfg(w, guide=None) -> Term:
    """Classifier-free guidance: an unconditional guide network, or the main network with the null label."""
    return Term(w, None, guide, guide is None)


def hybrid(guide, w, p, perturb=None) -> Term:
    """A separate guide network with dropout p in `perturb`."""
    return Term(w, p, guide, False, perturb)


def perturbed(w, perturbation, guide=None, interval=None, rule=None) -> Term:
    """A guide that is the main network (or `guide`) under `perturbation` (see `edm2_jax.perturb`)."""
    return Term(w, None, guide, False, None, perturbation, interval, rule)


def pag(w, where=None) -> Term:
    """Perturbed-Attention Guidance (Ahn et al. 2024): identity attention maps in `where`."""
    from edm2_jax import perturb as P
    return perturbed(w, P.attention_identity(where))


def slg(w, where) -> Term:
    """Skip-layer guidance (SLG / STG-R): the blocks `where` pass only their skip path."""
    from edm2_jax import perturb as P
    return perturbed(w, P.skip(where))


def seg(w, blur_sigma, where=None) -> Term:
    """Smoothed Energy Guidance (Hong 2024): queries blurred with std blur_sigma pixels."""
    from edm2_jax import perturb as P
    return perturbed(w, P.attention_blur(blur_sigma, where))


def tpg(w, where=None) -> Term:
    """Token Perturbation Guidance: the inputs of the blocks `where` have their positions shuffled."""
    from edm2_jax import perturb as P
    return perturbed(w, P.token_shuffle(where))


def swg(w, size=None, stride=None) -> Term:
    """Sliding-window guidance (M-SWG, Adaloglou et al. 2025): the guide sees only overlapping crops."""
    from edm2_jax import perturb as P
    return perturbed(w, P.window(size, stride))


def sigma_shift(w, delta) -> Term:
    """Self-guidance at a noisier level: the guide is the main network at σ·(1 + delta)."""
    from edm2_jax import perturb as P
    return perturbed(w, P.sigma_shift(delta))


def method_terms(method: str, w, guide=None, dropout_rate=0.0, perturb=None) -> tuple[Term, ...]:
    """The terms of a named method with guidance weight w (= EDM2's g − 1)."""
    if method == 'none':
        return ()
    makers = {'cfg': lambda: cfg(w, guide),
              'autoguidance': lambda: autoguidance(guide, w),
              'insitu': lambda: insitu(w, dropout_rate, perturb),
              'hybrid': lambda: hybrid(guide, w, dropout_rate, perturb)}
    if method not in makers:
        raise ValueError(f'unknown guidance method {method!r}; choose none, {", ".join(makers)}, '
                         'pag, slg, seg, tpg, sigma-shift, swg or sum')
    return (makers[method](),)


def prepare_terms(net, terms: Sequence[Term], dtype) -> tuple[Term, ...]:
    """Check every term against the main network before anything is compiled; fix dtypes.

    Guides must produce images of the main network's shape and use its label space (or none).
    Weights become arrays of the sampler dtype, rates float32; perturb becomes a frozenset of names.
    """
    from edm2_jax import perturb as P  # local: the generic half needs no network
    from edm2_jax.network import resolve_perturb
    cfg_main = net.config
    out = []
    for i, t in enumerate(terms):
        if not isinstance(t, Term):
            raise TypeError(f'guidance term {i} must be a guidance.Term, got {type(t).__name__}')
        if t.guide is not None:
            g = t.guide.config
            if (g.img_resolution, g.img_channels) != (cfg_main.img_resolution, cfg_main.img_channels):
                raise ValueError(f'guide of term {i} makes {g.img_resolution}x{g.img_resolution}x'
                                 f'{g.img_channels} images, the main network '
                                 f'{cfg_main.img_resolution}x{cfg_main.img_resolution}x{cfg_main.img_channels}')
            if g.label_dim not in (0, cfg_main.label_dim):
                raise ValueError(f'guide of term {i} has label_dim {g.label_dim}; the main network has '
                                 f'{cfg_main.label_dim} (a guide must use the same labels or none)')
        if t.null_label and cfg_main.label_dim == 0:
            raise ValueError('CFG with the null label needs a conditional main network (label_dim > 0); '
                             'give an unconditional guide network instead')
        if concrete_values(t.weight) is not None and not np.all(np.isfinite(concrete_values(t.weight))):
            raise ValueError(f'guidance weight of term {i} must be finite')
        rate = t.dropout_rate
        if rate is not None:
            values = concrete_values(rate)
            if values is not None and not np.all((values >= 0) & (values < 1)):
                raise ValueError(f'dropout rate p of term {i} must lie in [0, 1), got {values}')
            rate = cast_value(rate, jnp.float32)
        target = net if t.guide is None else t.guide
        perturb = resolve_perturb(target.config, t.perturb) if rate is not None else None
        perturbations = tuple(p.replace(strength=cast_value(p.strength, jnp.float32)) for p in
                              P.resolve(target.config, t.perturbation))
        for p in perturbations:
            P.check_values(p.kind, concrete_values(p.strength))
        if t.rule is not None and not isinstance(t.rule, APG):
            raise TypeError(f'rule of term {i} must be None (linear) or guidance.APG')
        if t.interval is not None and not isinstance(t.interval, Interval):
            raise TypeError(f'interval of term {i} must be a guidance.Interval')
        out.append(Term(cast_value(t.weight, dtype), rate, t.guide, t.null_label, perturb,
                        perturbations or None, t.interval,
                        None if t.rule is None else jax.tree.map(lambda v: jnp.asarray(v, dtype), t.rule)))
    shared_perturbs = {t.perturb for t in out if t.shared and t.dropout_rate is not None}
    if len(shared_perturbs) > 1:
        raise ValueError('in-situ terms on the main network must perturb the same blocks '
                         '(they are evaluated in one fused pass)')
    return tuple(out)


def _windowed(t) -> bool:
    return any(p.kind == 'window' for p in t.perturbation or ())


MAX_SWITCH_TERMS = 3  # shared terms with own intervals beyond which the fused pass is not specialised


def edm2_denoiser(net, class_labels, terms: Sequence[Term], *, interval: Interval | None = None,
                  fusion: str = 'prefix', dtype=jnp.float32) -> Denoiser:
    """The guided denoiser of an EDM2 `Network` (terms from `prepare_terms`).

    fusion: 'prefix' — a single in-situ term runs with the main pass via `Network.paired`, several
    guides on the main network via `Network.stacked`; the modules before the first perturbed one run
    once on N examples (not when a term uses the null label or sigma_shift: then as 'fused');
    'fused' — the main network and all terms that share its parameters in one pass over [x; x; …]
    (rates [0…, p…], each term's perturbation strengths on its own rows, labels [c…, c or ∅…]);
    'unfused' — one pass per term. Separate guide networks and window guides (another batch shape)
    always run their own pass. Networks compute in float32; D is cast to `dtype`.

    Per-term intervals skip real work: a pass of its own runs only while its term is active
    (`lax.cond`). The fused pass is specialised by `lax.switch` to the subset of active shared terms
    with intervals (m of them: 2^m variants of the pass in one program, so compile time grows
    ~2^m; the subset with none is the main pass alone). Beyond m = MAX_SWITCH_TERMS the fused pass
    has two variants: the terms without interval alone, or all shared terms while any is active.
    """
    if fusion not in FUSIONS:
        raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')
    terms = tuple(terms)
    shared = [i for i, t in enumerate(terms) if t.shared and not _windowed(t)]  # fused with the main pass
    f32 = jnp.float32

    def pairable(subset):
        return len(subset) == 1 and terms[subset[0]].dropout_rate is not None \
            and not terms[subset[0]].null_label and terms[subset[0]].perturbation is None

    def run(network, x, sigma, labels, rate=None, keys=None, perturb=None, perturbation=None):
        kwargs = {} if rate is None else dict(dropout_rate=rate, dropout_key=keys, perturb=perturb)
        if perturbation:
            kwargs['perturbation'] = perturbation
            kwargs['dropout_key'] = keys
        return network(x.astype(f32), sigma.astype(f32), labels, **kwargs).astype(dtype)

    def perturbations_at(t, sigma):
        """The term's perturbations with strengths evaluated at σ."""
        return tuple(p.replace(strength=value_at(p.strength, sigma, f32)) for p in t.perturbation or ())

    def labels_of(network, n, null=False):
        if network.config.label_dim == 0:
            return None
        if null or class_labels is None:
            return jnp.zeros((n, network.config.label_dim), f32)
        return class_labels

    def rate_of(t, sigma):
        return None if t.dropout_rate is None else value_at(t.dropout_rate, sigma, f32)

    def main(x, sigma, step, keys):
        return run(net, x, sigma, class_labels)

    def term_pass(i, x, sigma, keys):
        t = terms[i]
        network = net if t.shared else t.guide
        return run(network, x, sigma, labels_of(network, x.shape[0], t.null_label), rate_of(t, sigma),
                   keys, t.perturb, perturbations_at(t, sigma))

    def paired(i, x, sigma, keys):
        t = terms[i]
        pair = net.paired(x.astype(f32), sigma.astype(f32), class_labels, dropout_rate=rate_of(t, sigma),
                          dropout_key=keys, perturb=t.perturb, share_prefix=fusion == 'prefix')
        return [a.astype(dtype) for a in pair]

    def stacked(subset, x, sigma, keys_of):
        """[D_main, D_i for i in subset] from one pass over [x; x; …]."""
        n, k = x.shape[0], 1 + len(subset)
        labels = labels_of(net, n)
        if labels is not None:
            labels = jnp.concatenate([labels] + [labels_of(net, n, terms[i].null_label) for i in subset])
        rate = perturb = None
        keys = jnp.concatenate([keys_of[subset[0]]] + [keys_of[i] for i in subset])  # main rows: unused
        with_dropout = [i for i in subset if terms[i].dropout_rate is not None]
        if with_dropout:
            zeros = jnp.zeros((n,), f32)
            rate = jnp.concatenate([zeros] + [zeros if terms[i].dropout_rate is None else
                                              jnp.broadcast_to(rate_of(terms[i], sigma), (n,)) for i in subset])
            perturb = terms[with_dropout[0]].perturb
        perturbation = []  # each term's perturbations act on its own rows only (strength 0 elsewhere)
        for j, i in enumerate(subset):
            for p in perturbations_at(terms[i], sigma):
                rows = jnp.zeros((k, n), f32).at[1 + j].set(jnp.broadcast_to(p.strength, (n,)))
                perturbation.append(p.replace(strength=rows.reshape(-1)))
        if fusion == 'prefix' and not any(terms[i].null_label for i in subset):
            out = net.stacked(x.astype(f32), sigma.astype(f32), labels_of(net, n), copies=k,
                              dropout_rate=rate, dropout_key=keys, perturb=perturb,
                              perturbation=perturbation).astype(dtype)  # the unperturbed prefix on N rows
        else:
            out = run(net, jnp.concatenate([x] * k), sigma, labels, rate, keys, perturb, perturbation)
        return [out[j * n:(j + 1) * n] for j in range(k)]

    def fused(subset, x, sigma, step, keys_of):
        """D_main and D_i of every shared term (zeros for those not in `subset`), in one pass."""
        if not subset:
            outs = [main(x, sigma, step, None)]
        elif pairable(subset):
            outs = paired(subset[0], x, sigma, keys_of[subset[0]])
        else:
            outs = stacked(subset, x, sigma, keys_of)
        d = dict(zip(subset, outs[1:]))
        return outs[0], [d[i] if i in d else jnp.zeros_like(outs[0]) for i in shared]

    def fused_active(x, sigma, step, keys_of, active):
        """The fused pass over the active shared terms (see the docstring: switch, cap)."""
        always = [i for i in shared if active[i] is None]
        gated_terms = [i for i in shared if active[i] is not None]
        if not gated_terms:
            return fused(shared, x, sigma, step, keys_of)
        if len(gated_terms) <= MAX_SWITCH_TERMS:
            subsets = [sorted(always + [i for b, i in enumerate(gated_terms) if mask >> b & 1])
                       for mask in range(1 << len(gated_terms))]
            index = sum(active[i].astype(jnp.int32) << b for b, i in enumerate(gated_terms))
        else:
            subsets = [always, shared]
            index = functools.reduce(jnp.logical_or, [active[i] for i in gated_terms]).astype(jnp.int32)
        branches = [functools.partial(fused, s) for s in subsets]
        return jax.lax.switch(index, branches, x, sigma, step, keys_of)

    def evaluate_all(x, sigma, step, keys, active=None):
        active = active or (None,) * len(terms)
        keys_of = [fold_keys(keys, i) for i in range(len(terms))]  # term i's own stream
        d = [None] * len(terms)
        if fusion == 'unfused' or not shared:
            d_main = main(x, sigma, step, keys)
            for i in shared:
                d[i] = gated(active[i], functools.partial(term_pass, i), x, sigma, keys_of[i])
        else:
            d_main, rest = fused_active(x, sigma, step, keys_of, active)
            for i, di in zip(shared, rest):
                d[i] = di
        for i in range(len(terms)):
            if i not in shared:  # separate guide networks and window guides: their own pass each
                d[i] = gated(active[i], functools.partial(term_pass, i), x, sigma, keys_of[i])
        return d_main, d

    if not terms:
        return main
    return guided(main, evaluate_all, [t.weight for t in terms], interval,
                  intervals=[t.interval for t in terms], rules=[t.rule for t in terms])

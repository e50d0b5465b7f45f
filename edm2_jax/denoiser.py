"""The guided denoiser of an EDM2 `Network`: terms checked against the network, then evaluated with
the fewest passes (guidance.Term; the terms come from `edm2_jax.methods`).

The terms that share the main network's parameters (in-situ, CFG with the null label, every
perturbation of the family but sliding windows) run in one pass over the stacked batch [x; x; …],
each term's perturbation acting on its own rows; with fusion 'prefix' the modules before the first
perturbed one run once on N rows. Separate guide networks and window guides run their own pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import guidance as G
from edm2_jax import perturb as P
from edm2_jax import rules as R

FUSIONS = ('prefix', 'fused', 'unfused')
MAX_SWITCH_TERMS = 3  # shared terms with own intervals beyond which the fused pass is not specialised
F32 = jnp.float32


# ---------------------------------------------------------------------------------------------------
# Checks before anything is compiled.

def prepare_terms(net, terms: Sequence[G.Term], dtype) -> tuple[G.Term, ...]:
    """Check every term against the main network; fix dtypes.

    Guides must produce images of the main network's shape and use its label space (or none).
    Weights become arrays of the sampler dtype, strengths float32, block selections frozensets.
    """
    return tuple(_prepare(net, i, t, dtype) for i, t in enumerate(terms))


def check_terms(config, terms: Sequence[G.Term]) -> None:
    """The checks of `prepare_terms` against the main network's config alone, without computing
    anything (so a CLI can run them before JAX starts): guides' shapes and labels, block
    selections, strength ranges, windows, rules, intervals."""
    for i, t in enumerate(terms):
        _check(config, i, t)


def _check(main, i, t):
    """ValueError/TypeError for a term that cannot apply to a main network of config `main`."""
    if not isinstance(t, G.Term):
        raise TypeError(f'guidance term {i} must be a guidance.Term, got {type(t).__name__}')
    if t.guide is not None:
        g = t.guide.config
        if (g.img_resolution, g.img_channels) != (main.img_resolution, main.img_channels):
            raise ValueError(f'guide of term {i} makes {g.img_resolution}x{g.img_resolution}x{g.img_channels} '
                             f'images, the main network {main.img_resolution}x{main.img_resolution}x'
                             f'{main.img_channels}')
        if g.label_dim not in (0, main.label_dim):
            raise ValueError(f'guide of term {i} has label_dim {g.label_dim}; the main network has '
                             f'{main.label_dim} (a guide must use the same labels or none)')
    if t.null_label and main.label_dim == 0:
        raise ValueError('CFG with the null label needs a conditional main network (label_dim > 0); '
                         'give an unconditional guide network instead')
    weights = G.concrete_values(t.weight)
    if weights is not None and not np.all(np.isfinite(weights)):
        raise ValueError(f'guidance weight of term {i} must be finite, got {weights}')
    for p in P.resolve(main if t.guide is None else t.guide.config, t.perturbations):
        P.check_values(p.kind, G.concrete_values(p.strength))
    if t.interval is not None and not isinstance(t.interval, G.Interval):
        raise TypeError(f'interval of term {i} must be a guidance.Interval')
    R.check(t.rule, f'rule of term {i}')


def _prepare(net, i, t, dtype):
    """The checked term with its numbers as arrays: weights in the sampler dtype, strengths float32."""
    _check(net.config, i, t)
    target = net if t.guide is None else t.guide
    perturbations = tuple(p.replace(strength=G.cast_value(p.strength, F32))
                          for p in P.resolve(target.config, t.perturbations))
    rule = R.prepared(t.rule, dtype, f'rule of term {i}')
    return t.replace(weight=G.cast_value(t.weight, dtype), perturbation=perturbations or None, rule=rule)


def needs_keys(terms: Sequence[G.Term]) -> bool:
    """Whether any term draws random numbers (dropout, token shuffle)."""
    return any(p.kind in P.RANDOM_KINDS for t in terms for p in t.perturbations)


def _windowed(t) -> bool:
    return any(p.kind == 'window' for p in t.perturbations)


# ---------------------------------------------------------------------------------------------------
# The passes.

@dataclasses.dataclass(frozen=True)
class Passes:
    """The forward passes of one guided evaluation (built inside the traced sampler)."""
    net: Any
    class_labels: Any
    terms: tuple
    fusion: str
    dtype: Any

    @property
    def shared(self) -> list[int]:
        """The terms fused with the main pass: the main network's own guides, but windows."""
        return [i for i, t in enumerate(self.terms) if t.shared and not _windowed(t)]

    def labels(self, network, n, null=False):
        if network.config.label_dim == 0:
            return None
        if null or self.class_labels is None:
            return jnp.zeros((n, network.config.label_dim), F32)
        return self.class_labels

    def run(self, network, x, sigma, labels, perturbations=(), keys=None):
        out = network(x.astype(F32), sigma.astype(F32), labels, perturbation=perturbations or None, keys=keys)
        return out.astype(self.dtype)

    def main(self, x, sigma, step, keys):
        return self.run(self.net, x, sigma, self.class_labels)

    def term(self, i, x, sigma, keys):
        """D of term i's guide, in a pass of its own."""
        t = self.terms[i]
        network = self.net if t.shared else t.guide
        return self.run(network, x, sigma, self.labels(network, x.shape[0], t.null_label),
                        _strengths_at(t, sigma), keys)

    def stacked(self, subset, x, sigma, keys_of):
        """[D_main, D_i for i in subset] from one pass over [x; x; …]; each term's perturbations act
        on its own rows (strength 0 elsewhere)."""
        n, k = x.shape[0], 1 + len(subset)
        keys = jnp.concatenate([keys_of[subset[0]]] + [keys_of[i] for i in subset])  # main rows: unused
        perturbations = []
        for j, i in enumerate(subset):
            for p in _strengths_at(self.terms[i], sigma):
                rows = jnp.zeros((k, n), F32).at[1 + j].set(jnp.broadcast_to(p.strength, (n,)))
                perturbations.append(p.replace(strength=rows.reshape(-1), rows=((1 + j) * n, (2 + j) * n)))
        if self.fusion == 'prefix' and not any(self.terms[i].null_label for i in subset):
            out = self.net.stacked(x.astype(F32), sigma.astype(F32), self.labels(self.net, n), copies=k,
                                   perturbation=perturbations or None, keys=keys).astype(self.dtype)
        else:
            labels = self.labels(self.net, n)
            if labels is not None:
                labels = jnp.concatenate([labels] + [self.labels(self.net, n, self.terms[i].null_label)
                                                     for i in subset])
            out = self.run(self.net, jnp.concatenate([x] * k), sigma, labels, perturbations, keys)
        return [out[j * n:(j + 1) * n] for j in range(k)]

    def fused(self, subset, x, sigma, step, keys_of):
        """D_main and D_i of every shared term (zeros for those not in `subset`), in one pass."""
        outs = self.stacked(subset, x, sigma, keys_of) if subset else [self.main(x, sigma, step, None)]
        d = dict(zip(subset, outs[1:]))
        return outs[0], [d[i] if i in d else jnp.zeros_like(outs[0]) for i in self.shared]

    def fused_active(self, x, sigma, step, keys_of, active):
        """The fused pass specialised by `lax.switch` to the subset of active shared terms with
        intervals (2^m variants for m ≤ MAX_SWITCH_TERMS; beyond, the terms without interval alone
        or all shared terms while any is active)."""
        shared = self.shared
        always = [i for i in shared if active[i] is None]
        gated_terms = [i for i in shared if active[i] is not None]
        if not gated_terms:
            return self.fused(shared, x, sigma, step, keys_of)
        if len(gated_terms) <= MAX_SWITCH_TERMS:
            subsets = [sorted(always + [i for b, i in enumerate(gated_terms) if mask >> b & 1])
                       for mask in range(1 << len(gated_terms))]
            index = sum(active[i].astype(jnp.int32) << b for b, i in enumerate(gated_terms))
        else:
            subsets = [always, shared]
            index = functools.reduce(jnp.logical_or, [active[i] for i in gated_terms]).astype(jnp.int32)
        branches = [functools.partial(self.fused, s) for s in subsets]
        return jax.lax.switch(index, branches, x, sigma, step, keys_of)

    def evaluate_all(self, x, sigma, step, keys, active=None):
        """(D_main, [D_i]) for `guidance.guided`; inactive terms' passes are skipped."""
        terms, shared = self.terms, self.shared
        active = active or (None,) * len(terms)
        keys_of = [G.fold_keys(keys, i) for i in range(len(terms))]  # term i's own stream
        d = [None] * len(terms)
        if self.fusion == 'unfused' or not shared:
            d_main = self.main(x, sigma, step, keys)
            for i in shared:
                d[i] = G.gated(active[i], functools.partial(self.term, i), x, sigma, keys_of[i])
        else:
            d_main, rest = self.fused_active(x, sigma, step, keys_of, active)
            for i, di in zip(shared, rest):
                d[i] = di
        for i in range(len(terms)):
            if i not in shared:  # separate guide networks and window guides: their own pass each
                d[i] = G.gated(active[i], functools.partial(self.term, i), x, sigma, keys_of[i])
        return d_main, d


def _strengths_at(t, sigma):
    """The term's perturbations with strengths evaluated at σ."""
    return tuple(p.replace(strength=G.value_at(p.strength, sigma, F32)) for p in t.perturbations)


def edm2_denoiser(net, class_labels, terms: Sequence[G.Term], *, interval: G.Interval | None = None,
                  fusion: str = 'prefix', dtype=jnp.float32) -> G.Denoiser:
    """The guided denoiser of an EDM2 `Network` (terms from `prepare_terms`).

    fusion: 'prefix' — the main pass and every shared term in one pass over [x; x; …], the modules
    before the first perturbed one run once on N rows (not when a term uses the null label or
    sigma_shift: then as 'fused'); 'fused' — the same pass without the shared prefix; 'unfused' — one
    pass per term. Networks compute in float32; D is cast to `dtype`.

    Per-term intervals skip real work: a pass of its own runs only while its term is active
    (`lax.cond`), and the fused pass is specialised to the active terms (`Passes.fused_active`).
    Where no term contributes (w = 0, or a self-guide of strength 0, e.g. p = 0), only the main
    pass runs: the unguided result bit for bit (`guidance.guided`).
    """
    if fusion not in FUSIONS:
        raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')
    passes = Passes(net, class_labels, tuple(terms), fusion, dtype)
    if not passes.terms:
        return passes.main
    return G.guided(passes.main, passes.evaluate_all, [t.weight for t in passes.terms], interval,
                    intervals=[t.interval for t in passes.terms], rules=[t.rule for t in passes.terms],
                    effective=[_effective(t) for t in passes.terms])


def _effective(t):
    """σ → whether the term's guide differs from the main network: a guide on the main network's own
    parameters under perturbations of strength 0 is the main network (None: always differs)."""
    if not t.shared or t.null_label or not t.perturbations or _windowed(t):
        return None
    return lambda sigma: functools.reduce(jnp.logical_or, [jnp.any(p.strength != 0)
                                                           for p in _strengths_at(t, sigma)])

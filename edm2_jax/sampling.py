"""EDM2's Heun sampler (spec §3.1) as one `lax` loop, seeds → noise, labels, keys (spec §3.2), and
`sample`, the public entry point for EDM2 networks with any guidance method (`methods.py`).

The low-level sampler is shape-agnostic: it sees only `denoise(x, sigma, step, keys) -> D` with x
[N, ...], sigma a 0-d array of the sampler dtype, step the int step index and keys a typed key array
[N], fresh per sample and per evaluation.

Randomness: sample n has the key `key(seed_n)`, split into three streams: its noise, its class label
and the sampler stream (the `keys` argument of the samplers). The sampler folds the step index into
that stream, then 0 for the Euler evaluation, 1 for the Heun correction, 2 for churn noise. Nothing
depends on the batch, so a seed gives the same image at any batch size.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import guidance as G
from edm2_jax import methods
from edm2_jax.denoiser import FUSIONS, edm2_denoiser, needs_keys, prepare_terms

EULER, HEUN, CHURN = 0, 1, 2  # per-step key streams


# ---------------------------------------------------------------------------------------------------
# Seeds → keys, noise, labels.

class SeedInputs(NamedTuple):
    noise: jax.Array               # [N, *shape] standard normal
    class_labels: jax.Array | None  # [N, label_dim] one-hot float32, None when label_dim = 0
    keys: jax.Array                 # [N] typed keys: the sampler streams


def seed_keys(seeds) -> jax.Array:
    """key(seed mod 2^32) for every seed (EDM2 seeds its generators with seed mod 2^32)."""
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f'seeds must be a 1-D sequence of integers, got {seeds!r}')
    return jax.vmap(jax.random.key)(jnp.asarray(seeds.astype(np.int64) % 2**32, jnp.uint32))


@functools.partial(jax.jit, static_argnames=('shape', 'label_dim', 'dtype'))
def _draw(keys, class_idx, shape, label_dim, dtype):
    streams = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(streams[:, 0])
    labels = None
    if label_dim:
        drawn = jax.vmap(lambda k: jax.random.randint(k, (), 0, label_dim))(streams[:, 1])
        labels = jax.nn.one_hot(jnp.where(class_idx < 0, drawn, class_idx), label_dim, dtype=jnp.float32)
    return SeedInputs(noise, labels, streams[:, 2])


def seed_inputs(seeds, shape: Sequence[int], label_dim: int = 0, class_idx: int | None = None,
                dtype=jnp.float32) -> SeedInputs:
    """Noise of per-sample `shape` ((R, R, C) for images), random one-hot labels (or all `class_idx`)
    and sampler keys, each sample's drawn only from its own seed."""
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f'class_idx must lie in [0, {label_dim}), got {class_idx}')
    return _draw(seed_keys(seeds), jnp.int32(-1 if class_idx is None else class_idx),
                 tuple(int(s) for s in shape), int(label_dim), jnp.dtype(dtype))


def network_inputs(net, seeds, class_idx: int | None = None) -> SeedInputs:
    """`seed_inputs` for an EDM2 network: NHWC noise of its image shape and labels of its label space."""
    c = net.config
    return seed_inputs(seeds, (c.img_resolution, c.img_resolution, c.img_channels), c.label_dim, class_idx)


# ---------------------------------------------------------------------------------------------------
# Noise levels and the Heun loop.

def _check_steps(num_steps, sigma_min, sigma_max, rho):
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps must be an integer >= 1, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if not rho > 0:
        raise ValueError(f'rho must be > 0, got {rho}')


def _check_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f'the sampler dtype must be float32 or float64, got {dtype}')
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError('dtype=float64 needs 64-bit JAX: jax.config.update("jax_enable_x64", True) '
                         'or run inside `with jax.enable_x64(True):`')
    return dtype


def sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                dtype=jnp.float32) -> jax.Array:
    """t_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < N, then t_N = 0.

    The base is computed in `dtype` as EDM2 does; the power is the correctly rounded one (computed
    in float64 and rounded once to float32; float32 t_0 = 79.999985), as torch's CPU pow gives. It is
    not left to a float32 pow kernel: XLA's and NumPy ≥ 2.4's vectorised ones differ by an ulp.
    N = 1 gives [σ_max, 0] (one Euler step).
    """
    _check_steps(num_steps, sigma_min, sigma_max, rho)
    dt = np.dtype(_check_dtype(dtype))
    i = np.arange(num_steps, dtype=dt)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    base = dt.type(hi) + i / dt.type(max(num_steps - 1, 1)) * dt.type(lo - hi)
    t = (base.astype(np.float64) ** np.float64(dt.type(rho))).astype(dt)
    return jnp.asarray(np.concatenate([t, np.zeros(1, dt)]))


class Churn(NamedTuple):
    """Stochastic churn (EDM): at steps with S_min ≤ t_i ≤ S_max, raise σ by γ = min(S_churn/N, √2−1)."""
    S_churn: Any
    S_min: Any = 0.0
    S_max: Any = float('inf')
    S_noise: Any = 1.0


def _churn(x, t_cur, keys, churn: Churn, num_steps, active):
    """(x̂, t̂): x with fresh noise raising its level from t_cur to t̂ = (1 + γ)·t_cur (γ = 0 unless active)."""
    dtype = x.dtype
    on = active & (churn.S_min <= t_cur) & (t_cur <= churn.S_max)
    gamma = jnp.where(on, jnp.minimum(churn.S_churn / num_steps, np.sqrt(2) - 1), 0).astype(dtype)
    t_hat = t_cur + gamma * t_cur

    def add_noise(x):
        eps = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], dtype))(G.fold_keys(keys, CHURN))
        return x + jnp.sqrt(t_hat ** 2 - t_cur ** 2) * jnp.asarray(churn.S_noise, dtype) * eps
    return jax.lax.cond(gamma > 0, add_noise, lambda x: x, x), t_hat


def heun_loop(denoise, noise, keys, t_steps, churn: Churn | None = None, *,
              return_trajectory: bool = False):
    """EDM's 2nd-order Heun sampler on the noise levels t_steps ([N+1], last 0), in t_steps.dtype.

    x_0 = noise·t_0; step i: (optional churn) x̂, t̂; d = (x̂ − D(x̂, t̂))/t̂; x' = x̂ + (t_{i+1} − t̂)·d;
    for i < N−1 the correction d' = (x' − D(x', t_{i+1}))/t_{i+1}, x_{i+1} = x̂ + (t_{i+1} − t̂)(d/2 + d'/2).
    One `fori_loop` over the 2N − 1 evaluations, each iteration one denoiser call (even: Euler,
    odd: correction), so the denoiser is traced and compiled once. Returns x_N, or with
    return_trajectory the states x_0 … x_N stacked as [N+1, *x.shape].
    A stateful denoiser (one with an `init_state(x)` attribute, e.g. APG momentum) is called as
    denoise(x, σ, step, keys, state) → (D, state), its state carried through the evaluations in order.
    """
    num_steps = t_steps.shape[0] - 1
    dtype = t_steps.dtype
    x0 = noise.astype(dtype) * t_steps[0]
    init_state = getattr(denoise, 'init_state', None)

    def body(j, carry):
        x, x_hat, t_hat, d_cur, path, state = carry
        i, stage = j // 2, j % 2
        euler = stage == EULER
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        step_keys = G.fold_keys(keys, i)
        if churn is not None:
            new_x_hat, new_t_hat = _churn(x, t_cur, step_keys, churn, num_steps, euler)
        else:
            new_x_hat, new_t_hat = x, t_cur
        x_hat = jnp.where(euler, new_x_hat, x_hat)
        t_hat = jnp.where(euler, new_t_hat, t_hat)
        x_eval = jnp.where(euler, x_hat, x)
        t_eval = jnp.where(euler, t_hat, t_next)
        if init_state is None:
            D = denoise(x_eval, t_eval, i, G.fold_keys(step_keys, stage))
        else:
            D, state = denoise(x_eval, t_eval, i, G.fold_keys(step_keys, stage), state)
        D = D.astype(dtype)
        d = (x_eval - D) / t_eval
        d_cur = jnp.where(euler, d, d_cur)
        x = x_hat + (t_next - t_hat) * jnp.where(euler, d, 0.5 * d_cur + 0.5 * d)
        if path is not None:  # the correction overwrites the Euler estimate of x_{i+1}
            path = path.at[i + 1].set(x)
        return x, x_hat, t_hat, d_cur, path, state

    path = jnp.zeros((num_steps + 1,) + x0.shape, dtype).at[0].set(x0) if return_trajectory else None
    state = None if init_state is None else init_state(x0)
    init = (x0, x0, t_steps[0], jnp.zeros_like(x0), path, state)
    x, *_, path, _ = jax.lax.fori_loop(0, 2 * num_steps - 1, body, init)
    return path if return_trajectory else x


def heun_sampler(denoise, noise, keys, *, num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0, dtype=jnp.float32,
                 return_trajectory=False):
    """EDM2's `edm_sampler` for any denoiser(x, sigma, step, keys); see `heun_loop`. Jit the caller."""
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype)
    churn = None if _is_zero(S_churn) else Churn(S_churn, S_min, S_max, S_noise)
    return heun_loop(denoise, noise, keys, t_steps, churn, return_trajectory=return_trajectory)


def _is_zero(v):
    return isinstance(v, (int, float)) and v == 0


# ---------------------------------------------------------------------------------------------------
# The public entry point for EDM2 networks.

@functools.partial(jax.jit, static_argnames=('fusion',))
def _sample(net, noise, class_labels, keys, t_steps, terms, interval, churn, fusion):
    denoise = edm2_denoiser(net, class_labels, terms, interval=interval, fusion=fusion, dtype=t_steps.dtype,
                            sample_keys=keys)
    return heun_loop(denoise, noise, keys, t_steps, churn)


def sample(net, noise, class_labels=None, *, method: str | None = None, guidance=1.0, strength=None,
           guide=None, blocks=None, window=None, rule=None, terms: Sequence[G.Term] | None = None,
           interval=None, interval_steps=None, fusion: str = 'prefix', num_steps: int = 32,
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn=0.0, S_min=0.0,
           S_max=float('inf'), S_noise=1.0, keys=None, dtype=jnp.float32) -> jax.Array:
    """Images [N, R, R, C] from noise [N, R, R, C] (unit variance, NHWC) with EDM2's Heun sampler.

    method: a name of the registry `edm2_jax.methods` (None or 'none': unguided) with guidance
    g = 1 + w (EDM2's convention; a number or a `guidance.Schedule` of g over σ), the method's own
    `strength` (e.g. in-situ's dropout rate p; None: its default), its `guide` network, `blocks` (the
    block selection of `perturb.select_blocks`), `window` (swg) and `rule` (None or a rule of
    `edm2_jax.rules`). Or terms: a list of `guidance.Term`s (D = D_main + Σ w_i (D_main − D_i)),
    with no method.
    interval: guide only for σ ∈ (lo, hi]; interval_steps: guide only at steps start ≤ i ≤ stop
    (inclusive). Outside, the guide is not run; a Term may carry its own `interval` too.
    fusion: 'prefix' | 'fused' | 'unfused' (how passes sharing the main network's parameters run).
    keys: [N] typed keys, the sampler streams of `seed_inputs` (needed by dropout, token shuffle and
    churn). w, strengths, interval bounds, schedule values, σ_min, σ_max, ρ and churn values are
    traced: sweeping them does not recompile; method, shapes, num_steps, blocks and fusion are static.
    """
    dtype = _check_dtype(dtype)
    cfg = net.config
    r, c = cfg.img_resolution, cfg.img_channels
    noise = jnp.asarray(noise)
    if noise.ndim != 4 or noise.shape[1:] != (r, r, c):
        raise ValueError(f'noise must be NHWC [N, {r}, {r}, {c}] for this network, got {noise.shape}')
    n = noise.shape[0]
    if class_labels is not None:
        if cfg.label_dim == 0:
            raise ValueError('the network is unconditional (label_dim 0) but class_labels were given')
        class_labels = jnp.asarray(class_labels, jnp.float32)
        if class_labels.shape != (n, cfg.label_dim):
            raise ValueError(f'class_labels must have shape [{n}, {cfg.label_dim}], got {class_labels.shape}')
    if fusion not in FUSIONS:
        raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype)

    terms = prepare_terms(net, guidance_terms(method, guidance, strength, guide=guide, blocks=blocks,
                                              window=window, rule=rule, terms=terms), dtype)
    if interval is not None and interval_steps is not None:
        raise ValueError('give either interval (σ range) or interval_steps (step indices), not both')
    if (interval is not None or interval_steps is not None) and not terms:
        raise ValueError('a guidance interval needs a guidance method')
    if interval is not None:
        interval = G.Interval.sigmas(*interval, dtype=dtype)
    elif interval_steps is not None:
        interval = G.Interval.steps(*interval_steps, num_steps=num_steps)

    churn = None
    if not _is_zero(S_churn):
        churn = Churn(*(jnp.asarray(v, dtype) for v in (S_churn, S_min, S_max, S_noise)))
    keys = _check_keys(keys, n, churn is not None or needs_keys(terms))
    return _sample(net, noise, class_labels, keys, t_steps, terms, interval, churn, fusion)


def guidance_terms(method: str | None = None, guidance=1.0, strength=None, *, guide=None, blocks=None,
                   window=None, rule=None, terms=None) -> tuple[G.Term, ...]:
    """The guidance terms `sample` uses for these arguments (see there), e.g. to count their cost."""
    if terms is not None:
        if method not in (None, 'none') or guide is not None or strength is not None or rule is not None:
            raise ValueError('terms carry their own guides, weights, strengths and rules: give no method, '
                             'guide, strength or rule with them')
        return tuple(terms)
    if method in (None, 'none') and not _is_default(guidance, 1.0):
        raise ValueError('guidance needs a guidance method')
    return methods.terms(method, methods.weight(guidance), strength, guide=guide, blocks=blocks, window=window,
                         rule=rule)


def _is_default(value, default):
    return not isinstance(value, G.Schedule) and G.concrete_values(value) is not None and \
        np.all(G.concrete_values(value) == default)


def _check_keys(keys, n, needed):
    if keys is None:
        if needed:
            raise ValueError('dropout, token shuffle and churn need per-sample keys: pass '
                             'keys=seed_inputs(seeds, ...).keys')
        return jax.random.wrap_key_data(jnp.zeros((n, 2), jnp.uint32))  # never used
    if not (isinstance(keys, jax.Array) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)):
        raise ValueError('keys must be a typed key array (jax.random.key), e.g. seed_inputs(...).keys')
    if keys.shape != (n,):
        raise ValueError(f'keys must have shape [{n}] (one per sample), got {keys.shape}')
    return keys

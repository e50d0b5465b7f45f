"""Guidance rules (CFG rescale, CFG-Zero*, TCFG, FDG) against NumPy implementations of their papers'
formulas, written here independently (SVD, std, pooling by reshape); edge cases; inside the sampler
on a tiny network (fused and unfused passes, every kind of guide, sweeps without recompiling); the
diffusers start/stop rule."""
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import guidance as G
from edm2_jax import methods as M
from edm2_jax import rules as R
from edm2_jax import sampling as S
from helpers import STEPS, TRACES, assert_close

SHAPE = (3, 4, 6, 2)  # N, H, W, C


def f32(a):
    return jnp.asarray(a, jnp.float32)


def call(rule, w, c, u, x=None, sigma=1.0, step=0):
    """The rule's term for D_main = c, D_guide = u at x (float64 NumPy out)."""
    x = np.zeros_like(c) if x is None else x
    term, _ = rule(jnp.float32(w), f32(c), f32(u), R.At(f32(x), jnp.float32(sigma), jnp.int32(step)),
                   jnp.zeros(c.shape, jnp.float32))
    return np.asarray(term, np.float64)


def per_example(fn, *arrays):
    return np.stack([fn(*(a[i] for a in arrays)) for i in range(len(arrays[0]))])


# ---------------------------------------------------------------------------------------------------
# NumPy references, per example (float64).

def np_rescale(w, c, u, phi):
    """Lin et al. 2024, Alg. 2, with guidance scale g = 1 + w; np.std with ddof = 1 (ratio: irrelevant)."""
    def one(c, u):
        cfg = u + (1 + w) * (c - u)
        rescaled = cfg * np.std(c, ddof=1) / np.std(cfg, ddof=1)
        return phi * rescaled + (1 - phi) * cfg - c
    return per_example(one, c, u)


def np_zero_star(w, c, u, eps=1e-8):
    """diffusers' CFGZeroStarGuidance (non-original formulation): s*·u + g·(c − s*·u), minus D_main."""
    def one(c, u):
        s = np.sum(c * u) / (np.sum(u * u) + eps)
        return s * u + (1 + w) * (c - s * u) - c
    return per_example(one, c, u)


def np_tangential(w, c, u, x):
    """Kwon et al. 2025 on scores (D − x): SVD of [cond; uncond], uncond projected on Vh[0]."""
    def one(c, u, x):
        sc, su = (c - x).ravel(), (u - x).ravel()
        v1 = np.linalg.svd(np.stack([sc, su]), full_matrices=False)[2][0]
        guide = x + (su @ v1 * v1).reshape(x.shape)
        return w * (c - guide)
    return per_example(one, c, u, x)


def np_frequency(w, c, u, sigma, low, high, low_sigmas, high_sigmas):
    """Sadat et al. 2025 with a 2-level pyramid: 2×2 block means (np.kron upsampling), the rest high."""
    def one(c, u):
        d = c - u
        h, wd, ch = d.shape
        means = d.reshape(h // 2, 2, wd // 2, 2, ch).mean(axis=(1, 3))
        lowpass = np.stack([np.kron(means[..., k], np.ones((2, 2))) for k in range(ch)], axis=-1)
        on = [lo < sigma <= hi for lo, hi in (low_sigmas, high_sigmas)]
        return w * (low * on[0] * lowpass + high * on[1] * (d - lowpass))
    return per_example(one, c, u)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    return [rng.standard_normal(SHAPE) for _ in range(3)]  # D_main, D_guide, x


# ---------------------------------------------------------------------------------------------------
# Each rule vs its formula, and its edge cases.

@pytest.mark.parametrize('w, phi', [(1.5, 0.7), (3.0, 1.0), (0.5, 0.0)])
def test_rescale(arrays, w, phi):
    c, u, _ = arrays
    np.testing.assert_allclose(call(R.Rescale(phi), w, c, u), np_rescale(w, c, u, phi), rtol=1e-5, atol=1e-5)


def test_rescale_edges(arrays):
    c, u, _ = arrays
    assert np.array_equal(call(R.Rescale(0.7), 2.0, c, c), np.zeros(SHAPE))  # zero difference: nothing
    zero = np.zeros(SHAPE)
    assert np.array_equal(call(R.Rescale(0.7), 2.0, zero, zero), zero)  # zero std: no NaN
    linear = np.asarray(2.0 * (f32(c) - f32(u)))
    assert np.array_equal(call(R.Rescale(0.0), 2.0, c, u), linear)  # φ = 0: the linear rule, exactly


@pytest.mark.parametrize('w', [1.0, 4.0, -0.5])
def test_zero_star(arrays, w):
    c, u, _ = arrays
    np.testing.assert_allclose(call(R.ZeroStar(), w, c, u), np_zero_star(w, c, u), rtol=1e-5, atol=1e-5)


def test_zero_star_edges(arrays):
    c, _, x = arrays
    zero = np.zeros(SHAPE)
    got = call(R.ZeroStar(), 2.0, c, zero)  # zero-norm guide: s* = 0, the term w·D_main
    np.testing.assert_allclose(got, 2.0 * c, rtol=1e-6)
    np.testing.assert_allclose(call(R.ZeroStar(), 2.0, c, c), zero, atol=1e-6)  # zero difference
    rule = R.ZeroStar(zero_init_steps=2)
    out = f32(c)
    for step, expected in [(0, x), (1, x), (2, c), (5, c)]:  # zero-init: D = x, the zero velocity
        got = rule.finish(out, R.At(f32(x), jnp.float32(1.0), jnp.int32(step)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(f32(expected)))


@pytest.mark.parametrize('w', [1.0, 2.5])
def test_tangential(arrays, w):
    c, u, x = arrays
    np.testing.assert_allclose(call(R.Tangential(), w, c, u, x), np_tangential(w, c, u, x), rtol=1e-4, atol=1e-4)


def test_tangential_edges(arrays):
    c, _, x = arrays
    parallel = x + 2.5 * (c - x)  # the guide's score parallel to the main one: the linear rule
    np.testing.assert_allclose(call(R.Tangential(), 2.0, c, parallel, x), 2.0 * (c - parallel), rtol=1e-4,
                               atol=1e-4)
    opposite = x - 0.5 * (c - x)
    np.testing.assert_allclose(call(R.Tangential(), 2.0, c, opposite, x), 2.0 * (c - opposite), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(call(R.Tangential(), 2.0, c, c, x), 0, atol=1e-6)  # zero difference
    assert np.array_equal(call(R.Tangential(), 2.0, x, x, x), np.zeros(SHAPE))  # zero scores: no NaN
    # orthogonal scores: the larger one is the dominant direction (the guide's kept if it is larger)
    e1, e2 = np.zeros(SHAPE), np.zeros(SHAPE)
    e1[:, 0, 0, 0], e2[:, 0, 1, 0] = 1.0, 1.0
    np.testing.assert_allclose(call(R.Tangential(), 1.0, e1, 3 * e2), e1 - 3 * e2, atol=1e-6)
    np.testing.assert_allclose(call(R.Tangential(), 1.0, 3 * e1, e2), 3 * e1, atol=1e-6)


@pytest.mark.parametrize('sigma', [0.3, 2.0, 50.0])
def test_frequency_decoupled(arrays, sigma):
    c, u, _ = arrays
    args = (0.5, 2.5, (0.0, 10.0), (1.0, 80.0))
    got = call(R.FrequencyDecoupled(*args), 1.5, c, u, sigma=sigma)
    np.testing.assert_allclose(got, np_frequency(1.5, c, u, sigma, *args), rtol=1e-5, atol=1e-5)


def test_frequency_decoupled_edges(arrays):
    c, u, _ = arrays
    np.testing.assert_allclose(call(R.FrequencyDecoupled(), 2.0, c, u), 2.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert np.array_equal(call(R.FrequencyDecoupled(0.5, 3.0), 2.0, c, c), np.zeros(SHAPE))
    with pytest.raises(ValueError, match='even size'):
        call(R.FrequencyDecoupled(), 1.0, c[:, :3], u[:, :3])


@pytest.mark.parametrize('rule, message', [
    (R.Rescale(1.5), 'φ in \\[0, 1\\]'), (R.ZeroStar(1.5), 'an integer >= 0'), (R.ZeroStar(1, 0.0), 'ε > 0'),
    (R.FrequencyDecoupled(low_sigmas=(2.0, 1.0)), 'low_sigmas needs a range'), (R.APG(threshold=-1), 'r >= 0'),
])
def test_bad_values_are_one_clear_error(nets, batch, rule, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        S.sample(nets[0], batch.noise, batch.class_labels, method='cfg', guidance=2.0, rule=rule,
                 num_steps=STEPS)


# ---------------------------------------------------------------------------------------------------
# Inside the sampler, on a tiny network.

def cfg(net, inputs, g=2.0, rule=None, fusion='prefix', **kwargs):
    return S.sample(net, inputs.noise, inputs.class_labels, method='cfg', guidance=g, rule=rule,
                    fusion=fusion, num_steps=STEPS, keys=inputs.keys, **kwargs)


def test_rescale_sweep_compiles_once_and_phi_0_is_cfg(nets, batch):  # noqa: F811
    net = nets[0]
    plain = np.asarray(cfg(net, batch))
    assert np.array_equal(np.asarray(cfg(net, batch, rule=R.Rescale(0.0))), plain)
    traces = len(TRACES)
    outs = [np.asarray(cfg(net, batch, g, R.Rescale(phi))) for g, phi in [(2.0, 0.7), (3.0, 1.0), (2.0, 1.0)]]
    assert len(TRACES) == traces  # (w, φ) traced: nothing recompiled
    assert all(np.isfinite(o).all() for o in outs)
    assert np.abs(outs[0] - plain).max() > 1e-3 and np.abs(outs[0] - outs[2]).max() > 1e-3


def test_zero_star_zero_init_holds_x(nets, batch):  # noqa: F811
    """D = x at every step: the sampler never moves (x_N = noise·σ_max); K < N steps: it does."""
    net = nets[0]
    held = np.asarray(cfg(net, batch, rule=R.ZeroStar(zero_init_steps=STEPS)))
    np.testing.assert_array_equal(held, np.asarray(batch.noise * S.sigma_steps(STEPS)[0]))
    moved = np.asarray(cfg(net, batch, rule=R.ZeroStar(zero_init_steps=1)))
    assert np.isfinite(moved).all() and np.abs(moved - held).max() > 1.0


@pytest.mark.parametrize('rule', [R.Tangential(), R.FrequencyDecoupled(0.5, 2.0, (0.0, 5.0), (0.5, 100.0))],
                         ids=['tangential', 'frequency'])
def test_rules_fused_equal_unfused(nets, batch, rule):  # noqa: F811
    net = nets[0]
    fused, unfused = (np.asarray(cfg(net, batch, rule=rule, fusion=f)) for f in ('fused', 'unfused'))
    assert_close(fused, unfused)
    assert np.abs(fused - np.asarray(cfg(net, batch, fusion='unfused'))).max() > 1e-3


def test_every_guide_takes_every_rule(nets, batch):  # noqa: F811
    """in-situ + PAG (fused with the main pass) + autoguidance, each with another rule."""
    net, gnet = nets
    terms = [M.term('insitu', 0.5, 0.1, blocks='decoder').replace(rule=R.Tangential()),
             M.term('cfg', 0.4).replace(rule=R.FrequencyDecoupled(0.5, 1.5)),
             M.term('autoguidance', 0.3, guide=gnet).replace(rule=R.Rescale(0.5))]
    out = {f: np.asarray(S.sample(net, batch.noise, batch.class_labels, terms=terms, fusion=f,
                                  num_steps=STEPS, keys=batch.keys)) for f in ('fused', 'unfused')}
    assert np.isfinite(out['fused']).all()
    assert_close(out['fused'], out['unfused'])


# ---------------------------------------------------------------------------------------------------
# Guidance start/stop as fractions of the sampling steps.

def test_fractions_follow_diffusers():
    for n in (1, 4, 7, 10, 32):
        for start in (0.0, 0.1, 0.25, 0.3, 0.5):
            for stop in (0.3, 0.7, 0.75, 0.95, 1.0):
                if stop < start:
                    continue
                interval = G.Interval.fractions(start, stop, n)
                got = [bool(interval(jnp.float32(1.0), jnp.int32(i))) for i in range(n)]
                assert got == [int(start * n) <= i < int(stop * n) for i in range(n)], (n, start, stop)
    with pytest.raises(ValueError, match='0 <= start <= stop <= 1'):
        G.Interval.fractions(0.5, 1.2, 10)


# ---------------------------------------------------------------------------------------------------
# The toy: its terms' rules pass through `guidance.guide_with`.

def test_toy_cfg_with_rules():
    import jax
    from edm2_jax.toy import methods as toy
    from edm2_jax.toy import model as T
    from helpers import toy_trained_like as trained_like
    c = T.ToyConfig(8)
    models = {'main': toy.Model(trained_like(c, 0), c), 'cfg': toy.Model(trained_like(c, 1), c)}
    noise, keys = toy.start_points(jax.random.key(0), 32)
    t = toy.time_steps(num_steps=6)

    def run(rule):
        # the cfg model as a guide ('autoguidance' term: methods' 'cfg' entry expects a Network guide)
        return np.asarray(toy.sample(toy.Method('cfg', M.terms('autoguidance', 2.0, guide='cfg', rule=rule)),
                                     models, noise, keys, t))
    plain = run(None)
    np.testing.assert_array_equal(run(R.Rescale(0.0)), plain)
    assert np.abs(run(R.Rescale(0.7)) - plain).max() > 1e-3
    np.testing.assert_array_equal(run(R.ZeroStar(zero_init_steps=6)), np.asarray(noise * t[0]))

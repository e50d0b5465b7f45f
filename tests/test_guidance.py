"""Guidance: schedules, intervals and composition (analytic denoisers), and the EDM2 methods on a small
random network (fused, unfused and prefix-shared in-situ passes, sums of terms, evaluation counts,
batch-size independence, one compilation for a (w, p) sweep). The official-sampler comparisons
(autoguidance, evaluation order) are in test_sampling.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import denoiser as D
from edm2_jax import guidance as G
from edm2_jax import perturb as P
from edm2_jax import methods as M
from edm2_jax import sampling as S
from helpers import STEPS, TRACES, assert_close, heun_evals, numpy_heun, run_recorded

# ---------------------------------------------------------------------------------------------------
# Schedules and intervals.


def test_schedules():
    knots, values = [0.1, 1.0, 10.0], [0.0, 2.0, 1.0]
    lin = G.Schedule.linear(knots, values)
    sigmas = np.array([0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 50.0])
    expected = np.interp(np.log(sigmas), np.log(knots), values)
    np.testing.assert_allclose([float(lin(jnp.float32(s))) for s in sigmas], expected, rtol=1e-6, atol=1e-6)
    const = G.Schedule.constant([0.5, 2.0], [3.0, 4.0, 5.0])  # (…, 0.5] → 3, (0.5, 2] → 4, (2, …) → 5
    got = [float(const(jnp.float32(s))) for s in [0.1, 0.5, 0.6, 2.0, 2.1, 100.0]]
    assert got == [3, 3, 4, 4, 5, 5]
    assert float(G.value_at(const.map(lambda v: v - 1), jnp.float32(1.0), jnp.float32)) == 3.0
    assert float(G.value_at(0.25, jnp.float32(1.0), jnp.float32)) == 0.25
    with pytest.raises(ValueError, match='increasing'):
        G.Schedule.linear([1.0, 0.5], [0, 1])
    with pytest.raises(ValueError, match='one more value'):
        G.Schedule.constant([1.0], [0.0])


def test_interval_membership():
    by_sigma = G.Interval.sigmas(0.5, 2.0)
    assert [bool(by_sigma(jnp.float32(s), 0)) for s in [0.4, 0.5, 0.51, 2.0, 2.01]] == \
        [False, False, True, True, False]
    by_step = G.Interval.steps(2, 3, num_steps=8)
    assert [bool(by_step(jnp.float32(1.0), i)) for i in range(6)] == [False, False, True, True, False, False]


# ---------------------------------------------------------------------------------------------------
# Composition with analytic denoisers.

def scaled(a):
    return lambda x, sigma, step, keys: a * x


def test_guide_with_combines_terms():
    x = jnp.arange(6.0).reshape(3, 2)
    keys = jax.random.split(jax.random.key(0), 3)
    denoise = G.guide_with(scaled(0.5), [scaled(0.2), scaled(0.9)], [1.5, G.Schedule.constant([1.0], [0.0, 2.0])])
    for sigma, w2 in [(0.5, 0.0), (3.0, 2.0)]:
        got = np.asarray(denoise(x, jnp.float32(sigma), 0, keys))
        expected = (0.5 + 1.5 * (0.5 - 0.2) + w2 * (0.5 - 0.9)) * np.asarray(x)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def counting(name, a, log):
    def denoise(x, sigma, step, keys):
        jax.debug.callback(lambda s, i: log.append((name, float(s), int(i))), sigma, step, ordered=True)
        return a * x
    return denoise


@pytest.mark.parametrize('by_step', [False, True])
def test_interval_evaluates_the_guide_only_inside(by_step):
    log = []
    num_steps, lo, hi = 8, 0.3, 6.0
    t = np.asarray(S.sigma_steps(num_steps, sigma_max=20.0), np.float64)
    interval = G.Interval.steps(2, 4) if by_step else G.Interval.sigmas(lo, hi)
    denoise = G.guide_with(counting('main', 0.6, log), [counting('guide', 0.8, log)], [1.0], interval)
    inputs = S.seed_inputs(np.arange(2), (3,))
    out = jax.jit(lambda n, k: S.heun_sampler(denoise, n, k, num_steps=num_steps, sigma_max=20.0))(
        inputs.noise, inputs.keys)
    jax.effects_barrier()
    # evaluation e of step i sits at t_i (Euler) or t_{i+1} (correction, i < N − 1)
    evals = heun_evals(num_steps, 20.0)

    def guided(s, i):
        return (2 <= i <= 4) if by_step else (lo < s <= hi)
    inside = [guided(s, i) for s, i in evals]
    assert [name for name, _, _ in log] == sum((['main', 'guide'] if g else ['main'] for g in inside), [])
    guided_sigmas = [s for (s, i), g in zip(evals, inside) if g]
    np.testing.assert_allclose([s for name, s, _ in log if name == 'guide'], guided_sigmas, rtol=1e-6)
    assert 0 < len(guided_sigmas) < len(evals)
    # and the result is the Heun loop on D = 0.4x inside the interval (guided), 0.6x outside
    x = numpy_heun(lambda x, s, i: (0.4 if guided(s, i) else 0.6) * x, inputs.noise, t)
    np.testing.assert_allclose(np.asarray(out), x, rtol=1e-4, atol=1e-6)


def test_keys_fresh_per_sample_step_and_evaluation_and_batch_independent():
    """A denoiser whose output depends on its keys (like dropout): bit-identical for a seed at any batch
    size, and every (sample, evaluation) gets a different key."""
    seen = []

    def noisy(x, sigma, step, keys):
        jax.debug.callback(lambda k: seen.append(k), jax.random.key_data(keys), ordered=True)
        eps = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
        return 0.5 * x + 0.1 * sigma * eps

    denoise = G.guide_with(scaled(0.5), [noisy], [0.7])
    run = jax.jit(lambda n, k: S.heun_sampler(denoise, n, k, num_steps=5, sigma_max=5.0, S_churn=2.0))
    seeds = np.array([3, 14, 15, 92, 65, 35, 89, 79])
    inputs = S.seed_inputs(seeds, (2,))
    full = run(inputs.noise, inputs.keys)
    jax.effects_barrier()
    keys = np.concatenate(seen).reshape(-1, 2)
    assert len(keys) == 8 * 9 and len({tuple(k) for k in keys}) == len(keys)
    for subset in ([5, 1, 7], [4]):
        out = run(inputs.noise[np.array(subset)], inputs.keys[np.array(subset)])
        np.testing.assert_array_equal(np.asarray(out), np.asarray(full)[subset])


# ---------------------------------------------------------------------------------------------------
# EDM2 networks: a one-level network (compiles fast) with non-zero gains, so dropout changes D.

def insitu(net, inputs, fusion='prefix', w=1.0, p=0.2, **kwargs):
    return S.sample(net, inputs.noise, inputs.class_labels, method='insitu', guidance=1 + w,
                    strength=p, blocks='decoder', fusion=fusion, num_steps=STEPS, keys=inputs.keys,
                    **kwargs)


@pytest.fixture(scope='module')
def insitu_runs(nets, batch):
    net = nets[0]
    runs = {}
    for fusion in D.FUSIONS:
        runs[fusion] = run_recorded(lambda: insitu(net, batch, fusion))
    runs['none'] = run_recorded(lambda: S.sample(net, batch.noise, batch.class_labels, num_steps=STEPS))
    return runs


def test_insitu_fused_unfused_and_prefix_agree(insitu_runs):
    (fused, fcalls), (unfused, ucalls), (prefix, pcalls) = (insitu_runs[f] for f in ('fused', 'unfused', 'prefix'))
    n_evals = 2 * STEPS - 1
    assert [(c[0], c[2]) for c in fcalls] == [('net', 16)] * n_evals
    assert [(c[0], c[2]) for c in pcalls] == [('net.stacked2', 8)] * n_evals
    assert [(c[0], c[2]) for c in ucalls] == [('net', 8)] * (2 * n_evals)
    assert_close(fused, unfused)
    assert_close(prefix, fused)
    assert np.abs(fused - insitu_runs['none'][0]).max() > 0.1  # the guidance does something


def test_insitu_with_zero_weight_or_rate_is_unguided(nets, batch, insitu_runs):
    """w = 0 or p = 0 (the first point of every sweep): the guide pass is skipped (lax.cond on the
    traced numbers), so every fusion mode gives the unguided samples bit for bit, with one main
    pass per evaluation; the same compiled program guides at w, p ≠ 0."""
    unguided = insitu_runs['none'][0]
    for fusion in D.FUSIONS:
        for w, p in [(0.0, 0.2), (1.0, 0.0)]:
            out, calls = run_recorded(lambda: insitu(nets[0], batch, fusion, w=w, p=p))
            np.testing.assert_array_equal(out, unguided)
            assert [(c[0], c[2]) for c in calls] == [('net', 8)] * (2 * STEPS - 1)
        traces = len(TRACES)
        assert np.abs(insitu(nets[0], batch, fusion, w=1.0, p=0.2) - unguided).max() > 0.1
        assert len(TRACES) == traces  # no new trace for non-zero numbers


def test_a_seed_gives_the_same_image_at_batch_sizes_1_3_8(nets, batch, insitu_runs):
    full = insitu_runs['prefix'][0]
    for subset in ([5, 2, 7], [6]):  # (seed_inputs per seed: tested in test_sampling.py)
        inputs = S.SeedInputs(*(a[np.array(subset)] for a in batch))
        out = np.asarray(insitu(nets[0], inputs))
        assert_close(out, full[subset])


def test_a_wp_sweep_compiles_once(nets, batch):
    net = nets[0]
    first = insitu(net, batch, w=0.5, p=0.1)
    traces = len(TRACES)
    outs = [np.asarray(insitu(net, batch, w=w, p=p)) for w, p in [(1.5, 0.3), (2.0, 0.05)]]
    assert len(TRACES) == traces  # nothing was traced (so nothing compiled) for the new (w, p)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2 and np.abs(np.asarray(first) - outs[0]).max() > 1e-2


def test_interval_skips_real_network_evaluations(nets, batch):
    net = nets[0]
    evals = [s for s, _ in heun_evals(STEPS)]
    for lo, hi in [(1.0, 20.0), (0.01, 2.0)]:
        out, calls = run_recorded(lambda: insitu(net, batch, interval=(lo, hi)))
        inside = [lo < s <= hi for s in evals]
        assert [c[0] for c in calls] == ['net.stacked2' if g else 'net' for g in inside]
        assert 0 < sum(inside) < len(evals)
    traces = len(TRACES)
    insitu(net, batch, interval=(0.5, 3.0), w=2.0, p=0.1)
    assert len(TRACES) == traces  # interval bounds are traced too


def test_sum_of_terms_fused_equals_unfused(nets, batch):
    """in-situ + CFG by null label (both share the main network: one pass over [x; x; x]) + a hybrid
    guide (a separate network with its own dropout, its own pass)."""
    net, gnet = nets
    terms = [M.term('insitu', 0.5, G.Schedule.linear([0.1, 10.0], [0.05, 0.3]), blocks='decoder'),
             M.term('cfg', 0.3), M.term('hybrid', 0.4, 0.1, guide=gnet, blocks='encoder')]
    outs = {}
    for fusion in ('fused', 'unfused'):
        outs[fusion] = run_recorded(lambda: S.sample(net, batch.noise, batch.class_labels, 
                                                     terms=terms, fusion=fusion, num_steps=STEPS,
                                                     keys=batch.keys))
    n_evals = 2 * STEPS - 1
    assert [(c[0], c[2]) for c in outs['fused'][1]] == [('net', 24), ('gnet', 8)] * n_evals
    assert [(c[0], c[2]) for c in outs['unfused'][1]] == ([('net', 8)] * 3 + [('gnet', 8)]) * n_evals
    assert_close(outs['fused'][0], outs['unfused'][0])


def test_guidance_errors(nets, batch):
    net, gnet = nets
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        S.sample(net, batch.noise, batch.class_labels, keys=batch.keys,
                 terms=[M.term('hybrid', 1.0, G.Schedule.linear([1.0, 2.0], [0.1, 1.5]), guide=gnet)])
    with pytest.raises(ValueError, match='unknown blocks'):
        S.sample(net, batch.noise, batch.class_labels, method='insitu', strength=0.1,
                 blocks=['dec.99x99_block0'], keys=batch.keys)
    with pytest.raises(ValueError, match='give no method'):
        S.sample(net, batch.noise, batch.class_labels, method='cfg', terms=[M.term('cfg', 1.0)])
    with pytest.raises(ValueError, match='needs its strength'):
        S.sample(net, batch.noise, batch.class_labels, method='insitu', guidance=2.0, keys=batch.keys)
    with pytest.raises(ValueError, match="'insitu' guides with the main network"):
        S.sample(net, batch.noise, batch.class_labels, method='insitu', guide=gnet, keys=batch.keys)


def test_per_term_interval_and_schedule():
    """Term 1 guides only for σ ∈ (1, 10]; term 2 always, with w(σ) a schedule: D against the formula."""
    x = jnp.arange(6.0).reshape(3, 2)
    keys = jax.random.split(jax.random.key(0), 3)
    w2 = G.Schedule.constant([2.0], [0.5, 1.5])
    denoise = G.guided(scaled(0.5), G.separately(scaled(0.5), scaled(0.2), scaled(0.9)), [1.5, w2],
                       intervals=[G.Interval.sigmas(1.0, 10.0), None])
    for sigma in (0.5, 3.0, 20.0):
        w1 = 1.5 if 1.0 < sigma <= 10.0 else 0.0
        expected = (0.5 + w1 * (0.5 - 0.2) + (0.5 if sigma <= 2.0 else 1.5) * (0.5 - 0.9)) * np.asarray(x)
        np.testing.assert_allclose(np.asarray(denoise(x, jnp.float32(sigma), 0, keys)), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Per-term intervals skip the work of inactive terms.

def test_per_term_interval_runs_its_guide_only_where_active():
    """Generic denoisers: guide 1 has the step interval [1, 4] (4 of 6 steps), guide 2 none. Guide 1
    runs exactly at the 8 evaluations of steps 1–4; D against the formula in a NumPy Heun loop."""
    log, num_steps = [], 6
    denoise = G.guide_with(counting('main', 0.6, log), [counting('g1', 0.8, log), counting('g2', 0.7, log)],
                           [1.0, 0.5], intervals=[G.Interval.steps(1, 4), None])
    inputs = S.seed_inputs(np.arange(2), (3,))
    out = jax.jit(lambda n, k: S.heun_sampler(denoise, n, k, num_steps=num_steps, sigma_max=20.0))(
        inputs.noise, inputs.keys)
    jax.effects_barrier()
    evals = heun_evals(num_steps, 20.0)
    on = [1 <= i <= 4 for _, i in evals]
    assert [name for name, _, _ in log] == sum((['main', 'g1', 'g2'] if a else ['main', 'g2'] for a in on), [])
    assert sum(name == 'g1' for name, _, _ in log) == 8
    t = np.asarray(S.sigma_steps(num_steps, sigma_max=20.0), np.float64)
    # D = a·x with a = 0.6 + 1.0·(0.6 − 0.8)·[1 ≤ i ≤ 4] + 0.5·(0.6 − 0.7)
    x = numpy_heun(lambda x, s, i: (0.6 - 0.2 * (1 <= i <= 4) - 0.05) * x, inputs.noise, t)
    np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-6)


def test_a_separate_guide_with_a_4_step_interval_costs_8_evaluations(nets, batch):
    net, gnet = nets
    steps = 6
    out, calls = run_recorded(lambda: S.sample(
        net, batch.noise, batch.class_labels, num_steps=steps, keys=batch.keys,
        terms=[G.Term(0.4, guide=gnet, interval=G.Interval.steps(1, 4, num_steps=steps))]))
    evals = heun_evals(steps)
    assert [(c[0], c[2]) for c in calls] == sum(([('net', 8), ('gnet', 8)] if 1 <= i <= 4 else [('net', 8)]
                                                 for _, i in evals), [])
    np.testing.assert_allclose([c[1] for c in calls if c[0] == 'gnet'], [s for s, i in evals if 1 <= i <= 4],
                               rtol=1e-6)


# in-situ on (0.5, 30], CFG by null label on (2, 100], autoguidance on (0.05, 1]: over the 11
# evaluations of 6 steps every subset of the two shared terms is active somewhere.
INTERVALS = [(0.5, 30.0), (2.0, 100.0), (0.05, 1.0)]


def interval_terms(gnet, as_schedules=False):
    """The three terms with per-term intervals, or (the previous behaviour: every guide runs at
    every evaluation) with the same intervals written as weight schedules w·[lo < σ ≤ hi]."""
    def term(w, lo_hi, **kw):
        if as_schedules:
            return G.Term(G.Schedule.constant(list(lo_hi), [0.0, w, 0.0]), **kw)
        return G.Term(w, interval=G.Interval.sigmas(*lo_hi), **kw)
    return [term(0.5, INTERVALS[0], perturbation=P.dropout(0.2, 'decoder')), term(0.3, INTERVALS[1], null_label=True),
            term(0.4, INTERVALS[2], guide=gnet)]


def expected_calls(fusion, evals):
    calls = []
    for s, _ in evals:
        a = [int(lo < s <= hi) for lo, hi in INTERVALS]
        if fusion == 'unfused':
            calls += [('net', 8)] + [('net', 8)] * (a[0] + a[1])
        else:  # one fused pass over the active shared terms: prefix-shared (in-situ alone) or [x; x; …]
            calls.append(('net.stacked2', 8) if a[0] and not a[1] else ('net', 8 * (1 + a[0] + a[1])))
        calls += [('gnet', 8)] * a[2]
    return calls


@pytest.mark.parametrize('fusion', ['prefix', 'unfused'])
def test_per_term_intervals_skip_inactive_passes(nets, batch, fusion):
    """Fused shared terms (lax.switch over the active subset) and separate passes (lax.cond) run only
    while active; the result equals the previous behaviour (all guides at every evaluation, the
    intervals as 0/w weight schedules): bit for bit unfused, within batch-size rounding fused."""
    net, gnet = nets
    steps = 6

    def run(as_schedules):
        return run_recorded(lambda: S.sample(net, batch.noise, batch.class_labels, 
                                             terms=interval_terms(gnet, as_schedules), fusion=fusion,
                                             num_steps=steps, keys=batch.keys))
    (gated, calls), (previous, previous_calls) = run(False), run(True)
    evals = heun_evals(steps)
    assert [(c[0], c[2]) for c in calls] == expected_calls(fusion, evals)
    every = [('net', 24), ('gnet', 8)] if fusion == 'prefix' else [('net', 8)] * 3 + [('gnet', 8)]
    # (as weight schedules, where every weight is 0 only the main pass runs: w = 0 skips the guides)
    assert [(c[0], c[2]) for c in previous_calls] == sum(
        (every if any(lo < s <= hi for lo, hi in INTERVALS) else [('net', 8)] for s, _ in evals), [])
    if fusion == 'unfused':
        np.testing.assert_array_equal(gated, previous)
    else:
        assert_close(gated, previous)
    assert np.abs(gated - run_recorded(lambda: S.sample(net, batch.noise, batch.class_labels,
                                                        num_steps=steps))[0]).max() > 1e-2


def test_beyond_the_switch_cap_the_fused_pass_runs_whole_or_not(nets, batch, monkeypatch):
    """With more gated shared terms than MAX_SWITCH_TERMS: all shared guides while any is active,
    the main pass alone while none is."""
    monkeypatch.setattr(D, 'MAX_SWITCH_TERMS', 1)
    net, gnet = nets
    inputs = S.SeedInputs(*(a[:4] for a in batch))  # another shape: a fresh trace under the cap
    out, calls = run_recorded(lambda: S.sample(net, inputs.noise, inputs.class_labels, 
                                               terms=interval_terms(gnet)[:2], fusion='fused', num_steps=6,
                                               keys=inputs.keys))
    on = [any(lo < s <= hi for lo, hi in INTERVALS[:2]) for s, _ in heun_evals(6)]
    assert [(c[0], c[2]) for c in calls] == [('net', 12 if a else 4) for a in on]
    reference = run_recorded(lambda: S.sample(net, inputs.noise, inputs.class_labels, 
                                              terms=interval_terms(gnet, True)[:2], fusion='fused',
                                              num_steps=6, keys=inputs.keys))[0]
    assert_close(out, reference)

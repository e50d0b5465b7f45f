"""Frozen-mask and averaged in-situ guidance on a small random network: one mask per sample along the
trajectory (per σ band), the mean of k dropout passes in one stacked pass, antithetic masks, the
fused pass, one compilation per sweep, p = 0 unguided bit for bit, and the cost."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import EDM2Config
from edm2_jax import denoiser as D
from edm2_jax import guidance as G
from edm2_jax import methods as M
from edm2_jax import perturb as P
from edm2_jax import sampling as S
from helpers import TRACES, Recorded, random_network, run_recorded

STEPS = 4
EVALS = 2 * STEPS - 1
MICRO = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1,),
                   num_blocks=1, attn_resolutions=())


@pytest.fixture(scope='module')
def net():
    return Recorded(random_network(MICRO, 0, gains=(0.4, 1.3)), 'net')


@pytest.fixture(scope='module')
def batch(net):
    return S.network_inputs(net, np.arange(4))


def run(net, inputs, method, w=1.0, p=0.2, fusion='prefix', **options):
    terms = M.terms(method, w, p, blocks='decoder', **options)
    return S.sample(net, inputs.noise, inputs.class_labels, terms=terms, fusion=fusion, num_steps=STEPS,
                    keys=inputs.keys)


def guide_at(net, inputs, term, x, sigma, eval_keys):
    """D_guide of one evaluation, from the guided D at w = 1: D = 2·D_main − D_guide."""
    term = D.prepare_terms(net, [term], jnp.float32)[0]
    denoise = D.edm2_denoiser(net, inputs.class_labels, [term], sample_keys=inputs.keys)
    sigma = jnp.float32(sigma)
    d = denoise(x, sigma, 0, eval_keys)
    d_main = net(x, sigma, inputs.class_labels)
    return np.asarray(2 * d_main - d, np.float64)


def eval_keys(inputs, step, stage):
    return G.fold_keys(G.fold_keys(inputs.keys, step), stage)  # as heun_loop folds them


# ---------------------------------------------------------------------------------------------------
# Frozen masks.

def test_frozen_mask_is_the_same_at_every_evaluation_of_a_sample(net, batch):
    x = batch.noise * 2.0
    frozen = M.term('insitu-frozen', 1.0, 0.3, blocks='decoder')
    fresh = M.term('insitu', 1.0, 0.3, blocks='decoder')
    a, b = (guide_at(net, batch, frozen, x, 2.0, eval_keys(batch, i, s)) for i, s in [(0, 0), (3, 1)])
    np.testing.assert_array_equal(a, b)
    c, d = (guide_at(net, batch, fresh, x, 2.0, eval_keys(batch, i, s)) for i, s in [(0, 0), (3, 1)])
    assert np.abs(c - d).max() > 1e-3  # in-situ draws a new mask at every evaluation


def test_frozen_masks_differ_across_samples(net, batch):
    """Two samples with the same x and label but different seeds: different masks, different guides."""
    same = S.SeedInputs(jnp.repeat(batch.noise[:1], 2, 0), jnp.repeat(batch.class_labels[:1], 2, 0),
                        batch.keys[:2])
    g = guide_at(net, same, M.term('insitu-frozen', 1.0, 0.3, blocks='decoder'), same.noise * 2.0, 2.0,
                 eval_keys(same, 0, 0))
    assert np.abs(g[0] - g[1]).max() > 1e-3


def test_frozen_bands_keep_a_mask_within_a_band_and_draw_anew_across():
    keys = jax.random.split(jax.random.key(7), 3)
    term = G.Term(1.0, perturbation=P.dropout(0.1), frozen=(0.5, 5.0))
    data = lambda s: np.asarray(jax.random.key_data(G.guide_keys(term, 0, keys, keys, jnp.float32(s))))
    np.testing.assert_array_equal(data(1.0), data(4.9))     # band (0.5, 5]
    np.testing.assert_array_equal(data(0.01), data(0.5))    # band (…, 0.5]
    assert not np.array_equal(data(1.0), data(6.0)) and not np.array_equal(data(1.0), data(0.4))
    whole = G.Term(1.0, perturbation=P.dropout(0.1), frozen=())
    once = lambda s: np.asarray(jax.random.key_data(G.guide_keys(whole, 0, keys, keys, jnp.float32(s))))
    np.testing.assert_array_equal(once(0.01), once(80.0))


def test_frozen_sampling_fused_matches_unfused_and_bands_change_it(net, batch):
    out = {f: run(net, batch, 'insitu-frozen', fusion=f) for f in ('prefix', 'unfused')}
    np.testing.assert_allclose(out['prefix'], out['unfused'], rtol=0, atol=1e-4 * np.abs(out['unfused']).max())
    banded = run(net, batch, 'insitu-frozen', bands=(1.0,))
    assert np.abs(np.asarray(banded) - np.asarray(out['prefix'])).max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# Averaged masks.

@pytest.mark.parametrize('fusion', ['prefix', 'unfused'])
def test_averaged_with_k_1_is_insitu(net, batch, fusion):
    np.testing.assert_array_equal(run(net, batch, 'insitu-avg', k=1, fusion=fusion),
                                  run(net, batch, 'insitu', fusion=fusion))


def test_averaged_guide_is_the_mean_of_k_dropout_passes(net, batch):
    """D_guide against k separate network calls with the draws' keys, averaged in NumPy."""
    x, sigma, k, p = batch.noise * 2.0, 2.0, 3, 0.3
    keys = eval_keys(batch, 1, 0)
    got = guide_at(net, batch, M.term('insitu-avg', 1.0, p, blocks='decoder', k=k), x, sigma, keys)
    own = G.fold_keys(keys, 0)  # term 0's stream
    draws = [own] + [G.fold_keys(own, j) for j in range(1, k)]
    passes = [np.asarray(net(x, jnp.float32(sigma), batch.class_labels, perturbation=P.dropout(p, 'decoder'),
                             keys=kj), np.float64) for kj in draws]
    np.testing.assert_allclose(got, np.mean(passes, axis=0), rtol=0, atol=1e-4 * np.abs(got).max())
    assert np.abs(passes[0] - passes[1]).max() > 1e-3


@pytest.mark.parametrize('k', [2, 4])
def test_averaged_runs_as_one_stacked_pass_over_1_plus_k_copies(net, batch, k):
    n = batch.noise.shape[0]
    prefix, pcalls = run_recorded(lambda: run(net, batch, 'insitu-avg', k=k))
    fused, fcalls = run_recorded(lambda: run(net, batch, 'insitu-avg', k=k, fusion='fused'))
    unfused, ucalls = run_recorded(lambda: run(net, batch, 'insitu-avg', k=k, fusion='unfused'))
    assert [(c[0], c[2]) for c in pcalls] == [(f'net.stacked{1 + k}', n)] * EVALS
    assert [(c[0], c[2]) for c in fcalls] == [('net', (1 + k) * n)] * EVALS
    assert [(c[0], c[2]) for c in ucalls] == [('net', n)] * ((1 + k) * EVALS)
    scale = np.abs(unfused).max()
    np.testing.assert_allclose(prefix, unfused, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=1e-4 * scale)


def test_antithetic_copies_drop_disjoint_units_and_keep_the_rate():
    """Two rows with one key and offsets 0, 1/2: dropped where u < p and where (u + 1/2) mod 1 < p."""
    p = 0.3
    key = jax.random.split(jax.random.key(3), 1)
    drop = P.dropout(jnp.float32(p), frozenset({'dec_8x8_block0'})).replace(offset=jnp.array([0.0, 0.5]))
    config = MICRO
    names = [s.name for s in P.block_specs(config) if s.kind == 'block']
    drop = drop.replace(where=frozenset(names))
    noise = P.dropout_noise(config, [drop], jnp.concatenate([key, key]))
    u = np.concatenate([np.asarray(v).reshape(2, -1) for v in noise.values()], axis=1)
    first, second = u[0] < p, u[1] < p
    assert not np.any(first & second)
    np.testing.assert_allclose([first.mean(), second.mean()], [p, p], atol=0.05)
    np.testing.assert_allclose(u[1], np.mod(u[0] + 0.5, 1.0), atol=1e-6)


def test_antithetic_averaged_guide_runs_fused(net, batch):
    plain, _ = run_recorded(lambda: run(net, batch, 'insitu-avg', k=2, fusion='unfused'))
    anti, calls = run_recorded(lambda: run(net, batch, 'insitu-avg', k=2, antithetic=True))
    anti_unfused = run(net, batch, 'insitu-avg', k=2, antithetic=True, fusion='unfused')
    assert [c[0] for c in calls] == ['net.stacked3'] * EVALS
    np.testing.assert_allclose(anti, anti_unfused, rtol=0, atol=1e-4 * np.abs(anti_unfused).max())
    assert np.abs(np.asarray(anti) - plain).max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# Sweeps, p = 0, cost, errors.

@pytest.mark.parametrize('method, options', [('insitu-frozen', {}), ('insitu-avg', dict(k=2))])
def test_a_wp_sweep_compiles_once_and_p_0_is_unguided(net, batch, method, options):
    unguided = np.asarray(S.sample(net, batch.noise, batch.class_labels, num_steps=STEPS))
    first = np.asarray(run(net, batch, method, w=0.5, p=0.1, **options))
    traces = len(TRACES)
    other = np.asarray(run(net, batch, method, w=1.5, p=0.3, **options))
    zero, calls = run_recorded(lambda: run(net, batch, method, w=1.5, p=0.0, **options))
    assert len(TRACES) == traces  # nothing traced for new (w, p)
    np.testing.assert_array_equal(zero, unguided)
    assert [c[0] for c in calls] == ['net'] * EVALS  # the guide pass skipped
    assert np.abs(first - other).max() > 1e-2


def test_cost_comes_from_the_term():
    for k in (1, 2, 4):
        assert M.nfe_per_image([M.term('insitu-avg', 1.0, 0.1, k=k)], MICRO, STEPS) == EVALS * (1 + k)
    assert M.nfe_per_image([M.term('insitu-frozen', 1.0, 0.1)], MICRO, STEPS) == EVALS * 2


@pytest.mark.parametrize('term, message', [
    (G.Term(1.0, perturbation=P.skip(None), average=2), 'random perturbation'),
    (G.Term(1.0, perturbation=P.token_shuffle(), average=2, antithetic=True), 'antithetic'),
    (G.Term(1.0, perturbation=P.dropout(0.1), average=0), 'average'),
    (G.Term(1.0, perturbation=P.dropout(0.1), frozen=(2.0, 1.0)), 'increasing'),
])
def test_draw_errors(net, term, message):
    with pytest.raises(ValueError, match=message):
        D.prepare_terms(net, [term], jnp.float32)


def test_method_options():
    assert M.term('insitu-avg', 1.0, 0.1) == G.Term(1.0, perturbation=P.dropout(0.1), average=2)
    assert M.term('insitu-avg', 1.0, 0.1, k=4, antithetic=True) == \
        G.Term(1.0, perturbation=P.dropout(0.1), average=4, antithetic=True)
    assert M.term('insitu-frozen', 1.0, 0.1, bands=[0.5, 2]) == \
        G.Term(1.0, perturbation=P.dropout(0.1), frozen=(0.5, 2.0))
    with pytest.raises(ValueError, match='no option k'):
        M.term('insitu', 1.0, 0.1, k=2)
    with pytest.raises(ValueError, match='no option bands'):
        M.term('insitu-avg', 1.0, 0.1, bands=(1.0,))


# ---------------------------------------------------------------------------------------------------
# The toy: the same terms through toy.methods.

@pytest.fixture(scope='module')
def toy():
    from edm2_jax.toy import methods as TM
    from edm2_jax.toy import model as TMod
    from helpers import toy_trained_like
    c = TMod.ToyConfig(16)
    models = {'main': TM.Model(toy_trained_like(c, 0), c)}
    noise, keys = TM.start_points(jax.random.key(0), 64)
    return TM, models, noise, keys, TM.time_steps(num_steps=6)


def toy_run(toy, method, **options):
    TM, models, noise, keys, t = toy
    return np.asarray(TM.sample(TM.Method(method, M.terms(method, 2.0, 0.1, **options)), models, noise, keys, t))


def test_toy_averaged_with_k_1_is_insitu_and_k_2_differs(toy):
    insitu = toy_run(toy, 'insitu')
    np.testing.assert_array_equal(toy_run(toy, 'insitu-avg', k=1), insitu)
    for options in (dict(k=2), dict(k=2, antithetic=True)):
        out = toy_run(toy, 'insitu-avg', **options)
        assert np.all(np.isfinite(out)) and np.abs(out - insitu).max() > 1e-4


def test_toy_frozen_guide_is_one_mask_per_sample(toy):
    TM, models, noise, keys, _ = toy
    m = models['main']
    frozen = TM._model_denoiser(m.config, m.params, (P.dropout(jnp.float32(0.3)),), ((), 1, False), keys)
    fresh = TM._model_denoiser(m.config, m.params, (P.dropout(jnp.float32(0.3)),))
    x, sigma = noise * 0.5, jnp.float32(0.5)
    at = lambda d, step: np.asarray(d(x, sigma, step, G.fold_keys(G.fold_keys(keys, step), 0)))  # noqa: E731
    np.testing.assert_array_equal(at(frozen, 1), at(frozen, 4))
    assert np.abs(at(fresh, 1) - at(fresh, 4)).max() > 1e-4
    two = TM._model_denoiser(m.config, m.params, (P.dropout(jnp.float32(0.3)),), ((), 1, False), keys[:2])
    same_x = np.asarray(two(jnp.repeat(x[:1], 2, 0), sigma, 0, keys[:2]))
    assert np.abs(same_x[0] - same_x[1]).max() > 1e-5  # different samples, different masks
    out = toy_run(toy, 'insitu-frozen')
    assert np.all(np.isfinite(out)) and np.abs(out - toy_run(toy, 'insitu')).max() > 1e-4


def test_guidance_config_carries_the_method_options():
    from edm2_jax import guidance_config as C
    from edm2_jax.errors import UserError
    config = C.parse({'terms': [
        {'method': 'insitu-avg', 'w': 1.0, 'strength': 0.1, 'options': {'k': 4, 'antithetic': True}},
        {'method': 'insitu-frozen', 'w': 0.5, 'strength': 0.05, 'options': {'bands': [1.0]}}]})
    assert C.build(config, {}, STEPS) == (G.Term(1.0, perturbation=P.dropout(0.1), average=4, antithetic=True),
                                          G.Term(0.5, perturbation=P.dropout(0.05), frozen=(1.0,)))
    for term, message in [({'method': 'insitu', 'options': {'k': 2}}, 'takes no options'),
                          ({'method': 'insitu-avg', 'options': {'m': 2}}, "unknown key 'm'"),
                          ({'method': 'insitu-avg', 'options': {'k': 'two'}}, 'a bool, a number')]:
        with pytest.raises(UserError, match=message):
            C.parse({'terms': [{'w': 1.0, 'strength': 0.1, **term}]})

"""Call-time perturbations (edm2_jax.perturb): zero strength is the plain network bit for bit, rows are
independent and keyed, one fused pass over the stacked batch equals separate passes, and the math of
attention_identity, skip and window against independent NumPy / per-tile computations. Few distinct
programs are compiled: all kinds sit in one program and are switched per row by their strengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import EDM2Config, Network
from edm2_jax import guidance as G
from edm2_jax import methods as M
from edm2_jax import perturb as P
from edm2_jax import rules as R
from edm2_jax import sampling as S
from edm2_jax.network import _apply
from helpers import Recorded, numpy_heun, random_network, run_recorded

CONFIG = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16)
N = 6
# XLA:CPU vectorises reductions differently for different batch sizes: the same row computed in a
# batch of 6 and of 42 differs by float32 rounding (measured max |Δ| ≈ 1e-6 on D of magnitude ~1).
FUSED_ATOL = 1e-5


def kinds(strengths):
    """All row-wise kinds in one program; strengths[k] is kind k's [N] strength."""
    s = strengths
    return [P.dropout(s[0], 'decoder'), P.skip(['dec.4x4_in1', 'enc.4x4_block0'], s[1]),
            P.attention_identity(None, s[2]), P.attention_blur(s[3]), P.token_shuffle('encoder', s[4]),
            P.sigma_shift(s[5]), P.skip((), 1.0)]  # the last: an empty block set, a no-op


ON = [0.3, 1.0, 1.0, 2.0, 1.0, 0.5]  # the strength of each kind when on


def one_kind(k, n=N):
    s = np.zeros((6, n), np.float32)
    s[k] = ON[k]
    return kinds(jnp.asarray(s))


@pytest.fixture(scope='module')
def setup():
    net = random_network(CONFIG, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 8, 8, 2)).astype(np.float32)
    c = np.eye(3, dtype=np.float32)[rng.integers(0, 3, N)]
    s = np.full(N, 1.3, np.float32)
    keys = jax.random.split(jax.random.key(7), N)
    return net, x, s, c, keys


def test_zero_strength_is_bit_identical(setup):
    net, x, s, c, keys = setup
    plain = np.asarray(net(x, s, c))
    zero = np.asarray(net(x, s, c, perturbation=kinds(jnp.zeros((6, N))), keys=keys))
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(np.asarray(net(x, s, c, perturbation=P.window(8, 3))), plain)  # whole image


def test_rows_independent_keyed_and_deterministic(setup):
    net, x, s, c, keys = setup
    diag = np.diag(ON).astype(np.float32)  # row k: kind k only
    run = lambda x, keys: np.asarray(net(x, s, c, perturbation=kinds(jnp.asarray(diag)), keys=keys))
    a = run(x, keys)
    np.testing.assert_array_equal(run(x, keys), a)  # deterministic for fixed keys
    plain = np.asarray(net(x, s, c))
    assert np.all(np.abs(a - plain).reshape(N, -1).max(axis=1) > 1e-3)  # every kind changes its row
    x2, keys2 = x.copy(), keys.at[5].set(jax.random.key(99)).at[0].set(jax.random.key(98))
    x2[5] = -x2[5]
    b = run(x2, keys2)
    for i in (1, 2, 3, 4):  # rows 0 and 5 changed: nothing else moves
        np.testing.assert_array_equal(b[i], a[i])
    assert np.abs(b[0] - a[0]).max() > 1e-4  # dropout's mask follows the key
    shuffled = [np.asarray(net(x, s, c, perturbation=one_kind(4), keys=k))
                for k in (keys, jax.random.split(jax.random.key(8), N))]
    assert np.all(np.abs(shuffled[0] - shuffled[1]).reshape(N, -1).max(axis=1) > 1e-4)  # keyed shuffle


def test_fused_stacked_pass_equals_separate_passes(setup):
    """[plain; dropout; skip; identity; blur; shuffle; σ-shift] in ONE pass over 7N rows vs one pass each."""
    net, x, s, c, keys = setup
    rows = np.zeros((6, 7, N), np.float32)
    for k in range(6):
        rows[k, 1 + k] = ON[k]
    keys7 = jnp.concatenate([keys] * 7)
    fused = np.asarray(net.stacked(x, s, c, copies=7, perturbation=kinds(jnp.asarray(rows.reshape(6, -1))),
                                   keys=keys7)).reshape(7, N, 8, 8, 2)
    separate = [np.asarray(net(x, s, c))] + [np.asarray(net(x, s, c, perturbation=one_kind(k), keys=keys))
                                              for k in range(6)]
    for j in range(7):
        np.testing.assert_allclose(fused[j], separate[j], rtol=0, atol=FUSED_ATOL, err_msg=str(j))


def test_prefix_sharing_with_several_guides(setup):
    """Guides perturbing only decoder blocks: the encoder runs once on N rows, the result is the same."""
    net, x, s, c, keys = setup
    strengths = np.zeros((2, 3, N), np.float32)
    strengths[0, 1], strengths[1, 2] = 1.0, 1.0
    perts = lambda st: [P.skip(['dec.8x8_block0'], st[0]), P.attention_identity('decoder', st[1])]
    flat = jnp.asarray(strengths.reshape(2, -1))
    shared = np.asarray(net.stacked(x, s, c, copies=3, perturbation=perts(flat)))
    full = np.asarray(net.stacked(x, s, c, copies=3, perturbation=perts(flat), share_prefix=False))
    np.testing.assert_allclose(shared, full, rtol=0, atol=FUSED_ATOL)
    assert np.abs(shared[N:2 * N] - shared[:N]).max() > 1e-3 and np.abs(shared[2 * N:] - shared[:N]).max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# Independent math (NumPy, float64) on one attention block: enc.4x4_block0 (conv_skip 16 → 32, 2 heads).

def np_normalize(x, axis):
    return x / (1e-4 + np.sqrt(np.mean(np.square(x), axis=axis, keepdims=True)))


def np_weight(w, gain=1.0):
    w = np.asarray(w, np.float64)
    return np_normalize(w, tuple(range(w.ndim - 1))) * gain / np.sqrt(np.prod(w.shape[:-1]))


def np_conv(x, w):
    """NHWC 'same' convolution with an HWIO kernel."""
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, wd = x.shape[1:3]
    return sum(np.einsum('nhwi,io->nhwo', xp[:, i:i + h, j:j + wd], w[i, j]) for i in range(kh) for j in range(kw))


def np_silu(x):
    return x / (1 + np.exp(-x)) / 0.596


def np_sum(a, b, t):
    return ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t ** 2)


def block_reference(p, x, emb, mode):
    """enc.4x4_block0 by hand: mode 'plain' | 'identity' (attention output attn_proj(v)) | 'skip'."""
    x = np_normalize(np_conv(x, np_weight(p['conv_skip']['weight'])), -1)
    if mode == 'skip':
        return np.clip(x, -256, 256)
    y = np_conv(np_silu(x), np_weight(p['conv_res0']['weight']))
    scale = emb @ np_weight(p['emb_linear']['weight'], float(p['emb_gain'])) + 1
    y = np_conv(np_silu(y * scale[:, None, None, :]), np_weight(p['conv_res1']['weight']))
    x = np_sum(x, y, 0.3)
    n, h, w, ch = x.shape
    qkv = np_conv(x, np_weight(p['attn_qkv']['weight'])).reshape(n, h * w, 2, ch // 2, 3)
    qkv = np_normalize(qkv, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    if mode == 'identity':
        a = v
    else:
        logits = np.einsum('nqhc,nkhc->nhqk', q, k) / np.sqrt(ch // 2)
        wts = np.exp(logits - logits.max(-1, keepdims=True))
        a = np.einsum('nhqk,nkhc->nqhc', wts / wts.sum(-1, keepdims=True), v)
    a = np_conv(a.reshape(n, h, w, ch), np_weight(p['attn_proj']['weight']))
    return np.clip(np_sum(x, a, 0.3), -256, 256)


def test_attention_identity_and_skip_match_the_documented_formulas(setup):
    net, x, s, c, keys = setup
    name = 'enc.4x4_block0'
    strengths = np.zeros((2, N), np.float32)
    strengths[0, :2], strengths[1, 2:4] = 1.0, 1.0  # rows 0-1 identity, 2-3 skip, 4-5 plain
    perts = P.check_strengths(P.resolve(CONFIG, [P.attention_identity([name], strengths[0]),
                                                 P.skip([name], strengths[1])]), N)
    apply = jax.jit(lambda v, x, s, c, perts: net.module.apply(v, x, s, c, perts, mutable=['intermediates']))
    _, state = apply(net.variables, jnp.asarray(x), jnp.asarray(s), jnp.asarray(c), perts)
    acts = {k: np.asarray(v[0], np.float64) for k, v in state['intermediates']['unet'].items()}
    params = jax.tree.map(np.asarray, net.variables['params']['unet']['enc_4x4_block0'])
    x_in, emb = acts['enc.4x4_down'], acts['emb']
    for rows, mode in [(slice(0, 2), 'identity'), (slice(2, 4), 'skip'), (slice(4, 6), 'plain')]:
        expected = block_reference(params, x_in[rows], emb[rows], mode)
        np.testing.assert_allclose(acts[name][rows], expected, rtol=0, atol=2e-5 * np.abs(expected).max(),
                                   err_msg=mode)
    assert np.abs(block_reference(params, x_in[:2], emb[:2], 'plain') - acts[name][:2]).max() > 1e-3


def test_window_with_tiles_equals_the_network_on_each_tile(setup):
    net, x, s, c, keys = setup
    out = np.asarray(net(x, s, c, perturbation=P.window(4, 4)))
    for i in (0, 4):
        for j in (0, 4):
            tile = _apply(CONFIG, net.dtype, net.variables, jnp.asarray(x[:, i:i + 4, j:j + 4]), jnp.asarray(s),
                          jnp.asarray(c))
            np.testing.assert_allclose(out[:, i:i + 4, j:j + 4], np.asarray(tile), rtol=0, atol=FUSED_ATOL)
    overlapping = np.asarray(net(x, s, c, perturbation=P.window(4, 2)))  # 9 crops, averaged
    assert np.abs(overlapping - out).max() > 1e-3


def test_blur_matrix_and_shuffle_are_what_they_say():
    k = np.asarray(P.gaussian_matrix(5, jnp.array([1.0, np.inf])))
    i = np.arange(5)
    g = np.exp(-(i[:, None] - i[None]) ** 2 / 2.0)
    np.testing.assert_allclose(k[0], g / g.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(k[1], np.full((5, 5), 0.2), rtol=1e-6)  # σ = inf: the mean
    x = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 3, 1)
    y = np.asarray(P.shuffle_positions(x, jax.random.split(jax.random.key(0), 2)))
    for r in range(2):
        assert sorted(y[r].ravel()) == sorted(np.asarray(x[r]).ravel())  # a permutation of the row's own
    assert not np.array_equal(y, np.asarray(x))


# ---------------------------------------------------------------------------------------------------
# Guidance: a 3-term composition, counted; APG; presets; errors.

def test_three_terms_cost_what_they_should(setup):
    """in-situ + PAG (both the main network: ONE pass over 3N rows, the encoder prefix shared) +
    autoguidance (its own network: one pass over N rows), per evaluation; equal to one pass per term."""
    net = Recorded(setup[0], 'net')
    gnet = Recorded(random_network(CONFIG, seed=4), 'gnet')
    inputs = S.network_inputs(net, np.arange(4))
    terms = [M.term('insitu', 0.5, 0.1, blocks='decoder'), M.term('pag', 0.3, blocks='decoder'),
             M.term('autoguidance', 0.4, guide=gnet)]
    steps, outs = 2, {}
    for fusion in ('prefix', 'unfused'):
        outs[fusion], calls = run_recorded(lambda: S.sample(net, inputs.noise, inputs.class_labels, terms=terms,
                                                            fusion=fusion, num_steps=steps, keys=inputs.keys))
        outs[fusion + '_calls'] = [(name, rows) for name, _, rows in calls]
    n_evals = 2 * steps - 1
    assert outs['prefix_calls'] == [('net.stacked3', 4), ('gnet', 4)] * n_evals
    assert outs['unfused_calls'] == [('net', 4), ('net', 4), ('net', 4), ('gnet', 4)] * n_evals
    b = outs['unfused']
    assert np.abs(outs['prefix'] - b).max() <= 1e-4 * np.abs(b).max()


def np_apg(deltas, mains, eta, r, beta):
    """Sadat et al. 2025, Algorithm 1, per example and per call (float64)."""
    run, out = np.zeros_like(deltas[0]), []
    for d, m in zip(deltas, mains):
        run = d + beta * run
        d = run.copy()
        if r > 0:
            norm = np.sqrt((d ** 2).sum(axis=(1, 2), keepdims=True))
            d = d * np.minimum(1, r / norm)
        u = m / np.sqrt((m ** 2).sum(axis=(1, 2), keepdims=True))
        par = (d * u).sum(axis=(1, 2), keepdims=True) * u
        out.append(d - par + eta * par)
    return out


def test_apg_rule():
    rng = np.random.default_rng(1)
    deltas, mains = rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 4, 5, 2))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    at = R.At(jnp.zeros((4, 5, 2)), jnp.float32(1.0), jnp.int32(0))  # APG looks at neither
    linear, _ = R.APG(1.0, 0.0, 0.0)(2.0, f32(mains[0]), f32(mains[0] - deltas[0]), at, jnp.zeros((4, 5, 2)))
    np.testing.assert_allclose(np.asarray(linear), 2 * deltas[0], rtol=0, atol=1e-5)  # η = 1, no r, no β: linear
    for eta, r, beta in [(0.0, 2.0, -0.5), (0.5, 0.0, 0.3)]:
        rule, state, got = R.APG(eta, r, beta), jnp.zeros((4, 5, 2)), []
        for d, m in zip(deltas, mains):
            out, state = rule(1.0, f32(m), f32(m - d), at, state)
            got.append(np.asarray(out))
        np.testing.assert_allclose(got, np_apg(deltas, mains, eta, r, beta), rtol=1e-5, atol=1e-5)


def test_apg_momentum_is_sampler_state():
    """With analytic denoisers, the Heun sampler carries APG's running average across evaluations."""
    main = lambda x, s, i, k: 0.5 * x  # noqa: E731
    guide = lambda x, s, i, k: 0.2 * x + 0.1  # noqa: E731
    rule = R.APG(0.0, 0.0, -0.5)
    denoise = G.guided(main, G.separately(main, guide), [jnp.float32(1.0)], rules=[rule])
    inputs = S.seed_inputs(np.arange(3), (4, 2))
    out = np.asarray(S.heun_sampler(denoise, inputs.noise, inputs.keys, num_steps=3, sigma_max=5.0))
    t = np.asarray(S.sigma_steps(3, sigma_max=5.0), np.float64)
    run = np.zeros((3, 4, 2))

    def D(x, sigma, step):
        nonlocal run
        dm, dg = 0.5 * x, 0.2 * x + 0.1
        run = (dm - dg) + -0.5 * run
        u = dm / np.sqrt((dm ** 2).sum(axis=(1, 2), keepdims=True))
        par = (run * u).sum(axis=(1, 2), keepdims=True) * u
        return dm + (run - par)
    np.testing.assert_allclose(out, numpy_heun(D, inputs.noise, t), rtol=1e-4, atol=1e-5)
    linear = np.asarray(S.heun_sampler(G.guide_with(main, [guide], [1.0]), inputs.noise, inputs.keys,
                                       num_steps=3, sigma_max=5.0))
    assert np.abs(out - linear).max() > 1e-3


def test_errors_before_compiling():
    no_attn = CONFIG.replace(attn_resolutions=(), channels_per_head=64)  # 0 heads, even in the bottleneck
    with pytest.raises(ValueError, match='has none'):
        P.resolve(no_attn, P.attention_identity())
    with pytest.raises(ValueError, match='none of the blocks'):
        P.resolve(CONFIG, P.attention_blur(1.0, ['enc.8x8_block0']))
    with pytest.raises(ValueError, match='unknown blocks'):
        P.resolve(CONFIG, P.skip(['dec.99x99_block0']))
    with pytest.raises(ValueError, match='window size'):
        P.resolve(CONFIG, P.window(16))
    with pytest.raises(ValueError, match='multiple of 2'):
        P.resolve(CONFIG, P.window(3))
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        P.resolve(CONFIG, P.dropout(1.0))
    with pytest.raises(ValueError, match='δ > -1'):
        P.resolve(CONFIG, P.sigma_shift(-1.0))
    with pytest.raises(ValueError, match='cannot be combined'):
        P.resolve(CONFIG, [P.window(4), P.skip()])
    assert P.select_blocks(CONFIG, '4x4') == P.select_blocks(CONFIG, 4) and len(P.select_blocks(CONFIG, 4)) == 6
    net = Network(no_attn, {})
    noise = np.zeros((2, 8, 8, 2), np.float32)
    with pytest.raises(ValueError, match='has none'):
        S.sample(net, noise, method='pag')
    with pytest.raises(ValueError, match='need keys'):
        Network(CONFIG, {})(noise, 1.0, perturbation=P.token_shuffle())


def test_dropout_noise_is_drawn_only_for_perturbed_rows():
    """A dropout with rows (start, stop) draws uniforms for those rows alone (the clean rows of a
    fused batch get 1: keep everything), and the drawn rows equal a full draw's: row i's noise
    depends only on keys[i], so nothing else changes."""
    keys = jax.random.split(jax.random.key(0), 8)
    full = P.check_strengths(P.resolve(CONFIG, P.dropout(0.1, 'decoder')), 8)
    part = tuple(p.replace(rows=(4, 8)) for p in full)
    a, b = P.dropout_noise(CONFIG, full, keys), P.dropout_noise(CONFIG, part, keys)
    assert set(a) == set(b) == P.select_blocks(CONFIG, 'decoder')
    for name in a:
        np.testing.assert_array_equal(np.asarray(b[name][4:]), np.asarray(a[name][4:]))
        np.testing.assert_array_equal(np.asarray(b[name][:4]), 1.0)

"""The method registry (edm2_jax.methods): what each entry builds, its argument checks, the one block
selector behind every spelling, and the evaluation count against a closed form."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_network
from edm2_jax import EDM2Config, Term
from edm2_jax import guidance as G
from edm2_jax import methods as M
from edm2_jax import perturb as P
from edm2_jax import sampling as S

CONFIG = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16)


def test_every_method_builds_its_term():
    guide = types.SimpleNamespace(config=CONFIG.replace(label_dim=0))
    assert M.terms('none', 1.0) == ()
    assert M.term('cfg', 1.5) == Term(1.5, None, null_label=True)
    assert M.term('cfg', 1.5, guide=guide) == Term(1.5, guide)
    assert M.term('autoguidance', 2.0, guide=guide) == Term(2.0, guide)
    assert M.term('insitu', 1.0, 0.1, blocks='decoder') == Term(1.0, perturbation=P.dropout(0.1, 'decoder'))
    assert M.term('hybrid', 1.0, 0.1, guide=guide) == Term(1.0, guide, perturbation=P.dropout(0.1))
    assert M.term('pag', 1.0) == Term(1.0, perturbation=P.attention_identity(None, 1.0))
    assert M.term('slg', 1.0, blocks='dec.4x4') == Term(1.0, perturbation=P.skip('dec.4x4', 1.0))
    assert M.term('seg', 1.0) == Term(1.0, perturbation=P.attention_blur(10.0))
    assert M.term('tpg', 1.0) == Term(1.0, perturbation=P.token_shuffle(None, 1.0))
    assert M.term('sigma-shift', 1.0, 0.2) == Term(1.0, perturbation=P.sigma_shift(0.2))
    assert M.term('swg', 1.0, window=(4, 2)) == Term(1.0, perturbation=P.window(4, 2))
    assert M.term('history', 2.0, guide=guide) == Term(2.0, guide)
    assert set(M.NAMES) == {'none', 'cfg', 'autoguidance', 'insitu', 'insitu-frozen', 'insitu-avg', 'hybrid',
                            'pag', 'slg', 'seg', 'tpg', 'sigma-shift', 'swg', 'history'}


@pytest.mark.parametrize('name, kwargs, message', [
    ('autoguidance', {}, 'needs a guide'),
    ('insitu', {}, 'needs its strength'),
    ('insitu', dict(guide='g'), 'main network itself'),
    ('none', dict(strength=0.1), 'has no strength'),
    ('cfg', dict(blocks='decoder'), 'no block selection'),
    ('pag', dict(window=(4, 2)), 'no window'),
    ('magic', {}, 'unknown guidance method'),
])
def test_argument_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.term(name, 1.0, **kwargs)


def test_weight_is_g_minus_one():
    assert M.weight(2.5) == 1.5
    schedule = M.weight(G.Schedule.linear([0.1, 1.0], [2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(schedule.values), [1.0, 2.0])


def test_one_block_selector_for_every_spelling():
    names = lambda where: P.select_blocks(CONFIG, where)  # noqa: E731
    dec4 = {'dec.4x4_in0', 'dec.4x4_in1', 'dec.4x4_block0', 'dec.4x4_block1'}
    assert names('dec.4x4') == dec4
    assert names('4x4') == names(4) == dec4 | {'enc.4x4_down', 'enc.4x4_block0'}
    assert names('dec_4x4_in0,dec.4x4_in1') == names(['dec.4x4_in0', 'dec_4x4_in1']) == {'dec.4x4_in0', 'dec.4x4_in1'}
    assert names('decoder') == {s for s in names('all') if s.startswith('dec.')}
    assert names(['bottleneck', 'enc.8x8']) == {'dec.4x4_in0', 'dec.4x4_in1', 'enc.8x8_block0'}
    assert P.default_where(CONFIG, 'skip') == 'dec.4x4'
    with pytest.raises(ValueError, match='unknown blocks'):
        names('dec.99x99')


def test_a_level_selection_works_for_dropout_at_every_entry_point():
    """The drifted-selector bug: `sample(method='insitu', blocks='4x4')` used to raise 'unknown blocks'
    while `perturb.dropout(p, '4x4')` worked; both now go through `perturb.select_blocks`."""
    net = random_network(CONFIG, seed=3)  # non-zero gains: every block matters
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    keys = jax.random.split(jax.random.key(2), 2)
    by_rate = net(x, 1.0, None, dropout_rate=0.3, blocks='4x4', keys=keys)
    by_perturbation = net(x, 1.0, None, perturbation=P.dropout(0.3, '4x4'), keys=keys)
    np.testing.assert_array_equal(np.asarray(by_rate), np.asarray(by_perturbation))
    assert np.abs(np.asarray(by_rate) - np.asarray(net(x, 1.0, None))).max() > 1e-3
    inputs = S.network_inputs(net, np.arange(2))
    named = S.sample(net, inputs.noise, inputs.class_labels, method='insitu', guidance=2.0, strength=0.3,
                     blocks='4x4', num_steps=2, keys=inputs.keys)
    term = Term(jnp.float32(1.0), perturbation=P.dropout(0.3, '4x4'))
    composed = S.sample(net, inputs.noise, inputs.class_labels, terms=[term], num_steps=2, keys=inputs.keys)
    np.testing.assert_array_equal(np.asarray(named), np.asarray(composed))


def heun_sigmas(n):
    t = np.asarray(S.sigma_steps(n), np.float32)
    return [(i, t[i]) for i in range(n)] + [(i, t[i + 1]) for i in range(n - 1)]  # Euler, then corrections


def test_nfe_closed_form():
    n, (lo, hi) = 8, (0.28, 5.42)
    evals = heun_sigmas(n)
    insitu = M.terms('insitu', 1.0, 0.1)
    assert M.nfe_per_image((), CONFIG, n) == 2 * n - 1
    assert M.nfe_per_image(insitu, CONFIG, n) == 2 * (2 * n - 1)
    inside = sum(np.float32(lo) < s <= np.float32(hi) for _, s in evals)
    assert 0 < inside < 2 * n - 1
    assert M.nfe_per_image(insitu, CONFIG, n, (lo, hi)) == 2 * n - 1 + inside
    by_step = Term(1.0, perturbation=P.dropout(0.1), interval=G.Interval.steps(2, 4))
    assert M.nfe_per_image([by_step], CONFIG, n) == 2 * n - 1 + sum(2 <= i <= 4 for i, _ in evals)
    # swg on 16×16 (U-Net granularity 2): 8×8 windows at stride 4 → 3 × 3 crops of a quarter image each.
    cfg16 = types.SimpleNamespace(img_resolution=16, channel_mult=(1, 2))
    swg = M.terms('swg', 1.0)
    assert M.guide_cost(swg[0], cfg16) == 9 / 4
    assert M.nfe_per_image(swg, cfg16, 5) == 9 * (1 + 9 / 4)


def test_help_names_every_method():
    text = M.help_text()
    for name in M.NAMES:
        assert f'{name}: ' in text


def test_cfg_guide_by_name():
    """The toy names its guide models ('cfg'); a conditional guide network is still refused."""
    (term,) = M.terms('cfg', 2.0, guide='cfg')
    assert term.guide == 'cfg' and not term.null_label
    with pytest.raises(ValueError, match='unconditional'):
        M.terms('cfg', 2.0, guide=types.SimpleNamespace(config=types.SimpleNamespace(label_dim=10)))

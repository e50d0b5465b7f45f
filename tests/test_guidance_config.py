"""Guidance configurations (edm2_jax.guidance_config): a composite configuration survives a JSON round
trip and gives the same samples bit for bit as the terms written in Python; unknown keys and bad
values are one error naming their key path; `generate --guidance_config` equals the same flags."""
import copy
import json
import subprocess

import numpy as np
import pytest

from edm2_jax import EDM2Config
from helpers import ROOT, cpu_env, generate_cmd, random_network, write_tiny_checkpoint
from edm2_jax import guidance as G
from edm2_jax import guidance_config as C
from edm2_jax import methods as M
from edm2_jax import rules as R
from edm2_jax import sampling as S
from edm2_jax.errors import UserError

STEPS = 4
CONFIG = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), channels_per_head=16)  # PAG has maps at 4×4
COMPOSITE = {'terms': [
    {'method': 'insitu', 'w': {'linear': {'sigmas': [0.1, 10.0], 'values': [0.2, 0.8]}},
     'strength': {'constant': {'sigmas': [1.0], 'values': [0.05, 0.2]}}, 'blocks': 'decoder'},
    {'method': 'pag', 'w': 0.3, 'interval': {'sigmas': [0.5, 'inf']}, 'rule': {'name': 'rescale', 'phi': 0.5}},
    {'method': 'autoguidance', 'w': 0.4, 'guide': 'gnet', 'interval': {'fractions': [0.25, 1.0]},
     'rule': {'name': 'apg', 'eta': 0.0, 'momentum': -0.5}},
]}


def python_terms(gnet):
    """COMPOSITE written with the library's constructors."""
    return (M.term('insitu', G.Schedule.linear([0.1, 10.0], [0.2, 0.8]),
                   G.Schedule.constant([1.0], [0.05, 0.2]), blocks='decoder'),
            M.term('pag', 0.3).replace(interval=G.Interval.sigmas(0.5, float('inf')), rule=R.Rescale(0.5)),
            M.term('autoguidance', 0.4, guide=gnet).replace(interval=G.Interval.fractions(0.25, 1.0, STEPS),
                                                           rule=R.APG(0.0, momentum=-0.5)))


def test_round_trip_gives_the_same_samples(tmp_path):
    net, gnet = random_network(CONFIG, seed=3), random_network(CONFIG, seed=4)
    inputs = S.network_inputs(net, np.arange(3))
    config = C.parse(COMPOSITE)
    C.write(tmp_path / 'g.json', config)
    again = C.read(tmp_path / 'g.json')
    assert again == config and json.loads((tmp_path / 'g.json').read_text())['terms'][1]['interval'] == \
        {'sigmas': [0.5, 'inf']}

    def run(terms):
        return np.asarray(S.sample(net, inputs.noise, inputs.class_labels, terms=terms, num_steps=STEPS,
                                   keys=inputs.keys))
    reread = run(C.build(again, {'gnet': gnet}, STEPS))
    np.testing.assert_array_equal(reread, run(python_terms(gnet)))
    np.testing.assert_array_equal(reread, run(C.build(config, {'gnet': gnet}, STEPS)))
    assert np.isfinite(reread).all()


def changed(path, value):
    """COMPOSITE with the value at `path` (keys and indices) replaced; value DELETE removes it."""
    obj = copy.deepcopy(COMPOSITE)
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return obj


DELETE = object()


@pytest.mark.parametrize('path, value, message', [
    (('terms', 0, 'weight'), 1.0, "terms[0].weight: unknown key 'weight'"),
    (('terms', 1, 'rule', 'phi'), 1.5, 'terms[1].rule: Rescale phi needs φ in [0, 1]'),
    (('terms', 1, 'rule', 'beta'), 0.1, "terms[1].rule.beta: unknown key 'beta'"),
    (('terms', 1, 'rule', 'name'), 'cfg++', 'terms[1].rule: needs "name", one of apg'),
    (('terms', 2, 'w'), 'big', 'terms[2].w: must be a finite number, got "big"'),
    (('terms', 2, 'w'), True, 'terms[2].w: must be a finite number, got true'),
    (('terms', 2, 'w'), DELETE, 'terms[2].w: missing'),
    (('terms', 0, 'method'), 'insitu-guidance', 'terms[0].method: needs a guidance method'),
    (('terms', 0, 'strength'), DELETE, "terms[0]: method 'insitu' needs its strength"),
    (('terms', 1, 'guide'), 'gnet', "terms[1]: method 'pag' guides with the main network"),
    (('terms', 1, 'interval'), {'sigmas': [2.0, 1.0]}, 'terms[1].interval.sigmas: the guidance interval'),
    (('terms', 1, 'interval'), {'percent': [0, 50]}, 'terms[1].interval: must be one of'),
    (('terms', 2, 'interval', 'fractions'), [0.5, 1.5], 'terms[2].interval.fractions: guidance fractions'),
    (('terms', 0, 'w', 'linear', 'sigmas'), [10.0, 0.1], 'terms[0].w: schedule σ knots must be positive'),
    (('terms', 0, 'w', 'cubic'), {}, 'terms[0].w: a schedule has one key'),
    (('terms',), [], 'terms: needs a non-empty list'),
    (('version',), 2, "version: unknown key 'version'"),
])
def test_bad_keys_and_values_name_their_path(path, value, message):
    with pytest.raises(UserError) as e:
        C.parse(changed(path, value), 'g.json')
    assert f'g.json: {message}' in str(e.value)


def test_unreadable_file_is_one_error(tmp_path):
    (tmp_path / 'g.json').write_text('{"terms": [')
    with pytest.raises(UserError, match='g.json: cannot be read as JSON'):
        C.read(tmp_path / 'g.json')
    with pytest.raises(UserError, match='no network for guide role'):
        C.build(C.parse(COMPOSITE), {}, STEPS)


@pytest.mark.slow
def test_generate_from_a_config_equals_the_flags(tmp_path):
    """The same images from --guidance_config as from --method flags; run.json and summary.json hold
    the configuration; bad combinations fail before loading (one line)."""
    _cmd, _env = generate_cmd, cpu_env
    net = write_tiny_checkpoint(tmp_path / 'net')
    config = {'terms': [{'method': 'insitu', 'w': 1.0, 'strength': 0.1, 'blocks': 'decoder',
                         'rule': {'name': 'zero-star', 'zero_init_steps': 1}}]}
    (tmp_path / 'g.json').write_text(json.dumps(config))
    common = [f'--net={net}', '--seeds=0-2', '--num_steps=3', '--batch=3', '--save_npz', '--progress=false']

    def generate(name, *args):
        r = subprocess.run(_cmd(*common, f'--outdir={tmp_path / name}', *args), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
        return r
    by_config = generate('config', f'--guidance_config={tmp_path / "g.json"}')
    assert by_config.returncode == 0, by_config.stderr[-3000:]
    # the same term without the rule through flags, then the rule's effect checked against it
    plain = {'terms': [dict(config['terms'][0])]}
    del plain['terms'][0]['rule']
    (tmp_path / 'plain.json').write_text(json.dumps(plain))
    by_flags = generate('flags', '--method=insitu', '--guidance=2', '--strength=0.1', '--blocks=decoder')
    by_plain = generate('plain', f'--guidance_config={tmp_path / "plain.json"}')
    assert by_flags.returncode == 0 and by_plain.returncode == 0, by_flags.stderr[-3000:] + by_plain.stderr[-3000:]
    for seed in range(3):
        x = {name: np.load(tmp_path / name / f'{seed:06d}.npz')['x'] for name in ('config', 'flags', 'plain')}
        np.testing.assert_array_equal(x['plain'], x['flags'])
        assert np.abs(x['config'] - x['flags']).max() > 1e-3  # the rule does something
    for name in ('run.json', 'summary.json'):
        stored = json.loads((tmp_path / 'config' / name).read_text())['settings']['guidance_config']
        assert stored == C.parse(config)
    for args, message in [(['--method=insitu'], 'do not also give --method'),
                          (['--gnet=' + str(net)], 'no term uses "guide": "gnet"')]:
        r = generate('bad', f'--guidance_config={tmp_path / "g.json"}', *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count('\n') == 1, r.stderr[-2000:]
    assert not (tmp_path / 'bad').exists()

"""The guidance study (edm2_jax.study, experiments/study.py) on tiny random networks, scored by
the real Fashion-MNIST evaluator trained for a few steps: tuning/report protocol, result files,
resume, outputs. Expected values are computed here independently (numpy argmin / std, closed-form
NFE); the evaluator itself is tested in its own file.
"""
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import random_network

CONFIG = dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=8, channel_mult=(1, 2),
              num_blocks=1, attn_resolutions=(8,), channels_per_head=8)
METHODS = ['none', 'insitu-schedule', 'apg']   # the schedule brings 'insitu' (its base)
STEPS, TUNE_N, REPORT_N, SETS = 3, 15, 20, 3


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    """main and guide (same architecture, other seed) as checkpoint directories."""
    from edm2_jax import checkpoint
    from edm2_jax.config import EDM2Config
    root = tmp_path_factory.mktemp('nets')
    for name, seed in (('main', 0), ('guide', 1)):
        checkpoint.save(root / name, random_network(EDM2Config(**CONFIG), seed))
    return root


@pytest.fixture(scope='module')
def scorer(tmp_path_factory):
    """The real evaluator, trained for a few steps into a temporary cache (precision/recall against
    500 test features, for speed)."""
    from edm2_jax.metrics import fmnist
    from experiments import study
    cache = tmp_path_factory.mktemp('evaluator')
    fmnist.load_or_train_evaluator(cache, fmnist.TrainSettings(steps=40, batch_size=64), log=None)
    score = study.fmnist_scorer(cache, pr_refs=500, log=None)
    score.evaluator.batch_size = REPORT_N    # the classifier's call size (default 500: padding)
    return score


def protocol():
    from edm2_jax.study.protocol import Protocol
    return Protocol(num_steps=STEPS, tune_n=TUNE_N, report_n=REPORT_N, report_sets=SETS, batch=10,
                    grid_n=20, quick=True)


def run(nets, score, out, log=lambda s: None):
    from edm2_jax import checkpoint
    from edm2_jax.study import grids as SM
    from edm2_jax.study.runner import run_study
    from experiments import study
    guide = checkpoint.load(nets / 'guide')
    return run_study({'main': checkpoint.load(nets / 'main')},
                     lambda net: SM.Context(net.config, guide), score, out, protocol(),
                     only=METHODS, reference=study.train_split_sets(protocol()),
                     evaluator=getattr(score, 'info', None), log=log)


@pytest.fixture(scope='module')
def study_run(nets, scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp('study')
    return out, run(nets, scorer, out)


def t_steps(n, lo=0.002, hi=80.0, rho=7.0):
    i = np.arange(n)
    return (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


@pytest.mark.slow
def test_results_structure_and_protocol(study_run):
    out, res = study_run
    methods = res['models']['main']
    assert set(methods) == {'none', 'insitu', 'insitu-schedule'} | {m for m in methods if m.startswith('apg-')}
    assert sum(m.startswith('apg-') for m in methods) == 1
    for name, entry in methods.items():
        tuned = [sid for sid, e in entry.items() if e['tuned']]
        assert len(tuned) == 1, name
        fds = {sid: e['tune']['fd_fmnist'] for sid, e in entry.items()}
        assert tuned[0] == min(fds, key=fds.get), name          # the tuned point is the grid's argmin
        for e in entry.values():
            assert all(np.isfinite(v) for v in e['tune'].values())
            assert set(e['tune']) == {'fd_fmnist', 'precision', 'recall', 'class_accuracy'}
        rep = entry[tuned[0]]['report']
        for k, s in rep.items():
            assert len(s['values']) == SETS
            assert np.isclose(s['mean'], np.mean(s['values'])) and np.isclose(s['std'], np.std(s['values'], ddof=1))
            assert np.all(np.isfinite(s['values']))
    assert len(methods['insitu']) == 4                             # the quick (w, p) grid
    base = tuned_entry(methods['insitu'])['setting']               # schedules sit on in-situ's tuned point
    w, p = base['w'], base['p']
    assert sorted(tuple(e['setting'].values()) for e in methods['insitu-schedule'].values()) == sorted(
        [(w, w, p / 4, p), (w, w, p, p / 4), (0.0, w, p, p), (w, 0.0, p, p)])
    none = tuned_report(methods['none'])
    for entry in methods.values():                                 # paired differences per report set
        for k, d in tuned_entry(entry)['vs_none'].items():
            want = np.array(tuned_report(entry)[k]['values']) - np.array(none[k]['values'])
            np.testing.assert_allclose(d['values'], want, atol=1e-12)
            assert np.isclose(d['mean'], want.mean()) and np.isclose(d['std'], np.std(want, ddof=1))
    assert all(v == 0 for v in tuned_entry(methods['none'])['vs_none']['fd_fmnist']['values'])
    # Real images beat samples of a random network on every method (a robust ordering).
    floor = res['data']['main']['fd_fmnist']['mean']
    assert all(floor < tuned_report(e)['fd_fmnist']['mean'] for e in methods.values())
    # The grid of a method runs through one compilation (numbers are traced).
    assert res['meta']['compiles_this_run']['main/insitu'] <= 1
    # APG sits on the guided method with the lowest tuning FD, at that method's tuned setting.
    guided = {n: min(e['tune']['fd_fmnist'] for e in methods[n].values()) for n in methods
              if n != 'none' and not n.startswith('apg-')}
    best = min(guided, key=guided.get)
    apg = methods[f'apg-{best}']
    best_setting = tuned_entry(methods[best])['setting']
    assert all({k: e['setting'][k] for k in best_setting} == best_setting for e in apg.values())


def tuned_entry(entry):
    return next(e for e in entry.values() if e['tuned'])


def tuned_report(entry):
    return tuned_entry(entry)['report']


@pytest.mark.slow
def test_seed_sets_and_files(study_run):
    out, res = study_run
    files = sorted((out / 'runs' / 'main').rglob('*.json'))
    tune, report = set(), {}
    for f in files:
        r = json.loads(f.read_text())
        seeds = set(range(r['seeds']['first'], r['seeds']['first'] + r['seeds']['count']))
        if r['seed_set'] == 'tune':
            assert r['seeds'] == {'first': 0, 'count': TUNE_N}
            tune |= seeds
        else:
            assert r['seeds']['count'] == REPORT_N
            report.setdefault(r['seed_set'], set()).update(seeds)
    assert sorted(report) == [f'report{k}' for k in range(SETS)]
    sets = [tune] + list(report.values())
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]                             # tuning and report seeds differ
    for name in res['models']['main']:
        assert (out / 'grids' / 'main' / f'{name}.png').is_file()
    assert (out / 'plots' / 'tradeoff-main.png').is_file()
    assert (out / 'plots' / 'insitu-heatmap-main.png').is_file()
    md = (out / 'results.md').read_text()
    assert all(f'| {name} |' in md for name in res['models']['main'])
    assert json.loads((out / 'results.json').read_text())['models'] == res['models']


def test_grid_edges():
    from edm2_jax.study import report

    def entry(tuned, grid):
        return {str(s): dict(setting=s, tuned=s == tuned) for s in grid}
    grid = [dict(w=w, p=p) for w in (0.5, 1.0, 2.0) for p in (0.1, 0.2)]
    assert report.grid_edges(entry(dict(w=2.0, p=0.2), grid)) == ['w↑', 'p↑']
    assert report.grid_edges(entry(dict(w=1.0, p=0.1), grid)) == ['p↓']
    assert report.grid_edges(entry(dict(w=0.5, p=0.1), grid)) == ['w↓', 'p↓']
    assert report.grid_edges(entry({}, [{}])) == []                           # 'none': no axes
    assert report.grid_edges(entry(grid[0], grid[:5])) == []                  # not a product grid


@pytest.mark.slow
def test_nfe_closed_form(study_run):
    _, res = study_run
    m = res['models']['main']
    base = 2 * STEPS - 1
    assert tuned_entry(m['none'])['nfe_per_image'] == base
    assert all(e['nfe_per_image'] == 2 * base for e in m['insitu'].values())


@pytest.mark.slow
def test_rerun_skips_everything(study_run, nets, monkeypatch):
    from edm2_jax.study import runner
    out, res = study_run
    files = sorted((out / 'runs').rglob('*.json'))
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError('a finished result was recomputed')
    monkeypatch.setattr(runner, 'sample_images', fail)
    again = run(nets, fail, out)
    assert again['meta']['results_computed_this_run'] == 0
    assert {f: f.stat().st_mtime_ns for f in sorted((out / 'runs').rglob('*.json'))} == stamps
    assert again['models'] == res['models'] and again['data'] == res['data']


@pytest.mark.slow
def test_resume_recomputes_only_missing(study_run, nets, scorer):
    out, res = study_run
    path = out / 'runs' / 'main' / 'none' / 'default' / 'report1.json'
    old = json.loads(path.read_text())
    path.unlink()
    again = run(nets, scorer, out)
    assert again['meta']['results_computed_this_run'] == 1
    assert json.loads(path.read_text())['metrics'] == old['metrics']   # same seeds, same images


def test_every_quick_method_is_accepted_by_the_sampler():
    """Each method's settings build valid sampler calls (abstract networks, traced with eval_shape:
    nothing is initialised or compiled)."""
    import jax
    from edm2_jax import Network, sampling
    from edm2_jax.config import EDM2Config
    from edm2_jax.study import grids as SM
    cfg = EDM2Config(**CONFIG)

    def abstract(config):
        return Network(config, jax.eval_shape(lambda k: Network.init(config, k).variables, jax.random.key(0)))
    nets = (abstract(cfg), abstract(cfg.replace(model_channels=4)), abstract(cfg.replace(label_dim=0)))
    ctx = SM.Context(cfg, *nets[1:])
    methods = SM.all_methods(ctx, quick=True)
    names = [m.name for m in methods]
    assert names == ['none', 'cfg', 'cfg-interval', 'cfg-rescale', 'cfg-zerostar', 'autoguidance', 'insitu',
                     'insitu-encoder', 'insitu-decoder', 'insitu-16x16', 'insitu-8x8', 'hybrid', 'pag', 'slg',
                     'sigma-shift', 'swg']
    schedule = SM.schedule_method({'w': 1.0, 'p': 0.2})
    assert len(schedule.grid) == 8 and max(s['p_lo'] for s in schedule.grid) == 0.4
    methods += [schedule, SM.apg_method(schedule, schedule.grid[0], quick=True)]
    inputs = sampling.network_inputs(Network(cfg, {}), np.arange(2))

    def sample(net, guide, uncond, kwargs_of):
        return sampling.sample(net, inputs.noise, inputs.class_labels, keys=inputs.keys, num_steps=2,
                               **kwargs_of(SM.Context(cfg, guide, uncond)))
    for m in methods:
        for s in m.grid:
            out = jax.eval_shape(lambda *n: sample(*n, lambda ctx: m.build(s, ctx)), *nets)
            assert out.shape == (2, 16, 16, 1), m.name
    # Per-level in-situ perturbs exactly the blocks of that resolution.
    levels = SM.resolution_levels(cfg)
    assert set(levels) == {'16x16', '8x8'}
    assert all('8x8' in n for n in levels['8x8']) and 'enc.8x8_down' in levels['8x8']
    # Without a guide / unconditional net / attention, those methods are left out and listed.
    bare = SM.Context(cfg.replace(channels_per_head=64))
    needing = {'cfg', 'cfg-interval', 'cfg-rescale', 'cfg-zerostar', 'autoguidance', 'hybrid', 'pag'}
    assert {m.name for m in SM.all_methods(bare, True)}.isdisjoint(needing)
    assert set(SM.skipped_methods(bare)) == needing


@pytest.mark.slow
def test_network_resolution_and_bad_input(tmp_path):
    from edm2_jax.study.protocol import check_protocol
    from edm2_jax.study.runner import tuned_index
    from experiments import study
    for preset in ('fmnist-main', 'fmnist-main-drop', 'fmnist-guide'):
        for std in ('0.050', '0.100'):
            d = tmp_path / 'cache' / 'fmnist' / preset / f'network-{std}'
            d.mkdir(parents=True)
            (d / 'config.json').write_text('{}')
    flags = types.SimpleNamespace(cache=str(tmp_path / 'cache'), std='0.1', main=None, guide=None, uncond=None)
    mains, guide, uncond = study.resolve_networks(flags)
    assert mains == {'fmnist-main': tmp_path / 'cache/fmnist/fmnist-main/network-0.100',
                     'fmnist-main-drop': tmp_path / 'cache/fmnist/fmnist-main-drop/network-0.100'}
    assert guide == tmp_path / 'cache/fmnist/fmnist-guide/network-0.100' and uncond is None
    with pytest.raises(ValueError, match='--std'):
        study.resolve_networks(types.SimpleNamespace(**{**vars(flags), 'std': None}))
    with pytest.raises(ValueError, match='not a network checkpoint'):
        study.resolve_networks(types.SimpleNamespace(**{**vars(flags), 'main': [f'x:{tmp_path}']}))
    with pytest.raises(ValueError, match='grid_n'):
        check_protocol(protocol()._replace(grid_n=15))
    assert tuned_index([{'metrics': {'fd_fmnist': float('nan')}}, {'metrics': {'fd_fmnist': 3.0}}]) == 1
    cli = subprocess.run([sys.executable, '-m', 'experiments.study', f'--main=a:{tmp_path}/nope', '--out=o',
                          f'--evaluator_cache={tmp_path}'], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode != 0 and 'study: error' in cli.stderr and 'not a network checkpoint' in cli.stderr


def test_plan_counts_images_and_evaluations():
    """--dry_run's plan: images and network evaluations from the grids, in closed form."""
    from edm2_jax import Network
    from edm2_jax.config import EDM2Config
    from edm2_jax.study import grids as SM
    from edm2_jax.study.runner import plan
    p = protocol()
    net = Network(EDM2Config(**CONFIG), {})
    rows = plan({'m': net}, lambda n: SM.Context(n.config), p, only=['none', 'insitu', 'swg', 'apg'])
    by = {r['method']: r for r in rows}
    base = 2 * STEPS - 1
    grid = len(next(m for m in SM.all_methods(SM.Context(net.config), True) if m.name == 'insitu').grid)
    assert by['none'] == dict(model='m', method='none', settings=1, images=TUNE_N + SETS * REPORT_N,
                              evals=base * (TUNE_N + SETS * REPORT_N))
    assert by['insitu']['images'] == grid * TUNE_N + SETS * REPORT_N
    assert by['insitu']['evals'] == 2 * base * by['insitu']['images']
    # APG is costed at the most expensive guided method (here swg: 1 + 9/4 evaluations per step).
    assert by['apg-swg']['evals'] == base * (1 + 9 / 4) * by['apg-swg']['images']


@pytest.mark.slow
def test_plan_needs_no_trained_network(tmp_path):
    """`make study-plan`: with nothing trained, the train presets' configurations stand in."""
    cli = subprocess.run([sys.executable, '-m', 'experiments.study', f'--cache={tmp_path / "empty"}',
                          f'--evaluator_cache={tmp_path}', f'--out={tmp_path / "out"}', '--dry_run',
                          '--methods=none,insitu'], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode == 0, cli.stderr[-2000:]
    lines = cli.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ['fmnist-main', 'none:'], ['fmnist-main', 'insitu:'], ['fmnist-main-drop', 'none:'],
        ['fmnist-main-drop', 'insitu:']]
    assert lines[-1].startswith('total: ') and not (tmp_path / 'out').exists()

"""The guidance study (edm2_jax.study, experiments/study.py) on tiny random networks, scored by
the real Fashion-MNIST evaluator trained for a few steps: tuning/report protocol, result and feature
files, bootstrap intervals, resume, outputs, training seeds, the history guide. Expected values are
computed here independently (numpy argmin / std / percentiles, closed-form NFE, repeated rows); the
evaluator itself is tested in its own file.
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
RESAMPLES = 50
METRICS = {'fd_fmnist', 'kid', 'precision', 'recall', 'class_accuracy'}


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


def run(nets, score, out, feature_refs, log=lambda s: None):
    from edm2_jax import checkpoint
    from edm2_jax.study import grids as SM
    from edm2_jax.study.runner import run_study
    from experiments import study
    guide = checkpoint.load(nets / 'guide')
    return run_study({'main': checkpoint.load(nets / 'main')},
                     lambda name, net: SM.Context(net.config, guide), score, out, protocol(),
                     only=METHODS, reference=study.train_split_sets(protocol()), feature_refs=feature_refs,
                     resamples=RESAMPLES, evaluator=getattr(score, 'info', None), log=log)


@pytest.fixture(scope='module')
def study_run(nets, scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp('study')
    return out, run(nets, scorer, out, scorer.reference)


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
            assert set(e['tune']) == METRICS
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
    # Bootstrap intervals at every tuned point: the value is the mean over the sets of each set's metric
    # (FD up to the two FD implementations' rounding; precision and recall exactly), none − none is 0.
    for entry in methods.values():
        e = tuned_entry(entry)
        assert set(e['intervals']) == set(e['vs_none_intervals']) == METRICS - {'class_accuracy'}
        for k, i in e['intervals'].items():
            assert i['low'] <= i['high']
            if k != 'kid':       # KID: all rows here, the mean over subsets in the metrics
                assert i['value'] == pytest.approx(e['report'][k]['mean'], rel=1e-6)
    assert tuned_entry(methods['none'])['vs_none_intervals']['fd_fmnist'] == dict(value=0.0, low=0.0, high=0.0)
    assert res['meta']['bootstrap']['resamples'] == RESAMPLES
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
    for name, entry in res['models']['main'].items():
        assert (out / 'grids' / 'main' / f'{name}.png').is_file()
        sid = next(sid for sid, e in entry.items() if e['tuned'])
        for k in range(SETS):                                        # the bootstrap's rows
            with np.load(out / 'runs' / 'main' / name / sid / f'report{k}-features.npz') as z:
                assert z['features'].dtype == np.float32 and z['features'].shape == (REPORT_N, 128)
    assert (out / 'plots' / 'tradeoff-main.png').is_file()
    assert (out / 'plots' / 'insitu-heatmap-main.png').is_file()
    md = (out / 'results.md').read_text()
    assert all(f'| {name} |' in md for name in res['models']['main'])
    assert '| KID ×10³ ↓ |' in md and f'{RESAMPLES} resamples' in md
    fd = tuned_entry(res['models']['main']['none'])['intervals']['fd_fmnist']
    assert f"| {fd['value']:.2f} [{fd['low']:.2f}, {fd['high']:.2f}] | +0.00 [+0.00, +0.00] |" in md
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
    # FLOPs: in-situ (also on a σ-schedule, which still runs the guide pass everywhere) runs the main
    # network twice per evaluation.
    assert tuned_entry(m['none'])['flops_vs_none'] == 1.0
    for name in ('insitu', 'insitu-schedule'):
        assert tuned_entry(m[name])['flops_vs_none'] == pytest.approx(2.0, rel=0.03)


@pytest.mark.slow
def test_a_second_model_runs_at_the_settings_tuned_on_the_first(study_run, nets, scorer, tmp_path):
    """--tuned_on: the other model samples only the first model's tuned point of each method (the
    first model's results are reused from the shared study, not recomputed)."""
    import shutil
    from edm2_jax import checkpoint
    from edm2_jax.errors import UserError
    from edm2_jax.study import grids as SM
    from edm2_jax.study.runner import run_study
    out, res = study_run
    shutil.copytree(out / 'runs', tmp_path / 'runs')
    models = {'main-seed1': checkpoint.load(nets / 'guide'), 'main': checkpoint.load(nets / 'main')}
    args = (lambda name, net: SM.Context(net.config), scorer, tmp_path, protocol())
    got = run_study(models, *args, only=METHODS, resamples=0, tuned_on='main', log=lambda s: None)
    assert list(got['models']) == ['main', 'main-seed1'] and got['meta']['tuned_on'] == 'main'
    assert got['models']['main'] == {k: {sid: {x: v for x, v in e.items() if 'intervals' not in x}
                                         for sid, e in entry.items()} for k, entry in res['models']['main'].items()}
    for name, entry in res['models']['main'].items():
        tuned = [sid for sid, e in entry.items() if e['tuned']]
        assert list(got['models']['main-seed1'][name]) == tuned, name
    assert got['meta']['results_computed_this_run'] == 4 * (1 + SETS)   # 4 rows: 1 tuning + 3 report sets
    assert 'at the settings tuned on main' in (tmp_path / 'results.md').read_text()
    with pytest.raises(UserError, match="--tuned_on: 'x' is not a main model"):
        run_study(models, *args, only=METHODS, resamples=0, tuned_on='x')


@pytest.mark.slow
def test_rerun_skips_everything(study_run, nets, scorer, monkeypatch):
    """Nothing is recomputed, and the intervals (a fixed bootstrap seed) come out identical."""
    from edm2_jax.study import runner
    out, res = study_run
    files = sorted((out / 'runs').rglob('*.json'))
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError('a finished result was recomputed')
    monkeypatch.setattr(runner, 'sample_images', fail)
    again = run(nets, fail, out, scorer.reference)
    assert again['meta']['results_computed_this_run'] == 0
    assert {f: f.stat().st_mtime_ns for f in sorted((out / 'runs').rglob('*.json'))} == stamps
    assert again['models'] == res['models'] and again['data'] == res['data']


@pytest.mark.slow
def test_resume_recomputes_only_missing(study_run, nets, scorer, monkeypatch):
    """A missing result is recomputed, its features written before the JSON that marks it done."""
    from edm2_jax.study import runner
    out, res = study_run
    path = out / 'runs' / 'main' / 'none' / 'default' / 'report1.json'
    features = path.with_name('report1-features.npz')
    old, old_features = json.loads(path.read_text()), np.load(features)['features']
    path.unlink()
    features.unlink()
    write = runner.write_result

    def checked(p, obj):
        assert p != path or features.is_file()
        write(p, obj)
    monkeypatch.setattr(runner, 'write_result', checked)
    again = run(nets, scorer, out, scorer.reference)
    assert again['meta']['results_computed_this_run'] == 1
    assert json.loads(path.read_text())['metrics'] == old['metrics']   # same seeds, same images
    np.testing.assert_array_equal(np.load(features)['features'], old_features)
    assert again['models'] == res['models']


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
    nets = (abstract(cfg), abstract(cfg.replace(model_channels=4)), abstract(cfg.replace(label_dim=0)),
            abstract(cfg))
    ctx = SM.Context(cfg, *nets[1:])
    methods = SM.all_methods(ctx, quick=True)
    names = [m.name for m in methods]
    assert names == ['none', 'cfg', 'cfg-interval', 'cfg-rescale', 'cfg-zerostar', 'autoguidance', 'history',
                     'insitu', 'insitu-frozen', 'insitu-avg2', 'insitu-avg4', 'insitu-avg2-anti', 'insitu-avg4-anti',
                     'insitu-encoder', 'insitu-decoder', 'insitu-16x16', 'insitu-8x8', 'hybrid', 'pag', 'slg',
                     'sigma-shift', 'swg']
    schedule = SM.schedule_method({'w': 1.0, 'p': 0.2})
    assert len(schedule.grid) == 8 and max(s['p_lo'] for s in schedule.grid) == 0.4
    avg = methods[names.index('insitu-avg2')]                      # terms-based: APG goes into the terms
    methods += [schedule, SM.apg_method(schedule, schedule.grid[0], quick=True),
                SM.apg_method(avg, avg.grid[0], quick=True)]
    inputs = sampling.network_inputs(Network(cfg, {}), np.arange(2))

    def sample(net, guide, uncond, history, kwargs_of):
        return sampling.sample(net, inputs.noise, inputs.class_labels, keys=inputs.keys, num_steps=2,
                               **kwargs_of(SM.Context(cfg, guide, uncond, history)))
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
    needing = {'cfg', 'cfg-interval', 'cfg-rescale', 'cfg-zerostar', 'autoguidance', 'hybrid', 'pag', 'history'}
    assert {m.name for m in SM.all_methods(bare, True)}.isdisjoint(needing)
    assert set(SM.skipped_methods(bare)) == needing


@pytest.mark.slow
def test_network_resolution_and_bad_input(tmp_path):
    from edm2_jax.study.protocol import check_protocol
    from edm2_jax.study.runner import tuned_index
    from experiments import study
    # fmnist-guide-seed1 is no main model; fmnist-main-seed1 (a second training seed) is one.
    for preset in ('fmnist-main', 'fmnist-main-drop', 'fmnist-guide', 'fmnist-main-seed1', 'fmnist-guide-seed1'):
        for std in ('0.050', '0.100'):
            d = tmp_path / 'cache' / 'fmnist' / preset / f'network-{std}'
            d.mkdir(parents=True)
            (d / 'config.json').write_text('{}')
    flags = types.SimpleNamespace(cache=str(tmp_path / 'cache'), std='0.1', main=None, guide=None, uncond=None,
                                  history=None, history_time=0.25, history_std=0.1)
    mains, guide, uncond = study.resolve_networks(flags)
    assert mains == {'fmnist-main': tmp_path / 'cache/fmnist/fmnist-main/network-0.100',
                     'fmnist-main-drop': tmp_path / 'cache/fmnist/fmnist-main-drop/network-0.100',
                     'fmnist-main-seed1': tmp_path / 'cache/fmnist/fmnist-main-seed1/network-0.100'}
    assert guide == tmp_path / 'cache/fmnist/fmnist-guide/network-0.100' and uncond is None
    with pytest.raises(ValueError, match='--std'):
        study.resolve_networks(types.SimpleNamespace(**{**vars(flags), 'std': None}))
    with pytest.raises(ValueError, match='not a network checkpoint'):
        study.resolve_networks(types.SimpleNamespace(**{**vars(flags), 'main': [f'x:{tmp_path}']}))
    with pytest.raises(ValueError, match='grid_n'):
        check_protocol(protocol()._replace(grid_n=15))
    for bad, match in (({'history_time': 0.0}, '--history_time'), ({'history_std': 0.5}, '--history_std'),
                       ({'history': ['nope:x']}, "--history: names \\['nope'\\] are not main models")):
        with pytest.raises(ValueError, match=match):
            study.check_history_flags(types.SimpleNamespace(**{**vars(flags), **bad}), mains)
    with pytest.raises(ValueError, match='--resamples'):
        from edm2_jax.study.runner import run_study
        run_study({}, None, None, tmp_path / 'o', protocol(), resamples=1)
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
    rows = plan({'m': net}, lambda name, n: SM.Context(n.config, history=n), p,
                only=['none', 'insitu', 'swg', 'history', 'insitu-avg4', 'apg'])
    by = {r['method']: r for r in rows}
    base = 2 * STEPS - 1
    grid = len(next(m for m in SM.all_methods(SM.Context(net.config), True) if m.name == 'insitu').grid)
    assert by['none'] == dict(model='m', method='none', settings=1, images=TUNE_N + SETS * REPORT_N,
                              evals=base * (TUNE_N + SETS * REPORT_N))
    assert by['insitu']['images'] == grid * TUNE_N + SETS * REPORT_N
    assert by['insitu']['evals'] == 2 * base * by['insitu']['images']
    assert by['history']['evals'] == 2 * base * by['history']['images']
    assert by['insitu-avg4']['evals'] == (1 + 4) * base * by['insitu-avg4']['images']   # k = 4 dropout passes
    # APG is costed at the most expensive guided method (here in-situ averaged over 4 draws; swg: 1 + 9/4).
    assert by['apg-insitu-avg4']['evals'] == base * (1 + 4) * by['apg-insitu-avg4']['images']
    swg = plan({'m': net}, lambda name, n: SM.Context(n.config), p, only=['swg', 'apg'])[-1]
    assert swg['method'] == 'apg-swg' and swg['evals'] == base * (1 + 9 / 4) * swg['images']


@pytest.mark.slow
def test_plan_needs_no_trained_network(tmp_path):
    """`make study-plan`: with nothing trained, the train presets' configurations stand in, for the
    second training seed `make train` trains and for the history guides too."""
    cli = subprocess.run([sys.executable, '-m', 'experiments.study', f'--cache={tmp_path / "empty"}',
                          f'--evaluator_cache={tmp_path}', f'--out={tmp_path / "out"}', '--dry_run',
                          '--methods=none,history'], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode == 0, cli.stderr[-2000:]
    lines = cli.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        [model, method] for model in ('fmnist-main', 'fmnist-main-drop', 'fmnist-main-seed1')
        for method in ('none:', 'history:')]
    assert lines[-1].startswith('total: ') and not (tmp_path / 'out').exists()


def fd_of_rows(rows, mu, sigma):
    """The Fréchet distance of explicit rows, through the eigenvalues of S·S_ref (numpy only)."""
    m, s = rows.mean(0), np.cov(rows, rowvar=False)
    return float(np.sum((m - mu) ** 2) + np.trace(s) + np.trace(sigma)
                 - 2 * np.sum(np.sqrt(np.clip(np.linalg.eigvals(s @ sigma).real, 0, None))))


def test_intervals_are_the_stratified_paired_bootstrap_and_reproducible():
    """add_intervals against the bootstrap written out: per resample, each set's rows drawn with
    replacement within the set (rng.integers in set order), FD of the repeated rows, mean over the
    sets; value ∓ 1.96 standard deviations of the resamples; Δ vs none and vs autoguidance on the
    same draws, percentiles. A result without features gets
    no interval, one of other set sizes no paired one; the same seed gives the same intervals, another
    seed others."""
    from edm2_jax.metrics import bootstrap as B
    from edm2_jax.study import report
    rng = np.random.default_rng(0)
    d, sizes, resamples = 4, (12, 9, 12), 60
    real = rng.standard_normal((40, d))
    mu, sigma = real.mean(0) + 0.3, np.cov(real, rowvar=False) * 1.5
    feats = {'none': [rng.standard_normal((n, d)) for n in sizes]}
    feats['x'] = [f + 0.2 * rng.standard_normal(f.shape) - 0.1 for f in feats['none']]
    feats['autoguidance'] = [0.8 * f + 0.1 for f in feats['none']]
    short = [f[:8] for f in feats['x']]                      # other seeds than none's: not paired

    def methods():
        return {name: {'w=1': {'tuned': False}, 'w=2': {'tuned': True}}
                for name in ('none', 'x', 'autoguidance', 'old', 'short')}

    def intervals(seed):
        out = methods()
        report.add_intervals(out, lambda name, sid: {**feats, 'short': short}.get(name) if sid == 'w=2' else None,
                             lambda: B.reference(real, ref_mu=mu, ref_sigma=sigma), resamples, seed)
        return out
    got = intervals(7)
    draw = np.random.default_rng(7)
    reps = {name: [] for name in feats}
    for _ in range(resamples):
        rows = [draw.integers(0, n, n) for n in sizes]
        for name, sets in feats.items():
            reps[name].append(np.mean([fd_of_rows(f[r], mu, sigma) for f, r in zip(sets, rows)]))
    for name, sets in feats.items():
        i = got[name]['w=2']['intervals']['fd_fmnist']
        assert i['value'] == pytest.approx(np.mean([fd_of_rows(f, mu, sigma) for f in sets]), rel=1e-9)
        half = 1.959963984540054 * np.std(reps[name], ddof=1)           # the normal interval
        assert [i['low'], i['high']] == pytest.approx([i['value'] - half, i['value'] + half], rel=1e-9)
    delta = got['x']['w=2']['vs_none_intervals']['fd_fmnist']
    assert [delta['low'], delta['high']] == pytest.approx(
        np.percentile(np.subtract(reps['x'], reps['none']), [2.5, 97.5]), rel=1e-9, abs=1e-12)
    versus = got['x']['w=2']['vs_autoguidance_intervals']['fd_fmnist']       # paired with another row
    assert [versus['low'], versus['high']] == pytest.approx(
        np.percentile(np.subtract(reps['x'], reps['autoguidance']), [2.5, 97.5]), rel=1e-9, abs=1e-12)
    row = next(r for r in report.paired_markdown(got) if r.startswith('| x |'))
    assert row.split(' | ')[1] == f"{versus['value']:+.2f} [{versus['low']:+.2f}, {versus['high']:+.2f}]"
    assert 'intervals' not in got['old']['w=2'] and 'intervals' not in got['x']['w=1']
    assert 'intervals' in got['short']['w=2'] and 'vs_none_intervals' not in got['short']['w=2']
    assert intervals(7) == got and intervals(8) != got


def test_seed_comparison_in_results_md():
    from edm2_jax.study import report
    assert report.seed_groups(['fmnist-main', 'fmnist-main-drop', 'fmnist-main-seed1', 'x-seed2']) == {
        'fmnist-main': ['fmnist-main', 'fmnist-main-seed1']}

    def entry(fd, delta):
        return {'w=1': dict(tuned=True, report={'fd_fmnist': {'mean': fd}}, vs_none={'fd_fmnist': {'mean': delta}})}
    results = {'models': {'fmnist-main': {'none': entry(7.0, 0.0), 'insitu': entry(5.5, -1.5)},
                          'fmnist-main-seed1': {'none': entry(8.0, 0.0), 'insitu': entry(6.0, -2.0)}},
               'meta': {}}
    md = '\n'.join(report.seeds_markdown(results))
    assert '| insitu | w=1; w=1 | 5.50, 6.00 | 5.75 | -1.50, -2.00 | -1.75 |' in md
    assert 'Each method tuned and reported' in md
    results['meta']['tuned_on'] = 'fmnist-main'
    assert 'Each method at the settings tuned on fmnist-main and reported' in '\n'.join(report.seeds_markdown(results))


def test_history_guide_is_the_runs_early_snapshot(tmp_path):
    """<run>/history-<t>-<σ_rel>/: at history_time 0.25 of snapshots at 16, 32, 64 images, the σ_rel 0.10
    profile at t = 16, a tracked profile, so exactly that snapshot's weights; exported once."""
    import jax
    import jax.numpy as jnp
    from edm2_jax import checkpoint, train_state
    from edm2_jax.config import EDM2Config
    from edm2_jax.ema import PowerEMA
    from edm2_jax.training import EDM2State, TrainConfig
    assert train_state.history_snapshot_time([64, 16, 32, 48], 0.25) == 16
    assert train_state.history_snapshot_time([16, 32, 64], 0.1) == 16 and train_state.history_snapshot_time([16, 64], 1) == 64
    net, stds = EDM2Config(**CONFIG), (0.05, 0.10)
    cfg = TrainConfig(net, batch_size=8, duration=64, ema_sigma_rels=stds)
    params = {(t, s): jax.tree.map(np.asarray, random_network(net, t + k).variables)
              for t in (16, 32, 64) for k, s in enumerate(stds)}
    run = tmp_path / 'fmnist-main'
    for t in (16, 32, 64):
        base = params[(t, stds[0])]
        train_state.save_snapshot(run, EDM2State(cfg, jnp.int32(t // 8), base['params'], base['buffers'], None,
                                                 PowerEMA(stds, tuple(params[(t, s)]['params'] for s in stds))))
    guide = train_state.export_history(run, 0.25, 0.10, log=lambda s: None)
    assert guide == run / 'history-000000000016-0.100'
    for a, b in zip(jax.tree.leaves(checkpoint.load(guide).variables['params']),
                    jax.tree.leaves(params[(16, 0.10)]['params'])):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5)
    stamp = (guide / 'config.json').stat().st_mtime_ns
    assert train_state.export_history(run, 0.25, 0.10, log=None) == guide
    assert (guide / 'config.json').stat().st_mtime_ns == stamp
    assert train_state.export_history(tmp_path / 'elsewhere', 0.25, 0.10) is None

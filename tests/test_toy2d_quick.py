"""End to end: `python -m experiments.toy2d --quick` writes the figure and a sane metrics table."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from edm2_jax.toy import metrics as metrics_lib
from edm2_jax.toy import train as train_lib
from edm2_jax.toy.model import ToyConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy2d')
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-m', 'experiments.toy2d', '--quick', f'--outdir={out}'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_outputs_written(quick_run):
    for name in ('figure.png', 'metrics.json', 'metrics.md', 'run.json'):
        assert (quick_run / name).stat().st_size > 0
    assert sorted(p.name for p in (quick_run / 'models').iterdir()) == ['ag-seed0', 'cfg-seed0', 'main-seed0']


@pytest.mark.slow
def test_table_shape(quick_run):
    table = json.loads((quick_run / 'metrics.json').read_text())
    expected = {'exact', 'exact_ode', 'none', 'cfg w=3', 'autoguidance w=2', 'in-situ p=0.05 w=2',
                'in-situ p=0.1 w=2', 'skip-layer l=2 w=2', 'sigma-shift δ=0.25 w=2', 'in-situ-frozen p=0.05 w=2',
                'in-situ-avg k=2 p=0.05 w=2 (cost 3x)'}
    assert set(table) == expected
    for method, row in table.items():
        assert tuple(row) == metrics_lib.METRICS, method
        assert all(math.isfinite(v) for v in row.values()), method
    md = (quick_run / 'metrics.md').read_text()
    for method in expected:
        assert f'| {method} |' in md


@pytest.mark.slow
def test_metric_sanity(quick_run):
    t = json.loads((quick_run / 'metrics.json').read_text())
    ex, ode, none, cfg = t['exact'], t['exact_ode'], t['none'], t['cfg w=3']
    # exact vs exact: at the noise floor
    assert ex['outlier'] < 0.03 and ex['escape'] == 0.0 and ex['wrong_class'] < 0.015
    assert abs(ex['logp_median'] - 1.45) < 0.1 and abs(ex['kl_clip']) < 0.35
    assert ex['precision'] > 0.9 and ex['recall'] > 0.9 and ex['leaf_recall_25'] > 0.8
    assert abs(ex['mmd_02']) < 5e-4 and abs(ex['mmd_10']) < 5e-4
    # the exact-score ODE reproduces exact samples
    assert abs(ode['logp_median'] - ex['logp_median']) < 0.1 and ode['outlier'] < 0.03
    assert ode['branch_tv'] < ex['branch_tv'] + 0.04
    # the tiny unguided model is worse than exact; CFG collapses coverage relative to it
    assert none['branch_tv'] > ode['branch_tv'] and none['kl_clip'] > ode['kl_clip']
    assert cfg['branch_tv'] > none['branch_tv'] and cfg['leaf_recall'] < none['leaf_recall']
    assert cfg['wrong_class'] <= none['wrong_class']


def numpy_log_density(mix, x):
    """log p(x) of a Gaussian mixture in float64 NumPy (weights, means, covariances of each component)."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.covs))
    d = np.asarray(x, np.float64)[:, None, :] - mu[None]
    q = np.einsum('nki,kij,nkj->nk', d, np.linalg.inv(cov), d)
    log_terms = np.log(w) - np.log(2 * np.pi) - 0.5 * np.log(np.linalg.det(cov)) - 0.5 * q
    top = log_terms.max(axis=1)
    return top + np.log(np.exp(log_terms - top[:, None]).sum(axis=1))


@pytest.mark.slow
def test_exact_row_matches_an_independent_density(quick_run):
    """The 'exact' row (sample seed 1: exact samples drawn with fold_in(key(1), 2)): its log-density
    metrics recomputed here with a float64 NumPy mixture density and the run's outlier threshold τ."""
    from edm2_jax.toy import fractal as mixture_lib
    t = json.loads((quick_run / 'metrics.json').read_text())['exact']
    tau = json.loads((quick_run / 'run.json').read_text())['tau']
    n = 2048
    exact = np.asarray(mixture_lib.draw(mixture_lib.mixture('A'), jax.random.fold_in(jax.random.key(1), 2), n))
    logp_a = numpy_log_density(mixture_lib.mixture('A'), exact)
    logp_b = numpy_log_density(mixture_lib.mixture('B'), exact)
    assert abs(t['logp_median'] - np.median(logp_a)) < 1e-4
    # float32 vs float64 densities may flip a sample sitting on a threshold: at most one of 2048
    assert abs(t['outlier'] - np.mean(logp_a < tau)) <= 1 / n
    assert abs(t['wrong_class'] - np.mean(logp_b > logp_a)) <= 1 / n
    assert 0 < np.mean(logp_a < tau) < 0.03  # τ is (about) the 1 % quantile of exact samples


@pytest.mark.slow
def test_run_info(quick_run):
    info = json.loads((quick_run / 'run.json').read_text())
    assert abs(info['tau'] - (-1.84)) < 0.06
    assert info['num_samples'] == 2048 and info['wall_time_s'] > 0
    assert set(info['dropout_sanity']) == {f'main p=0.05 σ={s:g}' for s in (0.02, 0.1, 0.5)}


def test_model_cache(tmp_path):
    from experiments import toy2d
    spec = train_lib.TrainSpec('A', ToyConfig(4), steps=3, batch=16)
    m1, _, t1 = toy2d.get_model(tmp_path, 'main', spec, 0, retrain=False)
    m2, _, t2 = toy2d.get_model(tmp_path, 'main', spec, 0, retrain=False)
    assert t1 > 0 and t2 == 0.0
    for a, b in zip(jax.tree.leaves(m1.params), jax.tree.leaves(m2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, t3 = toy2d.get_model(tmp_path, 'main', spec._replace(steps=4), 0, retrain=False)  # settings changed
    assert t3 > 0

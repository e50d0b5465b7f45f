"""The benchmark script runs end to end on a tiny network and writes a JSON report whose counts are right.

Expected values come from the sampler's definition, not from the script: Heun with S steps evaluates the
denoiser 2S − 1 times (S − 1 corrected steps plus the last Euler step); in-situ guidance at every
evaluation adds one guide pass per evaluation; a (w, p) sweep of a jitted sampler with traced w, p
compiles once.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs the script as a subprocess

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
TINY = ['--resolution=8', '--img_channels=2', '--channels=8', '--channel_mult=1', '--num_blocks=1',
        '--attn_resolutions=', '--label_dim=3', '--batch=2', f'--steps={STEPS}', '--repeats=1']


def run_benchmark(tmp_path, *args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-m', 'experiments.benchmark', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    proc = run_benchmark(out.parent, '--quick', *TINY, '--methods=none,insitu-fused', f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_schema(report):
    data, stdout = report
    assert set(data) >= {'machine', 'config', 'results'}
    assert data['config']['steps'] == STEPS and data['config']['batch'] == 2
    assert [r['method'] for r in data['results']] == ['none', 'insitu-fused']
    for r in data['results']:
        for key in ('method', 'sec_per_image', 'ratio_to_none', 'nfe_per_image', 'flops_per_eval',
                    'compile_s', 'compiles'):
            assert key in r, key
        assert r['sec_per_image'] > 0 and r['compile_s'] > 0 and r['flops_per_eval'] > 0
        assert r['sec_per_image_min'] <= r['sec_per_image'] <= r['sec_per_image_max']
        assert r['peak_bytes'] is None or r['peak_bytes'] > 0
        assert r['method'] in stdout  # the table
    assert data['results'][0]['ratio_to_none'] == 1.0


def test_counted_evaluations(report):
    none, fused = report[0]['results']
    assert none['nfe_per_image'] == 2 * STEPS - 1
    assert none['nfe_by_network'] == {'main': 2 * STEPS - 1}
    assert fused['nfe_per_image'] == 2 * (2 * STEPS - 1)
    # One fused guided evaluation runs the network on twice the rows: about twice the FLOPs.
    assert 1.8 < fused['flops_per_guided_eval'] / none['flops_per_eval'] < 2.5
    # Per image: 2S − 1 evaluations, all unguided for 'none', all guided for in-situ.
    assert none['flops_per_image'] == pytest.approx((2 * STEPS - 1) * none['flops_per_eval'])
    assert fused['flops_per_image'] == pytest.approx((2 * STEPS - 1) * fused['flops_per_guided_eval'])
    # Every evaluation of in-situ is guided, none of 'none'; the counted rows per network sum to the NFE.
    assert (none['guided_evals_per_image'], fused['guided_evals_per_image']) == (0, 2 * STEPS - 1)
    for r in (none, fused):
        assert sum(r['nfe_by_network'].values()) == r['nfe_per_image']
        # rates and ratios are the quotients of the reported numbers
        assert r['flop_per_s'] == pytest.approx(r['flops_per_image'] / r['sec_per_image'])
        assert r['ratio_to_none'] == pytest.approx(r['sec_per_image'] / none['sec_per_image'])


def test_sweep_compiles_once(report):
    for r in report[0]['results']:
        assert r['compiles'] == 1, r


def test_bad_method_fails_before_compiling(tmp_path):
    proc = run_benchmark(tmp_path, *TINY, '--methods=none,insitu-bogus')
    assert proc.returncode != 0 and 'unknown method' in proc.stderr


def test_per_term_interval_costs_like_sampler_interval(tmp_path):
    # σ interval (1, 100] holds only the first evaluation (σ = 80) of the 2-step schedule [80, 0.002, 0]:
    # 2S − 1 = 3 main evaluations + 1 guide pass, whether the interval is the sampler's or the term's.
    out = tmp_path / 'bench.json'
    proc = run_benchmark(tmp_path, *TINY, '--methods=insitu-prefix-interval,insitu-term-interval',
                         '--interval=1,100', f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())['results']
    assert [r['nfe_per_image'] for r in results] == [2 * STEPS - 1 + 1] * 2
    assert [r['guided_evals_per_image'] for r in results] == [1, 1]
    # 2 unguided evaluations at the forward's cost and 1 guided one at the guided cost
    for r in results:
        assert r['flops_per_image'] == pytest.approx(2 * r['flops_per_eval'] + r['flops_per_guided_eval'])


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    """experiments/gpu_benchmark.sh with a tiny custom network (PRESET empty): both dtypes, one JSON,
    the same evaluation counts in each dtype, and the dtypes' ratios to none. Two of its four methods
    (a later --methods overrides the script's; each method costs a compilation per dtype on the CPU):
    the script's own list is checked as text."""
    out = tmp_path / 'gpu.json'
    env = dict(os.environ, JAX_PLATFORMS='cpu', PRESET='', BATCH='2', STEPS=str(STEPS), OUT=str(out),
               PYTHON=sys.executable)
    script = (ROOT / 'experiments' / 'gpu_benchmark.sh').read_text()
    assert '--methods=none,insitu-fused,insitu-decoder-prefix,autoguidance' in script
    methods = ['none', 'insitu-decoder-prefix']
    tiny = [a for a in TINY if not a.startswith(('--batch', '--steps'))] + [f'--methods={",".join(methods)}']
    proc = subprocess.run(['bash', 'experiments/gpu_benchmark.sh', *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r['dtype'], r['method']) for r in data['results']] == [
        (d, m) for d in ('float32', 'bfloat16') for m in methods]
    evals = 2 * STEPS - 1
    for r in data['results']:
        assert r['nfe_per_image'] == (evals if r['method'] == 'none' else 2 * evals)
        assert r['ratio_to_none'] == pytest.approx(r['sec_per_image'] / next(
            q['sec_per_image'] for q in data['results'] if q['dtype'] == r['dtype'] and q['method'] == 'none'))
    assert data['config']['dtypes'] == ['float32', 'bfloat16']

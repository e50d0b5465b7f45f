"""experiments.generate: bad flags fail fast, an interrupted run resumed gives the files of an
uninterrupted one (no partial files left), NaN samples stop the run naming their seeds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STOP_ENV = 'EDM2_GENERATE_STOP_AFTER_BATCHES'


def _cmd(*args):
    return [sys.executable, '-m', 'experiments.generate', *args]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
    return env


@pytest.mark.parametrize('args, message', [
    (['--preset=edm2-img512-nope'], 'unknown --preset'),
    (['--net=NET', '--method=autoguidance', '--guidance=2'], 'needs --gnet'),
    (['--net=NET', '--method=cfg', '--guidance=1.5', '--p=0.1'], '--p is the dropout rate'),
    (['--net=NET', '--method=insitu', '--guidance=2'], 'needs --p'),
    (['--net=NET', '--seeds=0-9,x'], 'malformed entry'),
    (['--net=NET', '--seeds=5-2'], 'empty range'),
    (['--net=NET', '--guidance=2'], 'need a --method'),
    (['--net=NET', '--method=insitu', '--guidance=2', '--w=1', '--p=0.1'], 'not both'),
    (['--net=NET', '--method=autoguidance', '--guidance=2', '--gnet=NET', '--perturb=decoder'], '--perturb'),
    (['--preset=edm2-img512-s-autog-fid', '--checkpoints=CKPTS'],
     'python -m convert.edm2 --src=edm2-img512-s-2147483-0.070.pkl'),
    (['--preset=edm2-img512-xs-fid', '--net=NET'], 'do not also give --net'),
    (['--net=/nonexistent'], 'not a converted checkpoint'),
    (['--net=NET', '--method=sigma-shift', '--guidance=2'], 'needs --strength'),
    (['--net=NET', '--method=pag', '--guidance=2', '--window=4,2'], '--window is for --method=swg'),
    (['--net=NET', '--method=pag', '--guidance=2', '--gnet=NET'], 'uses no --gnet'),
])
@pytest.mark.slow
def test_bad_flags_fail_fast(tmp_path, args, message):
    net = tmp_path / 'net'  # the flag checks look only for config.json: nothing is loaded
    net.mkdir()
    (net / 'config.json').write_text('{}')
    args = [a.replace('NET', str(net)).replace('CKPTS', str(tmp_path)) for a in args]
    r = subprocess.run(_cmd(*args, f'--outdir={tmp_path / "out"}'), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'out').exists()


RUN = ['--method=insitu', '--guidance=2', '--p=0.25', '--seeds=3-9', '--batch=2', '--num_steps=3',
       '--save_npz', '--subdirs', '--noprogress', '--grid=4']


def _files(outdir):
    return {p.relative_to(outdir): p.read_bytes() for p in sorted(outdir.rglob('*'))
            if p.is_file() and p.name != 'summary.json'}


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_nan_stops(tmp_path):
    net = write_tiny_checkpoint(tmp_path / 'net')
    bad = write_tiny_checkpoint(tmp_path / 'bad', nan=True)
    full, part, nan_out, cache = (tmp_path / n for n in ('full', 'part', 'nan', 'cache'))
    common = [f'--net={net}', *RUN]
    procs = [
        subprocess.Popen(_cmd(*common, f'--outdir={full}'), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(_cmd(*common, f'--outdir={part}', f'--compile_cache={cache}'), cwd=ROOT,
                         env=_env(**{STOP_ENV: '2'}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(_cmd(f'--net={bad}', '--seeds=0-2', '--batch=2', '--num_steps=2', '--noprogress',
                              f'--outdir={nan_out}'), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode == 0, outs[0][-3000:]
    assert procs[1].returncode == 3, outs[1][-3000:]   # the simulated kill after 2 batches
    assert procs[2].returncode == 1 and 'non-finite samples: seeds [0, 1]' in outs[2], outs[2][-3000:]
    assert not list(nan_out.rglob('*.png'))

    # The interrupted run left 4 complete images (+ npz) and nothing else; plant the leftovers of a
    # kill in the middle of a write, which the resumed run must remove.
    assert sorted(p.name for p in part.rglob('*.png')) == [f'{s:06d}.png' for s in range(3, 7)]
    assert not (part / 'summary.json').exists()
    (part / '000000' / '.000008.png.tmp').write_bytes(b'partial')
    assert any(cache.iterdir())  # the persistent compilation cache was written

    r = subprocess.run(_cmd(*common, f'--outdir={part}', f'--compile_cache={cache}'), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((part / 'summary.json').read_text())
    assert (summary['images_generated'], summary['images_skipped']) == (3, 4)

    expected = _files(full)
    assert sorted(str(k) for k in expected) == sorted(
        ['grid.png'] + [f'000000/{s:06d}.{e}' for s in range(3, 10) for e in ('png', 'npz')])
    got = _files(part)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == expected[k], k
    raw = np.load(full / '000000' / '000005.npz')['x']
    assert raw.shape == (8, 8, 3) and np.isfinite(raw).all()


@pytest.mark.slow
def test_self_guidance_method_matches_the_library(tmp_path):
    """--method=sigma-shift through the script gives the samples of edm2_jax.sample() directly."""
    import jax.numpy as jnp
    from edm2_jax import checkpoint, network_inputs, sample
    write_tiny_checkpoint(tmp_path / 'net')
    args = ['--method=sigma-shift', '--guidance=1.8', '--strength=0.5', '--seeds=0-2', '--batch=3', '--num_steps=3',
            '--save_npz', '--noprogress', f'--net={tmp_path / "net"}', f'--outdir={tmp_path / "out"}']
    r = subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = np.stack([np.load(tmp_path / 'out' / f'{s:06d}.npz')['x'] for s in range(3)])
    net = checkpoint.load(tmp_path / 'net')
    inputs = network_inputs(net, np.arange(3))
    direct = sample(net, inputs.noise, inputs.class_labels, keys=inputs.keys, method='sigma-shift', guidance=1.8,
                    strength=0.5, num_steps=3)
    # Different program shapes (shard_map in the script) round differently on XLA:CPU and the random
    # test network (|x| up to ~12) amplifies that over the steps: ~3e-4 observed.
    np.testing.assert_allclose(ours, np.asarray(direct, jnp.float32).reshape(ours.shape), rtol=0, atol=2e-3)


@pytest.mark.slow
def test_greyscale_network_writes_greyscale_pngs(tmp_path):
    """A 1-channel pixel model (e.g. Fashion-MNIST) writes 'L' PNGs equal to the decoded raw samples."""
    from PIL import Image
    write_tiny_checkpoint(tmp_path / 'net', channels=1)
    args = ['--seeds=0-1', '--batch=2', '--num_steps=2', '--save_npz', '--noprogress', '--grid=2',
            f'--net={tmp_path / "net"}', f'--outdir={tmp_path / "out"}']
    r = subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for seed in range(2):
        png = Image.open(tmp_path / 'out' / f'{seed:06d}.png')
        raw = np.load(tmp_path / 'out' / f'{seed:06d}.npz')['x']
        assert png.mode == 'L' and png.size == (8, 8) and raw.shape == (8, 8, 1)
        expected = np.clip(raw[..., 0] * 127.5 + 128, 0, 255).astype(np.uint8)  # EDM2's RGB decode
        np.testing.assert_array_equal(np.asarray(png), expected)
    grid = Image.open(tmp_path / 'out' / 'grid.png')   # 2 images → 2 columns, 1 row
    assert grid.mode == 'L' and grid.size == (16, 8)

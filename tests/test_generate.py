"""experiments.generate and edm2_jax.generation: bad flags and unusable output folders fail fast with
one line, an interrupted run (killed, or Ctrl-C) resumed gives the files of an uninterrupted one (no
partial files left), a folder never mixes two runs, NaN samples stop the run naming their seeds."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edm2_jax import checkpoint, generation, io
from edm2_jax.config import EDM2Config
from edm2_jax.errors import UserError
from helpers import ROOT, cpu_env, generate_cmd, write_tiny_checkpoint

_cmd, _env = generate_cmd, cpu_env


def config_only_checkpoint(net, label_dim=0):
    """A checkpoint directory with a valid config.json and no weights: the flag checks read the
    config; loading the weights would fail."""
    (net / 'variables').mkdir(parents=True)
    config = EDM2Config(img_resolution=8, img_channels=3, label_dim=label_dim, model_channels=16,
                        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    (net / 'config.json').write_text(json.dumps({'format': checkpoint.FORMAT, 'config': config.to_dict(),
                                                 'decoder': {'type': 'rgb'}}))
    return net


@pytest.mark.parametrize('args, message', [
    (['--preset=edm2-img512-nope'], 'unknown --preset'),
    (['--net=NET', '--method=autoguidance', '--guidance=2'], 'needs a --gnet network'),
    (['--net=NET', '--method=cfg', '--guidance=1.5', '--strength=0.1'], "method 'cfg' has no strength"),
    (['--net=NET', '--method=insitu', '--guidance=2'], 'needs its strength: dropout rate p'),
    (['--net=NET', '--method=insitu', '--guidance=2', '--strength=1.5'], 'dropout needs a rate p in [0, 1)'),
    (['--net=NET', '--method=insitu', '--guidance=2', '--strength=0.1', '--blocks=dec.99x99'], 'unknown blocks'),
    (['--net=NET', '--seeds=0-9,x'], 'malformed entry'),
    (['--net=NET', '--seeds=5-2'], 'empty range'),
    (['--net=NET', '--guidance=2'], 'need a --method'),
    (['--net=NET', '--method=insitu', '--guidance=2', '--w=1', '--strength=0.1'], 'not both'),
    (['--net=NET', '--method=autoguidance', '--guidance=2', '--gnet=NET', '--blocks=decoder'], 'takes no block selection'),
    (['--preset=edm2-img512-s-autog-fid', '--checkpoints=CKPTS'],
     'python -m convert.edm2 --src=edm2-img512-s-2147483-0.070.pkl'),
    (['--preset=edm2-img512-xs-fid', '--net=NET'], 'do not also give --net'),
    (['--net=/nonexistent'], 'not a converted checkpoint'),
    (['--net=NET', '--method=sigma-shift', '--guidance=2'], 'needs its strength'),
    (['--net=NET', '--method=pag', '--guidance=2', '--window=4,2'], "method 'pag' takes no window"),
    (['--net=NET', '--method=pag', '--guidance=2', '--gnet=NET'], 'give no --gnet'),
    (['--net=NET', '--seeds=99999999999999999999'], '--seeds: seed 99999999999999999999 in'),
    (['--net=NET', '--seeds=0-9,5'], 'lists seed 5 twice'),
    (['--net=NET', '--seeds=0-99999999'], 'more than 10,000,000'),
    (['--net=NET', '--sigma_min=0'], 'need 0 < sigma_min < sigma_max'),
    (['--net=NET', '--rho=0'], 'rho must be > 0'),
    (['--net=NET', '--num_steps=0'], 'num_steps must be an integer >= 1'),
    (['--net=NET', '--method=cfg', '--guidance=nan'], '--guidance: must be a finite number'),
    (['--net=NET', '--S_churn=-1'], 'need S_churn >= 0'),
    (['--net=NET', '--class=3'], '--class: must lie in [0, 0)'),
    # multi-host: the flags are checked before jax.distributed waits for a coordinator (none listens here)
    (['--net=NET', '--seeds=5-2', '--multihost', '--coordinator_address=localhost:9', '--num_processes=2',
      '--process_id=1'], 'empty range'),
])
@pytest.mark.slow
def test_bad_flags_fail_fast(tmp_path, args, message):
    net = config_only_checkpoint(tmp_path / 'net')  # the flag checks look only at config.json
    args = [a.replace('NET', str(net)).replace('CKPTS', str(tmp_path)) for a in args]
    r = subprocess.run(_cmd(*args, f'--outdir={tmp_path / "out"}'), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('generate: error: ')  # one line, no traceback
    assert not (tmp_path / 'out').exists()


def test_unusable_outdir_fails_before_loading(tmp_path):
    """A file as --outdir, a folder inside a file, a read-only folder: one line, exit 2, and the
    (unloadable) checkpoint never read; a negative guidance weight only warns."""
    net = config_only_checkpoint(tmp_path / 'net', label_dim=10)  # loading it would fail with another message
    (tmp_path / 'file').write_text('x')
    read_only = tmp_path / 'ro'
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere that is not a read-only file system
        read_only = Path('/sys/edm2-jax-generate-test')
    cases = [(tmp_path / 'file', 'is a file'), (tmp_path / 'file' / 'out', 'cannot write there'),
             (read_only / 'out', 'cannot write there')]
    for outdir, message in cases:
        start = time.perf_counter()
        r = subprocess.run(_cmd(f'--net={net}', f'--outdir={outdir}'), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count('\n') == 1, r.stderr[-2000:]
        assert time.perf_counter() - start < 30  # a load and compile first took minutes on a real net
    r = subprocess.run(_cmd(f'--net={net}', '--method=cfg', '--w=-0.5', f'--outdir={tmp_path / "neg"}'),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert 'generate: warning: guidance g = 0.5 < 1' in r.stderr, r.stderr[-2000:]


def _settings(outdir, net, **changes):
    s = dict(net=str(net), gnet=None, vae=None, method='insitu', guidance=2.0, strength=0.25, blocks=None,
             window=None, interval=None, interval_steps=(0, 2), fusion='prefix', num_steps=3,
             sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float('inf'),
             S_noise=1.0, class_idx=None, dtype='float32', subdirs=False, save_npz=False, outdir=str(outdir))
    return {**s, **changes}


def test_a_folder_never_mixes_runs(tmp_path):
    net = tmp_path / 'net'
    (net / 'variables').mkdir(parents=True)
    (net / 'config.json').write_text('{"config": {"label_dim": 10}}')
    out = tmp_path / 'out'
    start = time.perf_counter()
    generation.claim_outdir(_settings(out, net))
    assert time.perf_counter() - start < 1
    stored = json.loads((out / 'run.json').read_text())
    assert stored['settings']['interval_steps'] == [0, 2] and stored['settings']['S_max'] == 'inf'
    assert stored['checkpoints']['net']['config_sha256'] == __import__('hashlib').sha256(
        (net / 'config.json').read_bytes()).hexdigest()
    generation.claim_outdir(_settings(out, net, guidance=3.0))  # no image yet: taken over
    (out / '000000.png').write_bytes(b'an image')
    generation.claim_outdir(_settings(out, net, guidance=3.0))  # the same settings resume
    with pytest.raises(UserError, match=r'other settings: guidance, rho differ.*rerun with the settings'):
        generation.claim_outdir(_settings(out, net, rho=5.0))
    (net / 'config.json').write_text('{"config": {"label_dim": 10}, "x": 1}')
    with pytest.raises(UserError, match='net config_sha256 differ'):
        generation.claim_outdir(_settings(out, net, guidance=3.0))
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    with pytest.raises(UserError, match='holds files but no run.json'):
        generation.claim_outdir(_settings(tmp_path / 'other', net))


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    """The disk filling up in the middle of a PNG: the npz before it is whole, nothing else is left."""
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b'half a png')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', full)
    x = np.ones((8, 8, 3), np.float32)
    with pytest.raises(OSError, match='No space'):
        generation.save_seed(tmp_path, 7, {'subdirs': False, 'save_npz': True}, x, np.zeros((8, 8, 3), np.uint8))
    assert os.listdir(tmp_path) == ['000007.npz']
    np.testing.assert_array_equal(np.load(tmp_path / '000007.npz')['x'], x)


RUN = ['--method=insitu', '--guidance=2', '--strength=0.25', '--seeds=3-120', '--batch=1', '--num_steps=3',
       '--save_npz', '--subdirs', '--noprogress', '--grid=4']
SEEDS = range(3, 121)


def _files(outdir):
    return {p.relative_to(outdir): p.read_bytes() for p in sorted(outdir.rglob('*'))
            if p.is_file() and p.name != 'summary.json'}


def _start(*args, **env):
    return subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _interrupt_at_first_image(proc, outdir, sig):
    """Sends `sig` once the first PNG exists (the run then has more batches to go)."""
    deadline = time.time() + 300
    while not list(outdir.rglob('*.png')):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.communicate(timeout=120)[0]


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_nan_stops(tmp_path):
    net = write_tiny_checkpoint(tmp_path / 'net')
    bad = write_tiny_checkpoint(tmp_path / 'bad', nan=True)
    full, killed, stopped, nan_out, cache = (tmp_path / n for n in ('full', 'killed', 'stopped', 'nan', 'cache'))
    common = [f'--net={net}', *RUN]
    procs = [_start(*common, f'--outdir={full}'),
             _start(*common, f'--outdir={killed}', f'--compile_cache={cache}'),
             _start(*common, f'--outdir={stopped}'),
             _start(f'--net={bad}', '--seeds=0-2', '--batch=2', '--num_steps=2', '--noprogress', f'--outdir={nan_out}')]
    kill_out = _interrupt_at_first_image(procs[1], killed, signal.SIGKILL)
    stop_out = _interrupt_at_first_image(procs[2], stopped, signal.SIGINT)
    outs = [p.communicate(timeout=300)[0] for p in (procs[0], procs[3])]
    assert procs[0].returncode == 0, outs[0][-3000:]
    assert procs[1].returncode == -signal.SIGKILL, kill_out[-3000:]
    assert procs[2].returncode == 130, stop_out[-3000:]
    last = stop_out.strip().splitlines()[-1]  # Ctrl-C: one line, how many were saved, how to resume
    assert last.startswith('generate: interrupted after saving ') and 'rerun the same command to resume' in last
    assert 'Traceback' not in stop_out
    assert procs[3].returncode == 2 and 'non-finite samples: seeds [0, 1]' in outs[1], outs[1][-3000:]
    assert not list(nan_out.rglob('*.png'))

    # The interrupted runs left complete images (+ npz) of a prefix of the seeds and no summary;
    # plant the leftover of a kill in the middle of a write, which the resumed run must remove.
    for part in (killed, stopped):
        pngs = sorted(p.name for p in part.rglob('*.png'))
        assert 0 < len(pngs) < len(SEEDS) and pngs == [f'{s:06d}.png' for s in SEEDS[:len(pngs)]]
        assert not (part / 'summary.json').exists()
    (killed / '000000' / f'{io.TMP_PREFIX}000008.png.x1y2').write_bytes(b'partial')
    assert any(cache.iterdir())  # the persistent compilation cache was written

    expected = _files(full)
    assert sorted(str(k) for k in expected) == sorted(
        ['grid.png', 'run.json'] + [f'000000/{s:06d}.{e}' for s in SEEDS for e in ('png', 'npz')])
    for part, extra in ((killed, [f'--compile_cache={cache}']), (stopped, [])):
        before = len(list(part.rglob('*.png')))
        r = subprocess.run(_cmd(*common, f'--outdir={part}', *extra), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((part / 'summary.json').read_text())
        assert (summary['images_generated'], summary['images_skipped']) == (len(SEEDS) - before, before)
        got = _files(part)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == expected[k], (part, k)
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

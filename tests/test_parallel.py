"""Data-parallel sampling: padding and process slicing, and the same images for every layout
(1, 2, 4 simulated CPU devices; 2 processes × 2 devices over gloo) from `experiments.generate`."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edm2_jax import decoder, io, parallel
from helpers import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEEDS = '0-6'  # 7 seeds: not divisible by 2, 4 or 8; per-device batch 2 pads every layout's last batch


def test_local_batches_pad_and_count():
    chunks = list(parallel.local_batches([5, 6, 7, 8, 9], 2, 4))
    assert [list(c) for c, _ in chunks] == [[5, 6], [7, 8], [9, 9], [9, 9]]
    assert [n for _, n in chunks] == [2, 2, 1, 0]
    assert [(list(c), n) for c, n in parallel.local_batches([], 3, 1)] == [([0, 0, 0], 0)]


def test_process_slice_contiguous_cover():
    seeds = list(range(10, 17))
    parts = [parallel.process_slice(seeds, p, 3) for p in range(3)]
    assert [list(p) for p in parts] == [[10, 11, 12], [13, 14], [15, 16]]


def test_layout_and_local_rows():
    import jax
    mesh = parallel.data_mesh()
    layout = parallel.Layout(mesh, 3)
    assert layout.global_batch == 3 * jax.device_count() and layout.local_batch == layout.global_batch
    x = np.arange(layout.global_batch * 2, dtype=np.float32).reshape(-1, 2)
    g = jax.device_put(x, parallel.batch_sharding(mesh))
    np.testing.assert_array_equal(parallel.local_rows(g), x)
    with pytest.raises(ValueError, match='per-device batch'):
        parallel.Layout(mesh, 0)


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _generate(outdir, devices, extra=()):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS='cpu')
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
    cmd = [sys.executable, '-m', 'experiments.generate', f'--net={outdir.parent / "net"}', '--method=insitu',
           '--guidance=2.5', '--strength=0.2', '--blocks=decoder', f'--seeds={SEEDS}', '--batch=2', '--num_steps=4',
           '--save_npz', '--noprogress', f'--outdir={outdir}', *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp('layouts')
    write_tiny_checkpoint(root / 'net')
    port = _free_port()
    runs = {'1dev': [_generate(root / '1dev', 1)], '2dev': [_generate(root / '2dev', 2)],
            '4dev': [_generate(root / '4dev', 4)],
            '2x2': [_generate(root / '2x2', 2, ['--multihost', f'--coordinator_address=localhost:{port}',
                                                  '--num_processes=2', f'--process_id={i}']) for i in range(2)]}
    for name, procs in runs.items():
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, f'{name}:\n{out[-3000:]}'
    return root


def _load(outdir):
    from PIL import Image
    seeds = range(7)
    raw = np.stack([np.load(outdir / f'{s:06d}.npz')['x'] for s in seeds])
    png = np.stack([np.asarray(Image.open(outdir / f'{s:06d}.png')) for s in seeds])
    return raw, png


@pytest.mark.slow
def test_same_images_for_every_layout(layouts):
    """Every seed gets the same image for 1, 2 and 4 devices and 2 processes × 2 devices (the same
    per-device batch, so the same per-device program) up to float32 rounding: XLA:CPU may compile that
    program differently when several devices exist (bit-identical on some CPUs; on the AVX-512 Xeon
    this suite was last run on, 2 and 4 devices moved single ulps, which the sampler amplifies to
    ≈5e-4 after 4 steps at σ_max 80), so raw samples agree within 2e-3 and PNG pixels within 1 level."""
    raw1, png1 = _load(layouts / '1dev')
    assert np.isfinite(raw1).all() and raw1.std() > 0.05 and png1.std() > 5
    assert len({raw1[i].tobytes() for i in range(7)}) == 7  # every seed its own image
    for name in ('2dev', '4dev', '2x2'):
        raw, png = _load(layouts / name)
        np.testing.assert_allclose(raw, raw1, rtol=0, atol=2e-3, err_msg=name)
        assert np.abs(png.astype(int) - png1).max() <= 1, name
    assert not list(layouts.glob(f'*/{io.TMP_PREFIX}*'))


@pytest.mark.slow
def test_summary_counts_devices_and_hosts(layouts):
    import json
    for name, devices, hosts in (('1dev', 1, 1), ('4dev', 4, 1), ('2x2', 4, 2)):
        summary = json.loads((layouts / name / 'summary.json').read_text())
        assert (summary['devices'], summary['hosts'], summary['images_generated']) == (devices, hosts, 7)
        assert summary['nfe_per_image'] == 2 * (2 * 4 - 1)  # main + in-situ guide at every evaluation


def test_sharded_vae_decoder_matches_host_decode():
    """make_decoder (SD-VAE per device, `chunk` rows at a time) = vae.decode_latents_to_uint8."""
    import jax
    from edm2_jax import vae
    config = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    rng = np.random.default_rng(0)
    dec = vae.VAEDecoder(jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                                      vae.abstract_variables(config)), config)
    layout = parallel.Layout(parallel.data_mesh(), 4)
    x = rng.standard_normal((layout.global_batch, 8, 8, 4)).astype(np.float32)
    scale, bias = decoder.edm2_scale_bias()
    meta = {'type': 'sd-vae', 'scale': scale.tolist(), 'bias': bias.tolist()}
    decode = parallel.make_decoder(layout, meta, dec, chunk=2)
    got = parallel.local_rows(decode(jax.device_put(x, parallel.batch_sharding(layout.mesh))))
    want = vae.decode_latents_to_uint8(dec, x, scale, bias, batch_size=2)
    assert got.shape == (layout.global_batch, 16, 16, 3) and np.abs(got.astype(int) - want).max() <= 1
    with pytest.raises(ValueError, match='needs the VAE'):
        parallel.make_decoder(layout, meta, None)

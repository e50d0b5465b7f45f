r"""The first hour: a network checkpoint → images with three guidance methods → a grid → a score, on a
tiny random network on the CPU in a couple of minutes. Every step is the command a real run uses.

    python examples/tutorial.py [--out=tutorial_out]

What to change for EDM2-S on a GPU (ImageNet-512, a latent model):
  1. Instead of `convert.random`, convert NVIDIA's pickles (read without torch, nothing in them runs):
       python -m convert.edm2 --src=edm2-img512-s-2147483-0.070.pkl --dst=checkpoints/img512-s-2147483-0.070
       python -m convert.edm2 --src=edm2-img512-xs-0134217-0.125.pkl --dst=checkpoints/img512-xs-0134217-0.125
       python -m convert.vae --src=<stabilityai/sd-vae-ft-mse folder> --dst=checkpoints/sd-vae-ft-mse
  2. Generate with `--vae=checkpoints/sd-vae-ft-mse` (without it, latents are saved as .npy; decode them
     later with `python -m experiments.decode`), 32 steps (the default), --batch=32 or more and
     --seeds=0-49999; `--preset=edm2-img512-s-autog-fid --checkpoints=checkpoints` sets the published
     autoguidance setting (g = 2.10). In-situ guidance needs no second network.
  3. Score with FID/FD_DINOv2 against NVIDIA's reference statistics instead of the pixel FD below:
       python -m convert.detectors ...   (once: the Inception and DINOv2 weights)
       python -m experiments.evaluate --images=OUT/none --ref=img512.pkl --metrics=fid,fd_dinov2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# A tiny conditional RGB network (16×16, 10 classes): the architecture flags of convert.random; EDM2-S
# is --preset=img512-s (or a converted pickle, see above).
TINY = ['--img_resolution=16', '--img_channels=3', '--label_dim=10', '--model_channels=16',
        '--channel_mult=1,2', '--num_blocks=1', '--attn_resolutions=8']
# method → generate flags (EDM2-S: 32 steps, the published g; see --method in generate's --helpfull).
METHODS = {
    'none': [],
    'autoguidance': ['--method=autoguidance', '--guidance=2.0', '--gnet={out}/guide'],
    'insitu': ['--method=insitu', '--guidance=2.0', '--strength=0.1'],
}
SEEDS, REFERENCE_SEEDS = '0-63', '1000-1255'   # EDM2: 50,000 images per score
COMMON = ['--num_steps=12', '--batch=64', '--grid=16', '--noprogress']


def run(*args: str) -> None:
    """One CLI step, echoed like a shell script; stops the tutorial if it fails."""
    print('$ python -m ' + ' '.join(args), flush=True)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    subprocess.run([sys.executable, '-m', *args], check=True, env=env)


def features(folder: Path) -> np.ndarray:
    """Each image's 4×4 average-pooled pixels in [0, 1] (48 numbers): a feature space small enough
    for a Fréchet distance over a few dozen images (FID uses 2048 Inception features)."""
    from PIL import Image
    images = np.stack([np.asarray(Image.open(p), np.float64) / 255 for p in sorted(folder.glob('[0-9]*.png'))])
    n, h, w, c = images.shape
    return images.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)


def pixel_fd(a: np.ndarray, b: np.ndarray) -> float:
    from edm2_jax.metrics.frechet import frechet_distance
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def side_by_side(paths, dst: Path) -> None:
    """The methods' grid.png files next to each other, 4-pixel white gaps."""
    from PIL import Image
    from edm2_jax import io
    grids = [np.asarray(Image.open(p).convert('RGB')) for p in paths]
    gap = np.full((grids[0].shape[0], 4, 3), 255, np.uint8)
    io.save_png(dst, np.concatenate([x for g in grids for x in (g, gap)][:-1], axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='tutorial_out', help='output folder (rerun: finished steps are skipped)')
    out = Path(parser.parse_args().out)
    start = time.perf_counter()
    cache = f'--compile_cache={out}/jax_cache'   # a rerun starts without recompiling

    # 1. Networks. A fresh Network.init outputs F = 0 (guidance would do nothing): convert.random draws
    #    non-zero gains. The guide (autoguidance) is a smaller, "worse" version of the main network.
    guide = [f for f in TINY if not f.startswith('--model_channels')] + ['--model_channels=8']
    for name, flags in (('net', TINY + ['--seed=0']), ('guide', guide + ['--seed=1'])):
        if not (out / name).is_dir():
            run('convert.random', f'--dst={out / name}', *flags)

    # 2. Images: {seed:06d}.png and grid.png per method; a rerun of a finished folder is skipped.
    for method, flags in METHODS.items():
        run('experiments.generate', f'--net={out}/net', f'--seeds={SEEDS}', f'--outdir={out}/{method}', cache,
            *COMMON, *(f.format(out=out) for f in flags))
    run('experiments.generate', f'--net={out}/net', f'--seeds={REFERENCE_SEEDS}', f'--outdir={out}/reference',
        cache, *COMMON)

    # 3. One picture and one number per method: Fréchet distance (pixel features) to unguided samples
    #    of other seeds. For a random network this only shows how far guidance moves the samples.
    side_by_side([out / m / 'grid.png' for m in METHODS], out / 'grid.png')
    reference = features(out / 'reference')
    scores = {m: round(pixel_fd(features(out / m), reference), 5) for m in METHODS}
    from edm2_jax import io
    io.write_json(out / 'scores.json', {'metric': 'pixel FD (4x4-pooled) to unguided seeds '
                                        f'{REFERENCE_SEEDS}', 'scores': scores})

    print('\nmethod        pixel FD to unguided samples')
    for m, v in scores.items():
        print(f'{m:<13} {v:.4f}')
    print(f'\nwrote (in {time.perf_counter() - start:.0f} s):\n'
          f'  {out}/grid.png          {", ".join(METHODS)}, left to right\n'
          f'  {out}/scores.json\n'
          f'  {out}/<method>/         images, grid.png, summary.json\n'
          f'  {out}/net, {out}/guide  checkpoints')


if __name__ == '__main__':
    main()

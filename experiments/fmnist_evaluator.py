"""Trains (once) / loads the Fashion-MNIST evaluator and reports its sanity checks.

    python -m experiments.fmnist_evaluator --cache=DIR

Writes DIR/evaluator.json and DIR/evaluator.md: the classifier's test accuracy and, at each generator
resolution (28, 32 = zero-padded, 16 = area-downsampled), FD-FMNIST / precision / recall / class
accuracy of image sets with known quality against the test-split references:
  test (exact)       the reference images themselves (FD 0, precision = recall = 1 by construction);
  train 10k          --num_train random training images: the floor a perfect generator would reach;
  test blur σ=…      test images with a Gaussian blur (σ in 28×28 pixels), then resized to r;
  test noise σ=…     test images plus Gaussian noise (σ as a fraction of the full range), clipped;
  test, wrong labels the test images with requested label (y + 1) mod 10: class accuracy only;
  16×16 vs 28 refs   (r = 16 only) the round-tripped test set against the 28×28 statistics: what the
                     round trip costs, and why the 16×16 references go through it too.
Degradations are applied at 28×28, then the images are resized to r as a generator at r would see them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.ndimage
from absl import app, flags

from edm2_jax import data, io
from edm2_jax.metrics import fmnist

FLAGS = flags.FLAGS
def define_flags() -> None:
    """The CLI flags, defined only when run as a script (other scripts share flag names)."""
    flags.DEFINE_string('cache', None, 'cache directory of the classifier and reference statistics')
    flags.DEFINE_integer('steps', fmnist.TrainSettings.steps, 'classifier training steps')
    flags.DEFINE_integer('batch_size', fmnist.TrainSettings.batch_size, 'classifier training batch size')
    flags.DEFINE_integer('seed', fmnist.TrainSettings.seed, 'classifier training seed')
    flags.DEFINE_integer('num_train', 10000, 'random training images for the floor row')
    flags.DEFINE_list('blur', ['1', '2'], 'Gaussian blur σ (pixels at 28×28)')
    flags.DEFINE_list('noise', ['0.1', '0.3'], 'Gaussian noise σ (fraction of the [0, 255] range)')
    flags.DEFINE_list('resolutions', ['28', '32', '16'], 'generator resolutions to report')


def blur(images, sigma):
    out = scipy.ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0),
                                        mode='constant')
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_noise(images, sigma, seed=0):
    noise = np.random.default_rng(seed).standard_normal(images.shape) * (sigma * 255)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def sanity_rows(evaluator, cache, resolution, num_train, blurs, noises, seed=0):
    test, test_labels = data.load_fashion_mnist('test')
    train, train_labels = data.load_fashion_mnist('train')
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:num_train])
    refs = fmnist.reference_stats(evaluator, cache, resolution)
    sets = [('test (exact)', test, test_labels),
            (f'train {num_train} random', train[pick], train_labels[pick])]
    sets += [(f'test blur σ={s:g}px', blur(test, s), test_labels) for s in blurs]
    sets += [(f'test noise σ={s:g}', add_noise(test, s, seed), test_labels) for s in noises]
    sets += [('test, wrong labels (y+1 mod 10)', test, (test_labels + 1) % fmnist.NUM_CLASSES)]
    rows = []
    for name, images, labels in sets:
        t = time.time()
        r = fmnist.evaluate_images(evaluator, data.resize(images, resolution), labels, refs)
        rows.append({'resolution': resolution, 'set': name, **r, 'seconds': round(time.time() - t, 1)})
        print(_row_md(rows[-1]), flush=True)
    if resolution == 16:
        refs28 = fmnist.reference_stats(evaluator, cache, 28)
        r = fmnist.evaluate_images(evaluator, fmnist.round_trip(test, 16), test_labels, refs28)
        rows.append({'resolution': 16, 'set': 'test round-tripped 16→28 vs 28×28 refs', **r})
        print(_row_md(rows[-1]), flush=True)
    return rows


def _row_md(r):
    acc = '' if r['class_accuracy'] is None else f'{r["class_accuracy"]:.4f}'
    return (f'| {r["resolution"]} | {r["set"]} | {r["fd_fmnist"]:.3f} | {r["precision"]:.4f} | '
            f'{r["recall"]:.4f} | {acc} |')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS.cache:
        raise app.UsageError('--cache is required')
    resolutions = [int(r) for r in FLAGS.resolutions]
    if not set(resolutions) <= set(fmnist.RESOLUTIONS):
        raise app.UsageError(f'--resolutions must be among {fmnist.RESOLUTIONS}')
    blurs, noises = [float(s) for s in FLAGS.blur], [float(s) for s in FLAGS.noise]
    start = time.time()
    cache = Path(FLAGS.cache)
    settings = fmnist.TrainSettings(steps=FLAGS.steps, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    evaluator = fmnist.load_or_train_evaluator(cache, settings)
    print(f'classifier test accuracy {evaluator.test_accuracy:.4f} '
          f'(trained in {evaluator.meta["train_seconds"]} s)', flush=True)
    print('| res | set | FD-FMNIST | precision | recall | class acc. |\n|---|---|---|---|---|---|')
    rows = [row for r in resolutions
            for row in sanity_rows(evaluator, cache, r, FLAGS.num_train, blurs, noises)]
    result = {'classifier': evaluator.meta, 'fingerprint': evaluator.fingerprint,
              'rows': rows, 'wall_seconds': round(time.time() - start, 1)}
    io.write_json(cache / 'evaluator.json', result)
    md = ['# Fashion-MNIST evaluator\n',
          f'Classifier: {evaluator.meta["architecture"]}; features: {fmnist.FEATURE_DIM}-d pre-ReLU '
          f'penultimate layer. Training: {evaluator.meta["settings"]}, {evaluator.meta["train_seconds"]} s.',
          f'Test accuracy: **{evaluator.test_accuracy:.4f}**.\n',
          'References: the 10,000 test images through the same resolution round trip. '
          'Precision/recall: k-NN manifolds, k = 3.\n',
          '| res | set | FD-FMNIST | precision | recall | class acc. |', '|---|---|---|---|---|---|',
          *map(_row_md, rows), f'\nWall time of this report: {result["wall_seconds"]} s.']
    io.write_text(cache / 'evaluator.md', '\n'.join(md) + '\n')
    print(f'wrote {cache / "evaluator.json"} and {cache / "evaluator.md"} ({result["wall_seconds"]} s)')


if __name__ == '__main__':
    define_flags()
    app.run(main)

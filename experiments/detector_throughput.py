"""Images per second of each feature detector (random weights, full size), preprocessing included.

    python -m experiments.detector_throughput --batch=8 --steps=3 --size=512
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from edm2_jax.metrics import dinov2, inception

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 8, 'images per call')
flags.DEFINE_integer('steps', 3, 'timed calls after the compiling one')
flags.DEFINE_integer('size', 512, 'input image size (EDM2 ImageNet-512: 512)')
flags.DEFINE_list('detectors', ['inception', 'dinov2'], 'which detectors to time')


def main(argv):
    del argv
    images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.size, FLAGS.size, 3), np.uint8)
    makers = {'inception': lambda: inception.make_feature_fn(inception.init_variables(jax.random.key(0))),
              'dinov2': lambda: dinov2.make_feature_fn(dinov2.VITL14,
                                                       dinov2.init_variables(dinov2.VITL14, jax.random.key(0)))}
    print(f'devices: {jax.devices()}')
    for name in FLAGS.detectors:
        fn = makers[name]()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(images))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            jax.block_until_ready(fn(images))
        per_step = (time.perf_counter() - t0) / FLAGS.steps
        print(f'{name}: first call (compile + run) {compile_s:.1f} s; {FLAGS.batch / per_step:.2f} images/s '
              f'({per_step:.2f} s per batch of {FLAGS.batch} at {FLAGS.size}²)', flush=True)


if __name__ == '__main__':
    app.run(main)

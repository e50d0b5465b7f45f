"""Decode throughput of the SD-VAE decoder (sd-vae-ft-mse configuration, random weights).

    python -m experiments.vae_benchmark [--batch_size=1] [--latent_size=64] [--repeats=3] [--dtype=float32]

Prints one JSON line: compile seconds, seconds per batch (median of --repeats), the process CPU
seconds of each call (all threads; telling on a shared machine), images/s, devices.
Random weights cost the same as the real ones, so no download is needed.
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from edm2_jax import decoder, vae

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 1, 'latents per decode call')
flags.DEFINE_integer('latent_size', 64, 'latent height = width (64 → 512×512 images)')
flags.DEFINE_integer('repeats', 3, 'timed calls after the compile call')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')


def main(argv):
    del argv
    config = vae.VAEConfig()
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
                             vae.abstract_variables(config))
    net = jax.device_put(vae.VAEDecoder(variables, config, jnp.dtype(FLAGS.dtype)))
    scale, bias = decoder.edm2_scale_bias()
    x = jnp.asarray(rng.standard_normal((FLAGS.batch_size, FLAGS.latent_size, FLAGS.latent_size, 4)),
                    jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(lambda d, x: vae.latents_to_uint8(d, x, scale, bias)).lower(net, x).compile()
    compile_s = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(FLAGS.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        compiled(net, x).block_until_ready()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    per_batch = statistics.median(times)
    print(json.dumps({
        'config': 'sd-vae-ft-mse', 'params': vae.param_count(config), 'dtype': FLAGS.dtype,
        'latent': [FLAGS.batch_size, FLAGS.latent_size, FLAGS.latent_size, 4],
        'image': [FLAGS.batch_size, 8 * FLAGS.latent_size, 8 * FLAGS.latent_size, 3],
        'compile_s': round(compile_s, 2), 'seconds_per_batch': round(per_batch, 3),
        'all_s': [round(t, 3) for t in times], 'cpu_s': [round(t, 3) for t in cpu_times],
        'images_per_s': round(FLAGS.batch_size / per_batch, 4),
        'devices': [str(d) for d in jax.devices()]}))


if __name__ == '__main__':
    app.run(main)

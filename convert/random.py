r"""A random EDM2 network whose output is not zero, written as a converted checkpoint directory: for
experiments, tutorials and benchmarks where no trained network is at hand.

    python -m convert.random --preset=img64-s --dst=checkpoints/random-img64-s
    python -m convert.random --dst=tiny --img_resolution=8 --img_channels=3 --label_dim=10 \
        --model_channels=16 --channel_mult=1,2 --num_blocks=1 --attn_resolutions=4

The directory is the one `python -m convert.edm2` writes from an NVIDIA pickle, so `generate` and
`study` take either. In Python: `edm2_jax.Network.random(config, seed)` and
`edm2_jax.checkpoint.save(dst, net, decoder=...)`. `Network.init` is not enough: EDM2 initialises
every gain to zero, so its output F is 0, D(x) = c_skip·x, and guidance has no effect; here every
weight and buffer is standard normal and every gain uniform in --gains.
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from convert.edm2 import DECODERS, architecture_flags, decoder_spec, define_architecture_flags
from edm2_jax import checkpoint
from edm2_jax.config import EDM2Config, get_preset
from edm2_jax.errors import UserError, cli_main
from edm2_jax.network import Network

FLAGS = flags.FLAGS


def random_config(preset: str | None, architecture: dict) -> EDM2Config:
    """The preset's EDM2Config with the given fields replaced (without a preset: img_resolution and
    img_channels are required, the rest has EDM2Config's defaults)."""
    fields = {}
    if preset is not None:
        try:
            fields = get_preset(preset).to_dict()
        except ValueError as e:
            raise UserError(str(e), where='--preset') from None
    fields.update(architecture)
    missing = [f'--{n}' for n in ('img_resolution', 'img_channels') if n not in fields]
    if missing:
        raise UserError(f'give --preset or {" and ".join(missing)}', fix='e.g. --preset=img64-xs')
    try:
        return EDM2Config(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(str(e), fix='see the architecture flags in --helpfull') from None


def write_random(dst, config: EDM2Config, *, seed: int = 0, gains=(0.5, 1.5), decoder: str = 'auto',
                 overwrite: bool = False):
    """Saves `Network.random(config, seed, gains)` to `dst` with its decoder ('auto': RGB for 3
    channels, EDM2's SD-VAE for 4, none recorded otherwise: pixel space); returns the directory."""
    try:
        net = Network.random(config, seed, gains=gains)
        spec = decoder_spec(decoder, None, config)
    except ValueError as e:
        raise UserError(str(e)) from None
    source = {'format': 'random', 'seed': seed, 'gains': list(gains)}
    return checkpoint.save(dst, net, source=source, decoder=spec, overwrite=overwrite)


def define_flags():
    flags.DEFINE_string('dst', None, 'Output directory (must not exist unless --overwrite).')
    flags.DEFINE_bool('overwrite', False, 'Replace --dst if it exists.')
    flags.DEFINE_string('preset', None, 'EDM2 preset giving the architecture (e.g. img64-s, img512-xs); '
                        'architecture flags override its fields.')
    flags.DEFINE_integer('seed', 0, 'Random seed of the weights.')
    flags.DEFINE_list('gains', ['0.5', '1.5'], 'Every scalar gain is drawn uniformly in "lo,hi" (0 < lo).')
    flags.DEFINE_enum('decoder', 'auto', list(DECODERS), 'Decoder recorded in config.json: auto = SD-VAE '
                      'for 4 channels, RGB otherwise.')
    define_architecture_flags()


@cli_main('convert.random')
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if FLAGS.dst is None:
        raise UserError('give --dst (the output directory)')
    if Path(FLAGS.dst).exists() and not FLAGS.overwrite:
        raise UserError('already exists', where=f'--dst {FLAGS.dst}', fix='use --overwrite to replace it')
    try:
        gains = tuple(float(g) for g in FLAGS.gains)
    except ValueError:
        gains = ()
    if len(gains) != 2 or not 0 < gains[0] <= gains[1]:
        raise UserError(f'expected "lo,hi" with 0 < lo <= hi, got {",".join(FLAGS.gains)!r}', where='--gains')
    config = random_config(FLAGS.preset, architecture_flags())
    start = time.perf_counter()
    out = write_random(FLAGS.dst, config, seed=FLAGS.seed, gains=gains, decoder=FLAGS.decoder,
                       overwrite=FLAGS.overwrite)
    print(f'wrote {out} in {time.perf_counter() - start:.1f} s\n  config:  {config}\n'
          f'  decoder: {checkpoint.read_meta(out)["decoder"]}')


if __name__ == '__main__':
    define_flags()
    app.run(main)

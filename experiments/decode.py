r"""Decode latents saved by `generate` (a latent model run without --vae) into PNGs with the SD-VAE.

    python -m experiments.decode --latents=out --vae=checkpoints/sd-vae-ft-mse --out=out_png

Every `{seed:06d}.npy` under --latents (searched recursively; subfolders are kept) becomes
`{seed:06d}.png` under --out, written atomically; a rerun skips the PNGs that exist. The latents are
in EDM2's standardised space: raw = (x − bias)/scale with the network's decoder entry (edm2-spec §3.3),
read from --net or else from the network recorded in --latents/run.json. Memory: --batch latents at a
time. The PNGs are the ones `generate --vae` would have written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

from edm2_jax import io
from edm2_jax.errors import UserError, cli_main

FLAGS = flags.FLAGS


def latent_files(folder: Path) -> list[Path]:
    """The .npy files under `folder` (temporaries of a killed run excluded), sorted."""
    if not folder.is_dir():
        raise UserError('is not a directory', where=f'--latents {folder}', fix="give generate's --outdir")
    files = sorted(p for p in folder.rglob('*.npy') if not p.name.startswith('.'))
    if not files:
        raise UserError('holds no .npy latents', where=f'--latents {folder}',
                        fix='generate a latent model without --vae into it first')
    return files


def network_decoder(latents: Path, net: str | None):
    """The DecoderSpec of --net, or of the network recorded in --latents/run.json: must be 'sd-vae'."""
    from edm2_jax import checkpoint, generation
    where = '--net'
    if net is None:
        run_file = latents / generation.RUN_FILE
        try:
            net = io.read_json(run_file)['checkpoints']['net']['path']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f'names no network ({e})', where=str(run_file),
                            fix='give --net (the latent network the latents came from)') from None
        where = f'the net in {run_file}'
    try:
        decoder = checkpoint.read_decoder(net)
    except (OSError, ValueError) as e:
        raise UserError(f'{net}: not a converted checkpoint directory ({e})', where=where) from None
    if decoder is None or decoder.kind != 'sd-vae':
        raise UserError(f'{net} is not a latent model (decoder {decoder and decoder.kind})', where=where,
                        fix='its samples are PNGs already')
    return decoder


def decode_folder(latents, vae_dir, out, *, net: str | None = None, batch: int = 4) -> tuple[int, int]:
    """Decodes every latent file under `latents` into `out`; returns (decoded, skipped). Everything is
    checked (files, decoder, the VAE's config, the first file's shape) before the VAE is loaded."""
    from edm2_jax import checkpoint, vae as vae_lib
    latents, out = Path(latents), Path(out)
    if batch < 1:
        raise UserError(f'must be >= 1, got {batch}', where='--batch')
    files = latent_files(latents)
    decoder = network_decoder(latents, net)
    try:
        meta = checkpoint.read_meta(vae_dir)
        if meta.get('format') != vae_lib.FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {vae_lib.FORMAT!r}")
        config = vae_lib.VAEConfig.from_diffusers(meta['config'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'not a converted VAE ({e})', where=f'--vae {vae_dir}',
                        fix='convert one with python -m convert.vae') from None
    todo = [(f, out / f.relative_to(latents).with_suffix('.png')) for f in files]
    todo = [(f, png) for f, png in todo if not png.is_file()]
    shape = _shape(files[0])
    if len(shape) != 3 or shape[-1] != decoder.channels or shape[-1] != config.latent_channels:
        raise UserError(f'latents of shape {shape}; the network decodes [h, w, {decoder.channels}] '
                        f'and the VAE takes {config.latent_channels} channels', where=str(files[0]))
    if not todo:
        return 0, len(files)
    vae = vae_lib.load(vae_dir)
    if out.is_dir():  # temporaries of a killed run
        io.remove_temporaries(out, recursive=True)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        x = np.stack([_read(f, shape) for f, _ in chunk])
        images = vae_lib.decode_latents_to_uint8(vae, x, decoder.scale, decoder.bias, batch_size=batch)
        for (_, png), image in zip(chunk, images):
            io.save_png(png, image)
    return len(todo), len(files) - len(todo)


def _shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode='r').shape)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot be read ({e})', where=str(path)) from None


def _read(path: Path, shape) -> np.ndarray:
    try:
        x = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot be read ({e})', where=str(path)) from None
    if x.shape != shape or not np.isfinite(x).all():
        raise UserError(f'shape {x.shape} (expected {shape}) or non-finite values', where=str(path))
    return x.astype(np.float32)


def define_flags() -> None:
    flags.DEFINE_string('latents', None, "Folder of {seed:06d}.npy latents (generate's --outdir).")
    flags.DEFINE_string('vae', None, 'Converted SD-VAE directory (python -m convert.vae).')
    flags.DEFINE_string('out', None, 'Output folder of the PNGs.')
    flags.DEFINE_string('net', None, 'The latent network (its config.json gives scale and bias); default: '
                        'the one in --latents/run.json.')
    flags.DEFINE_integer('batch', 4, 'Latents decoded at a time (bounds memory).')


@cli_main('decode')
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    missing = [f'--{n}' for n in ('latents', 'vae', 'out') if FLAGS[n].value is None]
    if missing:
        raise UserError(f'give {", ".join(missing)}')
    try:
        done, skipped = decode_folder(FLAGS.latents, FLAGS.vae, FLAGS.out, net=FLAGS.net, batch=FLAGS.batch)
    except OSError as e:
        raise UserError(f'{e.strerror or e}', where=e.filename, fix='rerun the same command to resume') from None
    print(f'decoded {done} latents ({skipped} already there) into {FLAGS.out}')


if __name__ == '__main__':
    define_flags()
    app.run(main)

"""Image generation at scale: every device of every host, resumable, EDM2's output layout.

Images are `{seed:06d}.png` (with subdirs in `{seed//1000*1000:06d}/`), written atomically; a rerun
skips seeds whose outputs exist, so an interrupted run resumed gives the same files. Each sample
depends only on its seed. Each process samples a contiguous slice of the seeds and writes only its
own images. The folder's `run.json` (written before any image) records the settings that decide the
images and the checkpoints' config sha256; a run whose settings differ is refused, so one folder
never mixes two runs.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from edm2_jax import backend, io
from edm2_jax.errors import UserError
from edm2_jax.seeds import format_seeds

RUN_FILE = 'run.json'
SUMMARY_FILE = 'summary.json'
CHECKPOINTS = ('net', 'gnet', 'vae')
# The settings that decide a seed's files; the others (seeds, batch, grid, …) may change on a resume.
IMAGE_SETTINGS = ('method', 'guidance', 'strength', 'blocks', 'window', 'interval', 'interval_steps',
                  'fusion', 'num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max',
                  'S_noise', 'class_idx', 'dtype', 'subdirs', 'save_npz', 'guidance_config')


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with the number of images this process had saved."""

    def __init__(self, saved: int):
        self.saved = saved
        super().__init__(f'interrupted after saving {saved} images; rerun the same command to resume')


# ---------------------------------------------------------------------------------------------------
# Output files.

def image_path(outdir: Path, seed: int, subdirs: bool, suffix: str = '.png') -> Path:
    folder = outdir / f'{seed // 1000 * 1000:06d}' if subdirs else outdir
    return folder / f'{seed:06d}{suffix}'


def outputs(outdir: Path, seed: int, s: dict) -> list[Path]:
    """The files a finished seed has: its PNG (or, for a latent model without --vae, its latents
    as .npy) and, with --save_npz, its raw sampler output."""
    paths = [image_path(outdir, seed, s['subdirs'], '.npy' if s.get('latents_only') else '.png')]
    if s['save_npz']:
        paths.append(image_path(outdir, seed, s['subdirs'], '.npz'))
    return paths


def save_seed(outdir: Path, seed: int, s: dict, x, image) -> None:
    """A seed's files: raw output x (with save_npz), and its PNG (image) or, without one, latents."""
    if s['save_npz']:
        io.save_npz(image_path(outdir, seed, s['subdirs'], '.npz'), x=x)
    if image is None:
        io.save_npy(image_path(outdir, seed, s['subdirs'], '.npy'), x)
    else:
        io.save_png(image_path(outdir, seed, s['subdirs']), image)


def checkpoint_info(path) -> dict:
    from edm2_jax import checkpoint
    meta = checkpoint.read_meta(path)
    return {'path': str(Path(path).resolve()), 'config_sha256': io.sha256(Path(path) / 'config.json'),
            'source': meta.get('source')}


def run_record(s: dict) -> dict:
    """What run.json holds: the image settings and the checkpoints, as JSON reads them back."""
    record = {'settings': {k: s.get(k) for k in IMAGE_SETTINGS},  # guidance_config may be absent: None
              'checkpoints': {k: checkpoint_info(s[k]) for k in CHECKPOINTS if s[k] is not None}}
    return io.jsonable(record)


def differences(stored: dict, record: dict) -> list[str]:
    """Names of the settings (and checkpoint fields, e.g. 'net config_sha256') that differ."""
    names = [k for k in IMAGE_SETTINGS if stored.get('settings', {}).get(k) != record['settings'][k]]
    old, new = stored.get('checkpoints', {}), record['checkpoints']
    for k in CHECKPOINTS:
        if (k in old) != (k in new):
            names.append(k)
        elif k in new:
            names += [f'{k} {f}' for f in ('path', 'config_sha256') if old[k].get(f) != new[k][f]]
    return names


def _read_run(run_file: Path) -> dict:
    try:
        return io.read_json(run_file)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot be read ({e})', where=str(run_file),
                        fix='choose a new --outdir') from None


def claim_outdir(s: dict) -> None:
    """Makes the output folder and records the run in run.json, or refuses (UserError) a folder that
    cannot be written, holds another run's files, or files of no run. Reads no weights: cheap. A
    folder holding only run.json (a run that failed before its first image) is taken over."""
    outdir = Path(s['outdir'])
    where = f'--outdir {outdir}'
    if outdir.exists() and not outdir.is_dir():
        raise UserError('is a file, not a directory', where=where, fix='choose a directory')
    record = run_record(s)
    run_file = outdir / RUN_FILE
    try:
        started = outdir.is_dir() and any(p.name != RUN_FILE and not p.name.startswith(io.TMP_PREFIX)
                                          for p in outdir.iterdir())
    except OSError as e:
        raise UserError(f'cannot read it ({e.strerror})', where=where, fix='choose a readable directory') from None
    if started and not run_file.is_file():
        raise UserError(f'holds files but no {RUN_FILE}: not a folder of this generator',
                        where=where, fix='choose a new or empty --outdir')
    found = differences(_read_run(run_file), record) if started else []
    if found:
        raise UserError(f'holds a run with other settings: {", ".join(found)} differ', where=where,
                        fix=f'rerun with the settings in {run_file}, or choose a new --outdir')
    try:
        io.write_json(run_file, record)
    except OSError as e:
        raise UserError(f'cannot write there ({e.strerror})', where=where,
                        fix='choose a writable directory') from None


def guidance_terms(s: dict, guide) -> tuple:
    """The run's guidance terms: its guidance configuration's (the role "gnet" is `guide`), or its
    method's."""
    from edm2_jax import guidance_config, sampling
    if s.get('guidance_config') is not None:
        return guidance_config.build(s['guidance_config'], {} if guide is None else {'gnet': guide},
                                     s['num_steps'])
    return sampling.guidance_terms(s['method'], s['guidance'], s['strength'], guide=guide, blocks=s['blocks'],
                                   window=s['window'])


def nfe_per_image(s: dict, net, guide) -> float:
    """Network evaluations per image of the settings (`methods.nfe_per_image`; churn ignored)."""
    from edm2_jax import guidance, methods
    terms = guidance_terms(s, guide)
    interval = s['interval']
    if s['interval_steps'] is not None:
        interval = guidance.Interval.steps(*s['interval_steps'])
    return methods.nfe_per_image(terms, net.config, s['num_steps'], interval, s['sigma_min'], s['sigma_max'],
                                 s['rho'])


def write_grid(outdir: Path, s: dict, count: int) -> None:
    """grid.png of the first `count` seeds' images, read back from disk (those present)."""
    from PIL import Image
    images = [np.asarray(Image.open(p)) for seed in s['seeds'][:count]
              if (p := image_path(outdir, seed, s['subdirs'])).is_file()]
    if not images:
        return
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w) + images[0].shape[2:], np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    io.save_png(outdir / 'grid.png', grid)


def sampler_kwargs(s: dict) -> dict:
    """`parallel.make_sampler` keyword arguments of the settings (a guidance configuration's terms
    as `terms_of`)."""
    kwargs = dict(fusion=s['fusion'], num_steps=s['num_steps'], sigma_min=s['sigma_min'],
                  sigma_max=s['sigma_max'], rho=s['rho'], S_churn=s['S_churn'], S_min=s['S_min'],
                  S_max=s['S_max'], S_noise=s['S_noise'])
    if s.get('guidance_config') is not None:
        return dict(kwargs, terms_of=lambda guide: guidance_terms(s, guide))
    kwargs['method'] = s['method']
    if s['method'] != 'none':
        kwargs.update({k: s[k] for k in ('guidance', 'strength', 'blocks', 'window', 'interval', 'interval_steps')})
    return kwargs


# ---------------------------------------------------------------------------------------------------
# The run.

def _load(s: dict, layout):
    """(net, guide, decode or None): the networks and the decoder; s['latents_only'] is set."""
    import jax
    import jax.numpy as jnp
    from edm2_jax import checkpoint, parallel, vae as vae_lib
    dtype = jnp.dtype(s['dtype'])
    net = checkpoint.load(s['net'], layout.mesh).replace(dtype=dtype)
    guide = None if s['gnet'] is None else checkpoint.load(s['gnet'], layout.mesh).replace(dtype=dtype)
    decoder = checkpoint.read_decoder(s['net'])
    if (decoder is None or decoder.kind == 'rgb') and net.config.img_channels not in (1, 3):
        raise UserError(f'a pixel-space network must have 1 (greyscale) or 3 (RGB) channels, not '
                        f'{net.config.img_channels}', where=s['net'],
                        fix='is it a latent model converted without its decoder?')
    vae = None if s['vae'] is None else vae_lib.load(s['vae'], mesh=layout.mesh)
    s['latents_only'] = decoder is not None and decoder.kind == 'sd-vae' and vae is None
    if not s['latents_only']:
        return net, guide, parallel.make_decoder(layout, decoder, vae)
    if jax.process_index() == 0:
        print(f"generate: {s['net']} is a latent model and no --vae was given: saving latents "
              '({seed:06d}.npy, EDM2 latent space) instead of PNGs; decode them later with '
              f"python -m experiments.decode --latents={s['outdir']} --vae=VAE_DIR --out=PNG_DIR",
              file=sys.stderr)
    return net, guide, None


def _todo(outdir: Path, s: dict) -> np.ndarray:
    """This process's seeds whose files are missing (an int64 array: 8 bytes a seed)."""
    from edm2_jax import parallel
    mine = parallel.process_slice(s['seeds'])
    return np.fromiter((seed for seed in mine if not all(p.is_file() for p in outputs(outdir, seed, s))),
                       np.int64)


def start_multihost(**kwargs) -> None:
    """jax.distributed for a multi-host run (gloo collectives on CPU); call it before anything else
    touches JAX (`kwargs`: coordinator_address, num_processes, process_id, where not auto-detected)."""
    import jax
    from edm2_jax import parallel
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU only; GPU/TPU ignore it
    parallel.initialize_distributed(**kwargs)


def generate(s: dict, *, progress: bool = True, compile_cache: str | None = None) -> dict:
    """Runs the settings `s` (the CLI's `resolve_settings`, after `claim_outdir`; multi-host runs
    after `start_multihost`); returns the summary (process 0 writes it). Ctrl-C raises
    `Interrupted`; every image saved stays valid."""
    import jax
    if compile_cache:
        jax.config.update('jax_compilation_cache_dir', compile_cache)
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
        jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    from edm2_jax import parallel

    outdir = Path(s['outdir'])
    layout = parallel.Layout(parallel.data_mesh(), s['batch'])
    net, guide, decode = _load(s, layout)
    sampler = parallel.make_sampler(layout, **sampler_kwargs(s))
    lead = jax.process_index() == 0
    if lead:  # temporaries of a killed run; no process writes before the agree_max below
        io.remove_temporaries(outdir, recursive=s['subdirs'])
    todo = _todo(outdir, s)
    num_batches = parallel.agree_max(math.ceil(len(todo) / layout.local_batch))
    total = parallel.agree_sum(len(todo))

    compile_time = sample_time = 0.0
    done = 0
    bar = None
    if lead and progress and num_batches:
        from tqdm import tqdm
        bar = tqdm(total=total, unit='img', desc='generate', dynamic_ncols=True, file=sys.stderr)
    compiled = None
    try:
        for chunk, n in parallel.local_batches(todo, layout.local_batch, num_batches):
            noise, labels, key_data = parallel.global_inputs(layout, net, chunk, s['class_idx'])
            if compiled is None:
                start = time.perf_counter()
                compiled = sampler.lower(net, guide, noise, labels, key_data).compile()
                compile_time = time.perf_counter() - start
            start = time.perf_counter()
            x = compiled(net, guide, noise, labels, key_data)
            images = None if decode is None else parallel.local_rows(decode(x))[:n]
            x_local = parallel.local_rows(x)[:n]
            bad = ~np.isfinite(x_local.reshape(n, -1)).all(axis=1)
            if parallel.agree_max(int(bad.any())):  # every process stops together
                if bad.any():
                    raise FloatingPointError(f'non-finite samples: seeds {[int(v) for v in chunk[:n][bad]]} '
                                             f'(process {jax.process_index()}); nothing written for this batch')
                raise FloatingPointError('non-finite samples on another process')
            for k, seed in enumerate(chunk[:n]):
                save_seed(outdir, int(seed), s, x_local[k], None if images is None else images[k])
                done += 1
            sample_time += time.perf_counter() - start
            if bar is not None:  # real images of the whole batch (padding rows sit at each process's end)
                bar.update(min(layout.global_batch, total - bar.n))
    except KeyboardInterrupt:
        raise Interrupted(done) from None
    finally:
        if bar is not None:
            bar.close()
    generated = parallel.agree_sum(done)

    seeds = s['seeds']
    summary = {
        'settings': {k: v for k, v in s.items() if k != 'seeds'},
        'seeds': {'count': len(seeds), 'first': seeds[0], 'last': seeds[-1], 'list': format_seeds(seeds)},
        'checkpoints': {k: checkpoint_info(s[k]) for k in CHECKPOINTS if s[k] is not None},
        'nfe_per_image': nfe_per_image(s, net, guide),
        'images_generated': generated,
        'images_skipped': len(seeds) - generated,
        'batches': num_batches,
        'global_batch': layout.global_batch,
        'compile_time_s': round(compile_time, 3),
        'sampling_time_s': round(sample_time, 3),
        'images_per_s': round(generated / sample_time, 4) if sample_time else None,
        'devices': layout.num_devices,
        'hosts': jax.process_count(),
        'backend': backend.describe(),
    }
    if lead:
        if s['grid'] and not s['latents_only']:
            write_grid(outdir, s, s['grid'])
        io.write_json(outdir / SUMMARY_FILE, summary)
    return summary

r"""Generate images at scale: every device of every host, resumable, EDM2's output layout.

    python -m experiments.generate --preset=edm2-img512-s-autog-fid --checkpoints=checkpoints \
        --vae=checkpoints/sd-vae-ft-mse --seeds=0-49999 --batch=32 --outdir=out --subdirs

    python -m experiments.generate --net=checkpoints/img64-s --method=insitu --guidance=1.5 --p=0.1 \
        --perturb=decoder --seeds=0-49999 --outdir=out

Images are `{seed:06d}.png` (with --subdirs in `{seed//1000*1000:06d}/`), written atomically; a
rerun skips seeds whose outputs exist, so an interrupted run resumed gives the same files. Each
sample depends only on its seed. --multihost initialises jax.distributed (TPU slices and SLURM
auto-detect; else --coordinator_address/--num_processes/--process_id); each process samples a
contiguous slice of the seeds and writes only its own images.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
SELF_GUIDANCE = ('pag', 'slg', 'seg', 'tpg', 'sigma-shift', 'swg')  # the network degraded at call time
METHODS = ('none', 'cfg', 'autoguidance', 'insitu', 'hybrid') + SELF_GUIDANCE
STOP_ENV = 'EDM2_GENERATE_STOP_AFTER_BATCHES'  # testing: exit abruptly after k batches (a "kill")


# ---------------------------------------------------------------------------------------------------
# EDM2 presets (spec §2.2): name → (net, guide, method, guidance). Files are the NVIDIA pickles'
# names without .pkl; convert each with `python -m convert.edm2 --src=NAME.pkl --dst=CKPTS/NAME`.

def _edm2_presets():
    p = {}
    unguided = {'img512-xs': ('2147483', '0.135', '0.200'), 'img512-s': ('2147483', '0.130', '0.190'),
                'img512-m': ('2147483', '0.100', '0.155'), 'img512-l': ('1879048', '0.085', '0.155'),
                'img512-xl': ('1342177', '0.085', '0.155'), 'img512-xxl': ('0939524', '0.070', '0.150')}
    for model, (kimg, fid, dino) in unguided.items():
        p[f'edm2-{model}-fid'] = (f'edm2-{model}-{kimg}-{fid}', None, 'none', 1.0)
        p[f'edm2-{model}-dino'] = (f'edm2-{model}-{kimg}-{dino}', None, 'none', 1.0)
    for model, kimg, std in (('img64-s', '1073741', '0.075'), ('img64-m', '2147483', '0.060'),
                             ('img64-l', '1073741', '0.040'), ('img64-xl', '0671088', '0.040')):
        p[f'edm2-{model}-fid'] = (f'edm2-{model}-{kimg}-{std}', None, 'none', 1.0)
    guided = {'xs': ('2147483', '0.045', 1.40, '0.150', 1.70), 's': ('2147483', '0.025', 1.40, '0.085', 1.90),
              'm': ('2147483', '0.030', 1.20, '0.015', 2.00), 'l': ('1879048', '0.015', 1.20, '0.035', 1.70),
              'xl': ('1342177', '0.020', 1.20, '0.030', 1.70), 'xxl': ('0939524', '0.015', 1.20, '0.015', 1.70)}
    for size, (kimg, fid, g_fid, dino, g_dino) in guided.items():
        for metric, std, g in (('fid', fid, g_fid), ('dino', dino, g_dino)):
            p[f'edm2-img512-{size}-guid-{metric}'] = (
                f'edm2-img512-{size}-{kimg}-{std}', f'edm2-img512-xs-uncond-2147483-{std}', 'cfg', g)
    for name, net, gnet, g in (
            ('img512-s-autog-fid', 'img512-s-2147483-0.070', 'img512-xs-0134217-0.125', 2.10),
            ('img512-s-autog-dino', 'img512-s-2147483-0.120', 'img512-xs-0134217-0.165', 2.45),
            ('img512-xxl-autog-fid', 'img512-xxl-0939524-0.075', 'img512-m-0268435-0.155', 2.05),
            ('img512-xxl-autog-dino', 'img512-xxl-0939524-0.130', 'img512-m-0268435-0.205', 2.30),
            ('img512-s-uncond-autog-fid', 'img512-s-uncond-2147483-0.070', 'img512-xs-uncond-0134217-0.110', 2.85),
            ('img512-s-uncond-autog-dino', 'img512-s-uncond-2147483-0.090', 'img512-xs-uncond-0134217-0.125', 2.90),
            ('img64-s-autog-fid', 'img64-s-1073741-0.045', 'img64-xs-0134217-0.110', 1.70),
            ('img64-s-autog-dino', 'img64-s-1073741-0.105', 'img64-xs-0134217-0.175', 2.20)):
        p[f'edm2-{name}'] = (f'edm2-{net}', f'edm2-{gnet}', 'autoguidance', g)
    return p


PRESETS = _edm2_presets()


# ---------------------------------------------------------------------------------------------------
# Flag parsing and checks: everything is validated before any checkpoint is read.

def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' → [0, 1, 2, 3, 7, 10, 11] (EDM2's parse_int_list); duplicates are an error."""
    seeds = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise ValueError(f'--seeds: malformed entry {part!r} in {text!r} (expected e.g. 0-49999 or 1,5,10-19)')
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f'--seeds: empty range {part!r}')
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'--seeds: {text!r} lists some seeds twice')
    return seeds


def resolve_settings(f) -> dict:
    """The run's settings from the flags (a dict of plain values), or ValueError naming the problem."""
    s = {}
    if f.preset is not None:
        if f.preset not in PRESETS:
            raise ValueError(f'unknown --preset {f.preset!r}; known: {", ".join(sorted(PRESETS))}')
        clash = [n for n in ('net', 'gnet', 'method', 'guidance', 'w') if getattr(f, n) is not None]
        if clash:
            raise ValueError(f'--preset sets --net/--gnet/--method/--guidance; do not also give '
                             f'{", ".join("--" + n for n in clash)}')
        net, gnet, method, g = PRESETS[f.preset]
        root = Path(f.checkpoints)
        s.update(net=str(root / net), gnet=None if gnet is None else str(root / gnet), method=method,
                 guidance=g)
    else:
        if f.net is None:
            raise ValueError('give --net (a converted checkpoint directory) or --preset')
        if f.guidance is not None and f.w is not None:
            raise ValueError('give --guidance (g) or --w (= g - 1), not both')
        method = f.method or 'none'
        g = f.guidance if f.guidance is not None else (1.0 + f.w if f.w is not None else None)
        if method == 'none' and g not in (None, 1.0):
            raise ValueError('--guidance/--w need a --method (cfg, autoguidance, insitu or hybrid)')
        if method != 'none' and g is None:
            raise ValueError(f'--method={method} needs --guidance (g) or --w')
        s.update(net=f.net, gnet=f.gnet, method=method, guidance=1.0 if g is None else g)
    method = s['method']
    if method in ('autoguidance', 'hybrid') and s['gnet'] is None:
        raise ValueError(f'--method={method} needs --gnet (the guide network)')
    if (method in ('none', 'insitu') or method in SELF_GUIDANCE) and s['gnet'] is not None:
        raise ValueError(f'--method={method} uses no --gnet')
    uses_p = method in ('insitu', 'hybrid')
    if f.p is not None and not uses_p:
        raise ValueError(f'--p is the dropout rate of insitu/hybrid guidance; --method={method} uses none')
    if uses_p and f.p is None:
        raise ValueError(f'--method={method} needs --p (the guide dropout rate)')
    if f.p is not None and not 0 < f.p < 1:
        raise ValueError(f'--p must lie in (0, 1), got {f.p}')
    if f.perturb is not None and not (uses_p or method in ('pag', 'slg', 'seg', 'tpg')):
        raise ValueError(f'--perturb selects the perturbed blocks of insitu/hybrid/pag/slg/seg/tpg, '
                         f'not --method={method}')
    if f.strength is not None and method not in SELF_GUIDANCE[:5]:
        raise ValueError(f'--strength is for --method={"/".join(SELF_GUIDANCE[:5])}, not --method={method}')
    if method == 'sigma-shift' and f.strength is None:
        raise ValueError('--method=sigma-shift needs --strength (delta: the guide sees sigma*(1+delta))')
    if f.window is not None and method != 'swg':
        raise ValueError(f'--window is for --method=swg, not --method={method}')
    s.update(p=f.p, perturb=_parse_perturb(f.perturb), strength=f.strength,
             window=_pair(f.window, int, 'window'))
    if f.interval is not None and f.interval_steps is not None:
        raise ValueError('give --interval (sigma range) or --interval_steps, not both')
    if (f.interval is not None or f.interval_steps is not None) and method == 'none':
        raise ValueError('a guidance interval needs a guidance method')
    s['interval'] = _pair(f.interval, float, 'interval')
    s['interval_steps'] = _pair(f.interval_steps, int, 'interval_steps')
    if f.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {f.batch}')
    if f.outdir is None:
        raise ValueError('give --outdir')
    if f.num_steps < 1:
        raise ValueError(f'--num_steps must be >= 1, got {f.num_steps}')
    if f.grid < 0:
        raise ValueError(f'--grid must be >= 0, got {f.grid}')
    s['seeds'] = parse_seeds(f.seeds)
    for name in ('net', 'gnet', 'vae'):
        path = s.get(name, f.vae if name == 'vae' else None)
        if path is not None and not (Path(path) / 'config.json').is_file():
            hint = ''
            if f.preset is not None and name != 'vae':
                hint = (f' (convert it: python -m convert.edm2 --src={Path(path).name}.pkl '
                        f'--dst={path})')
            raise ValueError(f'--{name}: {path} is not a converted checkpoint directory{hint}')
    s.update(vae=f.vae, fusion=f.fusion, num_steps=f.num_steps, sigma_min=f.sigma_min,
             sigma_max=f.sigma_max, rho=f.rho, S_churn=f.S_churn, S_min=f.S_min, S_max=f.S_max,
             S_noise=f.S_noise, class_idx=f['class'].value, batch=f.batch, dtype=f.dtype,
             outdir=f.outdir, subdirs=f.subdirs, grid=f.grid, save_npz=f.save_npz, preset=f.preset)
    return s


def _parse_perturb(text):
    if text is None or text in ('all', 'encoder', 'decoder'):
        return text
    names = tuple(n.strip() for n in text.split(',') if n.strip())
    if not names:
        raise ValueError('--perturb: empty block list')
    return names


def _pair(values, kind, name):
    if values is None:
        return None
    try:
        lo, hi = (kind(v) for v in values)
    except ValueError:
        raise ValueError(f'--{name}: expected two numbers "a,b", got {",".join(values)!r}') from None
    if not lo <= hi:
        raise ValueError(f'--{name}: need a <= b, got {lo}, {hi}')
    return lo, hi


# ---------------------------------------------------------------------------------------------------
# Output files.

def image_path(outdir: Path, seed: int, subdirs: bool, suffix: str = '.png') -> Path:
    folder = outdir / f'{seed // 1000 * 1000:06d}' if subdirs else outdir
    return folder / f'{seed:06d}{suffix}'


def _temp(path: Path) -> Path:
    return path.with_name(f'.{path.name}.tmp')


def write_atomic(path: Path, write) -> None:
    """write(temp_path), then rename: a reader (or a resumed run) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path)
    write(tmp)
    os.replace(tmp, path)


def save_png(path: Path, image) -> None:
    from PIL import Image
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image  # [H, W, 1] → 'L'
    write_atomic(path, lambda tmp: Image.fromarray(image, 'RGB' if image.ndim == 3 else 'L')
                 .save(tmp, format='PNG'))


def save_npz(path: Path, x) -> None:
    import numpy as np

    def write(tmp):
        with open(tmp, 'wb') as fh:  # a file object: np.savez would append .npz to a path
            np.savez(fh, x=x)
    write_atomic(path, write)


def save_npy(path: Path, x) -> None:
    import numpy as np

    def write(tmp):
        with open(tmp, 'wb') as fh:  # a file object: np.save would append .npy to a path
            np.save(fh, x)
    write_atomic(path, write)


def outputs(outdir: Path, seed: int, s: dict) -> list[Path]:
    """The files a finished seed has: its PNG (or, for a latent model without --vae, its latents
    as .npy) and, with --save_npz, its raw sampler output."""
    paths = [image_path(outdir, seed, s['subdirs'], '.npy' if s.get('latents_only') else '.png')]
    if s['save_npz']:
        paths.append(image_path(outdir, seed, s['subdirs'], '.npz'))
    return paths


def nfe_per_image(s: dict, num_guides: int) -> int:
    """Network evaluations per image (guides counted inside the interval; churn ignored)."""
    import numpy as np
    from edm2_jax import sampling
    n = s['num_steps']
    evals = [(i, 0) for i in range(n)] + [(i, 1) for i in range(n - 1)]
    t = np.asarray(sampling.sigma_steps(n, s['sigma_min'], s['sigma_max'], s['rho']))
    guided = 0
    for i, stage in evals:
        sigma = t[i] if stage == 0 else t[i + 1]
        if s['interval'] is not None:
            guided += s['interval'][0] < sigma <= s['interval'][1]
        elif s['interval_steps'] is not None:
            guided += s['interval_steps'][0] <= i <= s['interval_steps'][1]
        else:
            guided += 1
    return len(evals) + num_guides * guided


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoint_info(path) -> dict:
    from edm2_jax import checkpoint
    meta = checkpoint.read_meta(path)
    return {'path': str(path), 'config_sha256': file_sha256(Path(path) / 'config.json'),
            'source': meta.get('source')}


# ---------------------------------------------------------------------------------------------------
# The run.

def generate(s: dict, *, multihost_kwargs: dict | None = None, progress: bool = True,
             compile_cache: str | None = None) -> dict:
    """Runs the settings `s` of `resolve_settings`; returns the summary (process 0 writes it)."""
    import jax
    if multihost_kwargs is not None:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU only; GPU/TPU ignore it
        from edm2_jax import parallel
        parallel.initialize_distributed(**multihost_kwargs)
    if compile_cache:
        jax.config.update('jax_compilation_cache_dir', compile_cache)
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
        jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    import jax.numpy as jnp
    import numpy as np
    from edm2_jax import checkpoint, parallel, vae as vae_lib

    outdir = Path(s['outdir'])
    mesh = parallel.data_mesh()
    layout = parallel.Layout(mesh, s['batch'])
    dtype = jnp.dtype(s['dtype'])
    net = checkpoint.load(s['net'], mesh)
    net = net.replace(dtype=dtype)
    if s['class_idx'] is not None and not 0 <= s['class_idx'] < net.config.label_dim:
        raise ValueError(f'--class must lie in [0, {net.config.label_dim}) for this network, '
                         f'got {s["class_idx"]}')
    guide = None if s['gnet'] is None else checkpoint.load(s['gnet'], mesh).replace(dtype=dtype)
    decoder_meta = checkpoint.read_meta(s['net']).get('decoder')
    if (decoder_meta or {}).get('type', 'rgb') == 'rgb' and net.config.img_channels not in (1, 3):
        raise ValueError(f"{s['net']}: a pixel-space network must have 1 (greyscale) or 3 (RGB) channels, not "
                         f'{net.config.img_channels} (is it a latent model converted without its decoder?)')
    vae = None if s['vae'] is None else vae_lib.load(s['vae'], mesh=mesh)
    s['latents_only'] = (decoder_meta or {}).get('type') == 'sd-vae' and vae is None
    if s['latents_only']:
        if jax.process_index() == 0:
            print(f"generate: {s['net']} is a latent model and no --vae was given: saving latents "
                  '({seed:06d}.npy, EDM2 latent space) instead of PNGs; decode them later with '
                  '--vae', file=sys.stderr)
        decode = None
    else:
        decode = parallel.make_decoder(layout, decoder_meta, vae)

    kwargs = dict(method=s['method'], fusion=s['fusion'], num_steps=s['num_steps'],
                  sigma_min=s['sigma_min'], sigma_max=s['sigma_max'], rho=s['rho'], S_churn=s['S_churn'],
                  S_min=s['S_min'], S_max=s['S_max'], S_noise=s['S_noise'])
    if s['method'] != 'none':
        kwargs.update(guidance=s['guidance'], interval=s['interval'], interval_steps=s['interval_steps'])
    if s['method'] in ('insitu', 'hybrid'):
        kwargs.update(dropout_rate=s['p'], perturb=s['perturb'])
    if s['method'] in SELF_GUIDANCE:
        kwargs.update({k: s[k] for k in ('perturb', 'strength', 'window') if s[k] is not None})
    sampler = parallel.make_sampler(layout, **kwargs)

    # This process's seeds, minus those already done; clear temporaries of a killed run.
    mine = parallel.process_slice(s['seeds'])
    for seed in mine:
        for path in outputs(outdir, int(seed), s):
            _temp(path).unlink(missing_ok=True)
    todo = [int(seed) for seed in mine if not all(p.is_file() for p in outputs(outdir, int(seed), s))]
    num_batches = parallel.agree_max(math.ceil(len(todo) / layout.local_batch))
    lead = jax.process_index() == 0
    stop_after = int(os.environ.get(STOP_ENV, 0))

    compile_time = sample_time = 0.0
    done = 0
    bar = None
    total = parallel.agree_sum(len(todo))
    if lead and progress and num_batches:
        from tqdm import tqdm
        bar = tqdm(total=total, unit='img', desc='generate', dynamic_ncols=True, file=sys.stderr)
    compiled = None
    for b, (chunk, n) in enumerate(parallel.local_batches(todo, layout.local_batch, num_batches)):
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
            seed = int(seed)
            if s['save_npz']:
                save_npz(image_path(outdir, seed, s['subdirs'], '.npz'), x_local[k])
            if images is None:
                save_npy(image_path(outdir, seed, s['subdirs'], '.npy'), x_local[k])
            else:
                save_png(image_path(outdir, seed, s['subdirs']), images[k])
        sample_time += time.perf_counter() - start
        done += n
        if bar is not None:  # real images of the whole batch (padding rows sit at each process's end)
            bar.update(min(layout.global_batch, total - bar.n))
        if stop_after and b + 1 >= stop_after:
            os._exit(3)  # simulate a kill: no summary, no cleanup
    if bar is not None:
        bar.close()
    generated = parallel.agree_sum(done)

    num_guides = {'none': 0}.get(s['method'], 1)
    summary = {
        'settings': {k: _jsonable(v) for k, v in s.items() if k != 'seeds'},
        'seeds': {'count': len(s['seeds']), 'first': s['seeds'][0], 'last': s['seeds'][-1]},
        'checkpoints': {k: checkpoint_info(s[k]) for k in ('net', 'gnet', 'vae') if s[k] is not None},
        'nfe_per_image': nfe_per_image(s, num_guides),
        'images_generated': generated,
        'images_skipped': len(s['seeds']) - generated,
        'batches': num_batches,
        'global_batch': layout.global_batch,
        'compile_time_s': round(compile_time, 3),
        'sampling_time_s': round(sample_time, 3),
        'images_per_s': round(generated / sample_time, 4) if sample_time else None,
        'devices': layout.num_devices,
        'device_kind': jax.devices()[0].device_kind,
        'platform': jax.devices()[0].platform,
        'hosts': jax.process_count(),
        'jax_version': jax.__version__,
    }
    if lead:
        if s['grid'] and not s['latents_only']:
            write_grid(outdir, s, s['grid'])
        outdir.mkdir(parents=True, exist_ok=True)
        write_atomic(outdir / 'summary.json',
                     lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str) + '\n'))
    return summary


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf
    return list(v) if isinstance(v, tuple) else v


def write_grid(outdir: Path, s: dict, count: int) -> None:
    """grid.png of the first `count` seeds' images, read back from disk (those present)."""
    import numpy as np
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
    save_png(outdir / 'grid.png', grid)


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (tests import several scripts' modules)."""
    flags.DEFINE_string('net', None, 'Converted checkpoint directory of the main network.')
    flags.DEFINE_string('gnet', None, 'Converted checkpoint directory of the guide network (autoguidance, '
                        'hybrid; optional for cfg: an unconditional network, else the null label).')
    flags.DEFINE_string('preset', None, 'EDM2 preset of generate_images.py (e.g. edm2-img512-s-autog-fid): '
                        'sets --net/--gnet/--method/--guidance from --checkpoints.')
    flags.DEFINE_string('checkpoints', 'checkpoints', 'Directory holding converted presets, each in a '
                        'directory named like its NVIDIA pickle without .pkl.')
    flags.DEFINE_string('vae', None, 'Converted SD-VAE directory (python -m convert.vae), for latent models.')
    flags.DEFINE_enum('method', None, METHODS, 'Guidance method (default none).')
    flags.DEFINE_float('guidance', None, "Guidance strength in EDM2's convention g (1 = none); w = g - 1.")
    flags.DEFINE_float('w', None, 'Guidance weight w = g - 1 (alternative to --guidance).')
    flags.DEFINE_float('p', None, 'Dropout rate of the in-situ guide (insitu, hybrid).')
    flags.DEFINE_string('perturb', None, "Blocks with guide dropout: all | encoder | decoder | comma list "
                        "of block names (e.g. dec.8x8_block0). insitu/hybrid only.")
    flags.DEFINE_float('strength', None, 'Perturbation strength of pag/slg/tpg (1 = on), seg (blur sigma in '
                       'pixels, default 10) and sigma-shift (delta: the guide sees sigma*(1+delta); required).')
    flags.DEFINE_list('window', None, 'swg window "size,stride" in pixels (default: the library\'s).')
    flags.DEFINE_list('interval', None, 'Guide only for sigma in (lo, hi]: "lo,hi".')
    flags.DEFINE_list('interval_steps', None, 'Guide only at steps start <= i <= stop: "start,stop".')
    flags.DEFINE_enum('fusion', 'prefix', ['prefix', 'fused', 'unfused'], 'How passes of the main '
                      'network and its in-situ guide run (see guidance.py).')
    flags.DEFINE_integer('num_steps', 32, 'Sampler steps (2N - 1 evaluations per network).')
    flags.DEFINE_float('sigma_min', 0.002, 'Lowest noise level.')
    flags.DEFINE_float('sigma_max', 80.0, 'Highest noise level.')
    flags.DEFINE_float('rho', 7.0, 'Time step exponent.')
    flags.DEFINE_float('S_churn', 0.0, 'Stochasticity strength.')
    flags.DEFINE_float('S_min', 0.0, 'Stochasticity: lowest sigma.')
    flags.DEFINE_float('S_max', float('inf'), 'Stochasticity: highest sigma.')
    flags.DEFINE_float('S_noise', 1.0, 'Stochasticity: noise inflation.')
    flags.DEFINE_string('seeds', '16-19', 'Seeds: ranges and lists as EDM2, e.g. 0-49999 or 1,5,10-19.')
    flags.DEFINE_integer('class', None, 'Class label for every image (default: random per seed).')
    flags.DEFINE_integer('batch', 32, 'Batch size per device.')
    flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Network compute dtype (the sampler '
                      'itself runs in float32, as EDM2).')
    flags.DEFINE_string('outdir', None, 'Output directory.')
    flags.DEFINE_bool('subdirs', False, 'Put images in {seed//1000*1000:06d}/ subdirectories.')
    flags.DEFINE_integer('grid', 0, 'Also write grid.png of the first N seeds (a quick look).')
    flags.DEFINE_bool('save_npz', False, 'Also write the raw float32 sampler output as {seed:06d}.npz.')
    flags.DEFINE_string('compile_cache', None, "JAX persistent compilation cache directory: a second "
                        'run of the same configuration starts without recompiling.')
    flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (multi-host runs).')
    flags.DEFINE_string('coordinator_address', None, 'jax.distributed coordinator host:port (if not '
                        'auto-detected).')
    flags.DEFINE_integer('num_processes', None, 'jax.distributed process count (if not auto-detected).')
    flags.DEFINE_integer('process_id', None, 'jax.distributed process id (if not auto-detected).')
    flags.DEFINE_bool('progress', True, 'Show a progress bar (process 0).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
        s = resolve_settings(FLAGS)
    except ValueError as e:
        sys.exit(f'generate: error: {e}')
    multihost = None
    if FLAGS.multihost:
        multihost = {k: v for k, v in (('coordinator_address', FLAGS.coordinator_address),
                                       ('num_processes', FLAGS.num_processes),
                                       ('process_id', FLAGS.process_id)) if v is not None}
    try:
        summary = generate(s, multihost_kwargs=multihost, progress=FLAGS.progress,
                           compile_cache=FLAGS.compile_cache)
    except (ValueError, FloatingPointError) as e:
        sys.exit(f'generate: error: {e}')
    print(f"generated {summary['images_generated']} images ({summary['images_skipped']} already there) "
          f"in {summary['sampling_time_s']:.1f} s, {summary['images_per_s']} img/s, compile "
          f"{summary['compile_time_s']:.1f} s, {summary['devices']} devices on {summary['hosts']} hosts")


if __name__ == '__main__':
    define_flags()
    app.run(main)

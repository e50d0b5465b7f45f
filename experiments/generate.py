r"""Generate images at scale (flags → `edm2_jax.generation`): every device of every host, resumable.

    python -m experiments.generate --preset=edm2-img512-s-autog-fid --checkpoints=checkpoints \
        --vae=checkpoints/sd-vae-ft-mse --seeds=0-49999 --batch=32 --outdir=out --subdirs

    python -m experiments.generate --net=checkpoints/img64-s --method=insitu --guidance=1.5 --strength=0.1 \
        --blocks=decoder --seeds=0-49999 --outdir=out

Images are `{seed:06d}.png` (with --subdirs in `{seed//1000*1000:06d}/`), written atomically; a
rerun of the same command skips seeds whose outputs exist, so an interrupted run resumed gives the
same files; a rerun with other image settings into the same --outdir is refused (run.json). Every
flag is checked, and the output folder claimed, before a checkpoint is loaded. --multihost
initialises jax.distributed (TPU slices and SLURM auto-detect; else --coordinator_address/
--num_processes/--process_id); each process samples a contiguous slice of the seeds and writes only
its own images.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from absl import app, flags

from edm2_jax import generation, methods
from edm2_jax.errors import UserError, cli_main
from edm2_jax.published import PUBLISHED
from edm2_jax.seeds import parse_seeds

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------------
# Flag checks: everything is validated before any checkpoint is read.

def method_settings(f) -> dict:
    """The guidance method's settings from the flags: net, gnet, method, guidance, strength, blocks,
    window, interval, interval_steps (or a UserError naming the flag); checked by the registry."""
    if f.guidance_config is not None:
        return config_settings(f)
    s = {'guidance_config': None}
    if f.preset is not None:
        if f.preset not in PUBLISHED:
            raise UserError(f'unknown --preset {f.preset!r}; known: {", ".join(sorted(PUBLISHED))}')
        clash = [n for n in ('net', 'gnet', 'method', 'guidance', 'w') if getattr(f, n) is not None]
        if clash:
            raise UserError(f'--preset sets --net/--gnet/--method/--guidance; do not also give '
                            f'{", ".join("--" + n for n in clash)}')
        net, gnet, method, g = PUBLISHED[f.preset]
        root = Path(f.checkpoints)
        s.update(net=str(root / net), gnet=None if gnet is None else str(root / gnet), method=method,
                 guidance=g)
    else:
        if f.net is None:
            raise UserError('give --net (a converted checkpoint directory) or --preset')
        if f.guidance is not None and f.w is not None:
            raise UserError('give --guidance (g) or --w (= g - 1), not both')
        method = f.method or 'none'
        g = f.guidance if f.guidance is not None else (1.0 + f.w if f.w is not None else None)
        if g is not None and not math.isfinite(g):
            raise UserError(f'must be a finite number, got {g}', where='--guidance' if f.w is None else '--w')
        if method == 'none' and g not in (None, 1.0):
            raise UserError('--guidance/--w need a --method')
        if method != 'none' and g is None:
            raise UserError(f'--method={method} needs --guidance (g) or --w')
        s.update(net=f.net, gnet=f.gnet, method=method, guidance=1.0 if g is None else g)
    method = s['method']
    if f.strength is not None and not math.isfinite(f.strength):
        raise UserError(f'must be a finite number, got {f.strength}', where='--strength')
    window = _pair(f.window, int, 'window', ordered=False)
    try:
        methods.check_arguments(methods.get(method), strength=f.strength, guide=s['gnet'], blocks=f.blocks,
                                window=window, guide_name='--gnet')
    except ValueError as e:
        raise UserError(str(e), where=f'--method={method}', fix='see --helpfull') from None
    s.update(strength=f.strength, blocks=f.blocks, window=window)
    if f.interval is not None and f.interval_steps is not None:
        raise UserError('give --interval (sigma range) or --interval_steps, not both')
    if (f.interval is not None or f.interval_steps is not None) and method == 'none':
        raise UserError('a guidance interval needs a guidance method')
    s['interval'] = _pair(f.interval, float, 'interval')
    s['interval_steps'] = _pair(f.interval_steps, int, 'interval_steps')
    return s


CONFIG_EXCLUDES = ('preset', 'method', 'guidance', 'w', 'strength', 'blocks', 'window', 'interval',
                   'interval_steps')


def config_settings(f) -> dict:
    """The guidance settings of --guidance_config=FILE.json (`edm2_jax.guidance_config`): its terms
    replace --method and its flags; the role "gnet" is --gnet."""
    from edm2_jax import guidance_config
    clash = [n for n in CONFIG_EXCLUDES if getattr(f, n) is not None]
    if clash:
        raise UserError(f'the guidance configuration sets the guidance; do not also give '
                        f'{", ".join("--" + n for n in clash)}', where='--guidance_config')
    if f.net is None:
        raise UserError('give --net (a converted checkpoint directory)')
    config = guidance_config.read(f.guidance_config)
    unknown = guidance_config.roles(config) - {'gnet'}
    if unknown:
        raise UserError(f'guide role(s) {", ".join(sorted(unknown))} unknown: generate has only "gnet" (--gnet)',
                        where=f.guidance_config)
    uses_gnet = 'gnet' in guidance_config.roles(config)
    if uses_gnet != (f.gnet is not None):
        raise UserError('a term uses "guide": "gnet" but no --gnet was given' if uses_gnet else
                        'no term uses "guide": "gnet"; give no --gnet', where=f.guidance_config)
    return dict(net=f.net, gnet=f.gnet, method=None, guidance=None, strength=None, blocks=None, window=None,
                interval=None, interval_steps=None, guidance_config=config)


def sampler_settings(f) -> dict:
    """The Heun sampler's settings from the flags, checked as `sampling` checks them."""
    from edm2_jax import sampling
    try:
        sampling._check_steps(f.num_steps, f.sigma_min, f.sigma_max, f.rho)
    except ValueError as e:
        raise UserError(str(e), fix='see --num_steps, --sigma_min, --sigma_max, --rho') from None
    if not (f.S_churn >= 0 and math.isfinite(f.S_churn) and 0 <= f.S_min <= f.S_max
            and math.isfinite(f.S_noise)):
        raise UserError(f'need S_churn >= 0, 0 <= S_min <= S_max and a finite S_noise, got S_churn='
                        f'{f.S_churn}, S_min={f.S_min}, S_max={f.S_max}, S_noise={f.S_noise}')
    return dict(num_steps=f.num_steps, sigma_min=f.sigma_min, sigma_max=f.sigma_max, rho=f.rho,
                S_churn=f.S_churn, S_min=f.S_min, S_max=f.S_max, S_noise=f.S_noise)


def resolve_settings(f, check_guidance: bool = True) -> dict:
    """The run's settings from the flags (a dict of plain values), or a UserError naming the flag. No
    JAX backend starts here, except in the guidance check (a configuration's schedules are arrays):
    multi-host runs make it after jax.distributed starts (`check_guidance`)."""
    s = method_settings(f)
    s.update(sampler_settings(f))
    if f.batch < 1:
        raise UserError(f'--batch must be >= 1, got {f.batch}')
    if f.outdir is None:
        raise UserError('give --outdir')
    if f.grid < 0:
        raise UserError(f'--grid must be >= 0, got {f.grid}')
    s['seeds'] = parse_seeds(f.seeds)
    for name in ('net', 'gnet', 'vae'):
        path = s.get(name, f.vae if name == 'vae' else None)
        if path is not None:
            _check_checkpoint(path, name, f.preset)
    if check_guidance:
        _check_guidance(s)
    s.update(vae=f.vae, fusion=f.fusion, class_idx=_class(f['class'].value, s['net']), batch=f.batch,
             dtype=f.dtype, outdir=f.outdir, subdirs=f.subdirs, grid=f.grid, save_npz=f.save_npz,
             preset=f.preset)
    return s


def _check_checkpoint(path, name, preset):
    """A converted checkpoint directory with readable config.json (its weights are not read)."""
    from edm2_jax import checkpoint
    try:
        checkpoint.read_meta(path)
    except (OSError, ValueError) as e:
        hint = None
        if preset is not None and name != 'vae':
            hint = f'convert it: python -m convert.edm2 --src={Path(path).name}.pkl --dst={path}'
        raise UserError(f'{path} is not a converted checkpoint directory ({e})', where=f'--{name}',
                        fix=hint) from None


def _check_guidance(s):
    """The guidance term checked against the networks' configs (blocks, strength range, window,
    guide shape and labels) before any weights are read — and before JAX starts (multi-host runs
    initialise jax.distributed first)."""
    import types
    from edm2_jax import checkpoint, denoiser
    if s['guidance_config'] is None and s['method'] == 'none':
        return

    def config(path):
        return checkpoint.network_config(path, checkpoint.read_meta(path))
    guide = None if s['gnet'] is None else types.SimpleNamespace(config=config(s['gnet']))
    try:
        denoiser.check_terms(config(s['net']), generation.guidance_terms(s, guide))
    except (TypeError, ValueError) as e:
        where = f"--method={s['method']}" if s['guidance_config'] is None else '--guidance_config'
        raise UserError(str(e), where=where) from None


def _class(class_idx, net):
    """--class checked against the network's label count in its config.json (no weights read)."""
    from edm2_jax import checkpoint
    if class_idx is None:
        return None
    label_dim = checkpoint.read_meta(net).get('config', {}).get('label_dim', 0)
    if not 0 <= class_idx < label_dim:
        raise UserError(f'must lie in [0, {label_dim}) for {net}, got {class_idx}', where='--class')
    return class_idx


def _pair(values, kind, name, ordered=True):
    if values is None:
        return None
    try:
        lo, hi = (kind(v) for v in values)
    except ValueError:
        raise UserError(f'expected two numbers "a,b", got {",".join(values)!r}', where=f'--{name}') from None
    if ordered and not lo <= hi:
        raise UserError(f'need a <= b, got {lo}, {hi}', where=f'--{name}')
    return lo, hi


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (tests import several scripts' modules)."""
    flags.DEFINE_string('net', None, 'Converted checkpoint directory of the main network.')
    flags.DEFINE_string('gnet', None, 'Converted checkpoint directory of the guide network (autoguidance, '
                        'hybrid; optional for cfg: an unconditional network, else the null label).')
    flags.DEFINE_string('preset', None, "NVIDIA's published setting (edm2_jax.published, e.g. "
                        'edm2-img512-s-autog-fid): sets --net/--gnet/--method/--guidance from --checkpoints.')
    flags.DEFINE_string('checkpoints', 'checkpoints', 'Directory holding converted presets, each in a '
                        'directory named like its NVIDIA pickle without .pkl.')
    flags.DEFINE_string('vae', None, 'Converted SD-VAE directory (python -m convert.vae), for latent models.')
    flags.DEFINE_enum('method', None, methods.NAMES, 'Guidance method (default none):\n' + methods.help_text())
    flags.DEFINE_float('guidance', None, "Guidance strength in EDM2's convention g (1 = none); w = g - 1.")
    flags.DEFINE_float('w', None, 'Guidance weight w = g - 1 (alternative to --guidance).')
    flags.DEFINE_float('strength', None, "The method's own strength (insitu/hybrid: the dropout rate p; "
                       'see --method for each method and its default).')
    flags.DEFINE_string('blocks', None, methods.BLOCKS_HELP)
    flags.DEFINE_list('window', None, 'swg window "size,stride" in pixels (default: the library\'s).')
    flags.DEFINE_list('interval', None, 'Guide only for sigma in (lo, hi]: "lo,hi".')
    flags.DEFINE_list('interval_steps', None, 'Guide only at steps start <= i <= stop: "start,stop".')
    flags.DEFINE_string('guidance_config', None, 'A guidance configuration (edm2_jax.guidance_config): '
                        'JSON terms with methods, weights, schedules, intervals and rules, instead of --method '
                        'and its flags; "guide": "gnet" is --gnet. Stored in run.json and summary.json.')
    flags.DEFINE_enum('fusion', 'prefix', ['prefix', 'fused', 'unfused'], 'How the passes of the main '
                      'network and the guides that share its parameters run (edm2_jax.denoiser).')
    flags.DEFINE_integer('num_steps', 32, 'Sampler steps (2N - 1 evaluations per network).')
    flags.DEFINE_float('sigma_min', 0.002, 'Lowest noise level.')
    flags.DEFINE_float('sigma_max', 80.0, 'Highest noise level.')
    flags.DEFINE_float('rho', 7.0, 'Time step exponent.')
    flags.DEFINE_float('S_churn', 0.0, 'Stochasticity strength.')
    flags.DEFINE_float('S_min', 0.0, 'Stochasticity: lowest sigma.')
    flags.DEFINE_float('S_max', float('inf'), 'Stochasticity: highest sigma.')
    flags.DEFINE_float('S_noise', 1.0, 'Stochasticity: noise inflation.')
    flags.DEFINE_string('seeds', '16-19', 'Seeds: ranges and lists as EDM2, e.g. 0-49999 or 1,5,10-19 '
                        '(each in [0, 2**32), no repeats, at most 10,000,000).')
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


@cli_main('generate', catch=(FloatingPointError, ValueError))  # ValueError: a checkpoint that fails to load
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    s = resolve_settings(FLAGS, check_guidance=not FLAGS.multihost)  # every flag, before any host waits
    if FLAGS.multihost:  # jax.distributed must start before anything else uses JAX
        generation.start_multihost(**{k: v for k, v in (('coordinator_address', FLAGS.coordinator_address),
                                                        ('num_processes', FLAGS.num_processes),
                                                        ('process_id', FLAGS.process_id)) if v is not None})
        _check_guidance(s)
    generation.claim_outdir(s)
    if s['guidance'] is not None and s['guidance'] < 1:
        print(f"generate: warning: guidance g = {s['guidance']} < 1 (weight w = g - 1 < 0) pushes samples "
              'towards the guide: legitimate, but unusual', file=sys.stderr)
    try:
        summary = generation.generate(s, progress=FLAGS.progress, compile_cache=FLAGS.compile_cache)
    except generation.Interrupted as e:
        print(f'generate: {e}', file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # e.g. the disk filled up: every file written is whole, none half-written
        raise UserError(f'{e.strerror or e}', where=e.filename,
                        fix='free space (or fix the folder) and rerun the same command to resume') from None
    print(f"generated {summary['images_generated']} images ({summary['images_skipped']} already there) "
          f"in {summary['sampling_time_s']:.1f} s, {summary['images_per_s']} img/s, compile "
          f"{summary['compile_time_s']:.1f} s, {summary['devices']} devices on {summary['hosts']} hosts")


if __name__ == '__main__':
    define_flags()
    app.run(main)

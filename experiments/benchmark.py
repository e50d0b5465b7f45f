"""What guidance costs at sampling time: every method timed in one run on random-weight EDM2 networks.

    python -m experiments.benchmark --preset=img512-xs --batch=4 --steps=4 --out=out/bench.json
    python -m experiments.benchmark --quick          # the tiny custom network, two methods (seconds)
    bash experiments/gpu_benchmark.sh                # img512-S on a GPU, float32 and bfloat16, one JSON

For each method (`--methods`): compile time (trace + lowering + XLA compile of the sampler, from JAX's
compile events), seconds per image and per sampler step (median, min and max over `--repeats` timed
calls after a warm-up, each ended by block_until_ready), the process CPU seconds per call, network
evaluations per image (NFE), FLOPs per network evaluation and per image (XLA cost analysis), the
achieved FLOP/s, the ratio to 'none', peak device memory (null where the backend reports none, e.g.
CPU) and the number of compilations of the sampler over a sweep of two (w, p) values (1 = no
recompilation).

NFE are counted, not assumed: a separate run samples with networks that call `jax.debug.callback`
on every forward, and adds up the images each forward processes. One evaluation = one image through
one network once; a fused or prefix-shared pair counts 2 (its saving shows in FLOPs and time, not in
NFE). Unguided Heun sampling with S steps makes 2S − 1 evaluations; a guide adds one per guided
evaluation, so in-situ guidance at every evaluation makes 2(2S − 1) and a guidance interval less.
`--count=inline` counts in the timed runs instead (saves a compile per method on slow CPUs; the
per-pass host callback is negligible there but not on accelerators).

Networks are `Network.random` (cost does not depend on the values; nothing is compiled to make them).

Methods: none, cfg, autoguidance, insitu-fused, insitu-unfused, insitu-prefix (dropout everywhere,
prefix shared), insitu-decoder-prefix, insitu-decoder-fused, the self-guidance family pag, slg, seg, tpg,
sigma-shift (δ = 0.2), swg (library defaults), and any of them but none with the suffix
`-interval` (guidance only for σ in `--interval`); insitu-term-interval (in-situ as a `guidance.Term`
with its own `--interval`). The autoguidance guide is a random network of the
main configuration with `--guide_channels` channels (default: half the main width).

`--dtypes=float32,bfloat16` measures every method in each dtype in turn; the achieved FLOP/s is also
given as a fraction of the device's dense peak (`--peak_tflops`, or `profiling.PEAK_TFLOPS` by device
kind). `--vs_official=PATH` (your own clone of NVlabs/edm2, imported at run time: `edm2_jax.official`)
times the official `edm_sampler` on the same weights and noise — the paper's in-situ guide is the
network in train mode with dropout, a second pass — and prints edm2-jax's speed-up over it.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from edm2_jax import EDM2Config, Network, get_preset, guidance as G, io, methods, network_inputs, sample
from edm2_jax.denoiser import prepare_terms
from edm2_jax.errors import cli_main
from edm2_jax.profiling import COUNTER, CompileLog, counted, forward_flops, guided_flops, machine, peak_tflops
from edm2_jax.sampling import guidance_terms

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', '', 'EDM2 preset (e.g. img512-xs); empty: the custom network of the flags below')
flags.DEFINE_integer('resolution', 8, 'custom network: image resolution')
flags.DEFINE_integer('img_channels', 4, 'custom network: image channels')
flags.DEFINE_integer('channels', 16, 'custom network: model_channels')
flags.DEFINE_list('channel_mult', ['1', '2'], 'custom network: channel multipliers per level')
flags.DEFINE_integer('num_blocks', 1, 'custom network: blocks per level')
flags.DEFINE_list('attn_resolutions', ['4'], 'custom network: resolutions with attention')
flags.DEFINE_integer('label_dim', 10, 'custom network: number of classes (0: unconditional)')
flags.DEFINE_integer('guide_channels', 0, 'model_channels of the autoguidance guide (0: half the main width)')
flags.DEFINE_integer('batch', 2, 'images per sampler call')
flags.DEFINE_integer('steps', 4, 'Heun steps')
flags.DEFINE_list('dtypes', ['float32'], 'dtypes of the networks\' image path, each measured in turn '
                  '(float32, bfloat16)')
flags.DEFINE_float('peak_tflops', 0.0, 'the device\'s peak TFLOP/s for the achieved fraction (0: from PEAK_TFLOPS '
                   'by device kind and dtype, where known)')
flags.DEFINE_string('vs_official', '', 'path of your own clone of NVlabs/edm2: also time its edm_sampler on the '
                    'same weights and noise (none, insitu, insitu-decoder, autoguidance) and print the ratio')
flags.DEFINE_enum('official_device', 'cpu', ['cpu', 'cuda'], 'torch device of the official run')
flags.DEFINE_bool('official_fp16', False, 'run the official networks in float16 (its use_fp16; CUDA only)')
flags.DEFINE_list('methods', ['none', 'insitu-fused', 'insitu-unfused', 'insitu-decoder-prefix',
                              'autoguidance', 'cfg', 'insitu-fused-interval'], 'methods to measure')
flags.DEFINE_integer('devices', 1, 'devices to shard the batch over (data parallel)')
flags.DEFINE_integer('repeats', 3, 'timed calls per method after the warm-up')
flags.DEFINE_list('guidance', ['2.0', '2.5'], 'the two guidance values g of the (w, p) sweep (w = g - 1)')
flags.DEFINE_list('dropout', ['0.1', '0.2'], 'the two dropout rates p of the (w, p) sweep')
flags.DEFINE_list('interval', ['0.28', '5.42'], 'σ interval (lo, hi] of the -interval methods')
flags.DEFINE_string('out', '', 'JSON file to write (atomically)')
flags.DEFINE_enum('count', 'separate', ['separate', 'inline'],
                  'NFE counting: a separate run with counting networks (exact timings, one more compile per '
                  'method), or inline in the timed runs (one host callback per network pass; saves the '
                  'compile, negligible on CPU, not on accelerators)')
flags.DEFINE_bool('quick', False, 'tiny run: batch 2, 2 steps, 1 repeat, none + insitu-fused, on the custom '
                  'network of the flags above (or on --preset if given; any flag given explicitly wins)')

BASE_METHODS = {
    'none': dict(method='none'),
    'cfg': dict(method='cfg', fusion='fused'),  # the main network with the null label, one pass
    'autoguidance': dict(method='autoguidance'),
    'insitu-fused': dict(method='insitu', fusion='fused', blocks='all'),
    'insitu-unfused': dict(method='insitu', fusion='unfused', blocks='all'),
    'insitu-prefix': dict(method='insitu', fusion='prefix', blocks='all'),
    'insitu-decoder-prefix': dict(method='insitu', fusion='prefix', blocks='decoder'),
    'insitu-decoder-fused': dict(method='insitu', fusion='fused', blocks='decoder'),
    # The self-guidance family (edm2_jax.perturb), each with its library defaults.
    'pag': dict(method='pag'),
    'slg': dict(method='slg'),
    'seg': dict(method='seg'),
    'tpg': dict(method='tpg'),
    'sigma-shift': dict(method='sigma-shift', strength=0.2),
    'swg': dict(method='swg'),
    # In-situ as one `guidance.Term` carrying its own interval (`--interval`): costs what
    # insitu-prefix-interval costs, since per-term intervals skip the inactive guide passes too.
    'insitu-term-interval': dict(method='terms', fusion='prefix'),
}


def method_spec(name: str) -> tuple[dict, bool]:
    """(sample() keyword arguments without the numbers, uses the interval) of a method name."""
    if name == 'insitu-term-interval':  # the interval is the term's own, not the sampler's
        return dict(BASE_METHODS[name]), False
    base, interval = (name[:-len('-interval')], True) if name.endswith('-interval') else (name, False)
    if base not in BASE_METHODS or (interval and base == 'none'):
        raise ValueError(f'unknown method {name!r}; choose from {", ".join(BASE_METHODS)} '
                         f'(each but none also with the suffix -interval)')
    return dict(BASE_METHODS[base]), interval


# ---------------------------------------------------------------------------------------------------
# Configuration and inputs.

def network_config() -> EDM2Config:
    if FLAGS.preset:
        return get_preset(FLAGS.preset)
    ints = lambda xs: tuple(int(v) for v in xs)  # noqa: E731
    return EDM2Config(img_resolution=FLAGS.resolution, img_channels=FLAGS.img_channels,
                      label_dim=FLAGS.label_dim, model_channels=FLAGS.channels,
                      channel_mult=ints(FLAGS.channel_mult), num_blocks=FLAGS.num_blocks,
                      attn_resolutions=ints(FLAGS.attn_resolutions))


def pair_values(values, name) -> tuple[float, float]:
    if len(values) != 2:
        raise ValueError(f'--{name} needs exactly two values (the sweep), got {values}')
    return float(values[0]), float(values[1])


def place(tree, mesh, spec):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------------
# One method.

def measure(name, net, guide, inputs, steps, repeats, values, interval, log, inline_count=False):
    spec, uses_interval = method_spec(name)
    batch = inputs.noise.shape[0]
    (g1, g2), (p1, p2) = values

    def kwargs(g, p, main, guide_net):
        kw = dict(spec, num_steps=steps, keys=inputs.keys)
        if spec['method'] != 'none':
            kw['guidance'] = g
        if spec['method'] == 'insitu':
            kw['strength'] = p
        if spec['method'] == 'terms':  # in-situ as a Term with its own interval
            term = methods.term('insitu', g - 1.0, p, blocks='all').replace(interval=G.Interval.sigmas(*interval))
            kw.pop('guidance')
            kw.pop('method')
            return main, dict(kw, terms=[term])
        if spec['method'] == 'autoguidance':
            kw['guide'] = guide_net
        if uses_interval:
            kw['interval'] = interval
        return main, kw

    if inline_count:
        net, guide = counted(net, 'main'), counted(guide, 'guide')

    def run(g, p, main=net, guide_net=guide):
        main, kw = kwargs(g, p, main, guide_net)
        return sample(main, inputs.noise, inputs.class_labels, **kw).block_until_ready()

    # Warm-up: the (w, p) sweep. The first call compiles; the second must not.
    mark = log.mark()
    start = time.perf_counter()
    run(g1, p1)
    first_call_s = time.perf_counter() - start
    run(g2, p2)
    compiles, compile_s, all_compiles = log.since(mark)

    times, cpu_times = [], []
    COUNTER.reset()
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run(g1, p1)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    stats = jax.devices()[0].memory_stats()
    peak = None if not stats else stats.get('peak_bytes_in_use')

    calls = repeats
    if not inline_count:  # a separate run with counting networks, not part of the numbers above
        COUNTER.reset()
        run(g1, p1, counted(net, 'main'), counted(guide, 'guide'))
        calls = 1
    jax.effects_barrier()
    rows = {k: v / calls for k, v in COUNTER.rows.items()}
    nfe = sum(rows.values()) / batch
    main_evals = 2 * steps - 1  # denoiser calls of the Heun loop; each runs the main network once
    guided_evals = nfe - main_evals  # one guide pass per guided evaluation (single-term methods)

    # FLOPs per image: unguided evaluations at the forward's cost, guided ones at the guided cost.
    sigma = jnp.ones((), jnp.float32)
    f_eval = forward_flops(net, inputs.noise, sigma, inputs.class_labels)
    if spec['method'] == 'none':
        f_guided = f_eval
    else:
        if spec['method'] == 'terms':
            term = methods.terms('insitu', g1 - 1.0, p1, blocks='all')
        else:
            term = guidance_terms(spec['method'], g1, p1 if spec['method'] == 'insitu' else spec.get('strength'),
                                  guide=guide if spec['method'] == 'autoguidance' else None,
                                  blocks=spec.get('blocks'))
        terms = prepare_terms(net, term, jnp.float32)
        f_guided = guided_flops(net, inputs.noise, sigma, inputs.class_labels, inputs.keys, terms,
                                spec.get('fusion', 'prefix'))
    flops_per_image = None
    if f_eval is not None and f_guided is not None:
        flops_per_image = ((main_evals - guided_evals) * f_eval + guided_evals * f_guided) / batch
    sec = statistics.median(times) / batch
    return {
        'method': name, 'sec_per_image': sec, 'sec_per_image_min': min(times) / batch,
        'sec_per_image_max': max(times) / batch, 'sec_per_step': statistics.median(times) / steps,
        'cpu_s_per_call': statistics.median(cpu_times), 'ratio_to_none': None,
        'nfe_per_image': nfe, 'nfe_by_network': {k: v / batch for k, v in rows.items()},
        'guided_evals_per_image': guided_evals,
        'flops_per_eval': None if f_eval is None else f_eval / batch,
        'flops_per_guided_eval': None if f_guided is None else f_guided / batch,
        'flops_per_image': flops_per_image,
        'flop_per_s': None if flops_per_image is None else flops_per_image / sec,
        'compile_s': compile_s, 'first_call_s': first_call_s, 'compiles': compiles,
        'all_xla_compiles': all_compiles, 'peak_bytes': peak,
    }


# ---------------------------------------------------------------------------------------------------
# Output.

def table(results) -> str:
    head = ('method', 'dtype', 'compiles', 'compile_s', 's/img', 's/img min-max', 's/step', 'ratio', 'NFE/img',
            'GFLOP/eval', 'GFLOP/img', 'GFLOP/s', '%peak', 'cpu_s/call', 'peak_MB', 'x official')

    def g(v, scale=1.0, fmt='{:.3g}'):
        return '-' if v is None else fmt.format(v / scale)
    rows = [head] + [(
        r['method'], r['dtype'], str(r['compiles']), f"{r['compile_s']:.1f}", g(r['sec_per_image']),
        f"{r['sec_per_image_min']:.3g}-{r['sec_per_image_max']:.3g}", g(r['sec_per_step']),
        g(r['ratio_to_none'], fmt='{:.2f}'), g(r['nfe_per_image'], fmt='{:g}'), g(r['flops_per_eval'], 1e9),
        g(r['flops_per_image'], 1e9), g(r['flop_per_s'], 1e9), g(r['fraction_of_peak'], 0.01, '{:.1f}'),
        g(r['cpu_s_per_call']), g(r['peak_bytes'], 2**20, '{:.0f}'),
        g(r.get('speedup_vs_official'), fmt='{:.2f}')) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return '\n'.join([lines[0], '  '.join('-' * w for w in widths)] + lines[1:])


@cli_main('benchmark', catch=(ValueError,))
def main(argv):
    del argv
    if FLAGS.quick:  # defaults of a tiny run; flags given explicitly still win
        for flag, value in (('preset', ''), ('batch', 2), ('steps', 2), ('repeats', 1),
                            ('methods', ['none', 'insitu-fused'])):
            if not FLAGS[flag].present:
                FLAGS[flag].value = value
    # Everything that can be wrong is checked before anything is compiled.
    for name in FLAGS.methods:
        method_spec(name)
    values = pair_values(FLAGS.guidance, 'guidance'), pair_values(FLAGS.dropout, 'dropout')
    interval = pair_values(FLAGS.interval, 'interval')
    config = network_config()
    if any(method_spec(m)[0]['method'] == 'cfg' for m in FLAGS.methods) and not config.label_dim:
        raise ValueError('cfg needs a conditional network (label_dim > 0)')
    if FLAGS.batch < 1 or FLAGS.steps < 1 or FLAGS.repeats < 1:
        raise ValueError('--batch, --steps and --repeats must be >= 1')
    if FLAGS.devices < 1 or FLAGS.devices > jax.device_count():
        raise ValueError(f'--devices={FLAGS.devices}, but {jax.device_count()} device(s) are available (on '
                         'CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)')
    if FLAGS.batch % FLAGS.devices:
        raise ValueError(f'--batch={FLAGS.batch} must be divisible by --devices={FLAGS.devices}')

    for dt in FLAGS.dtypes:
        if dt not in ('float32', 'bfloat16'):
            raise ValueError(f'--dtypes: float32 or bfloat16, got {dt!r}')
    official = None
    if FLAGS.vs_official:
        from edm2_jax import official as official_lib
        official = official_lib.load(FLAGS.vs_official)

    log = CompileLog()
    mesh = jax.make_mesh((FLAGS.devices,), ('data',), devices=jax.devices()[:FLAGS.devices]) \
        if FLAGS.devices > 1 else None
    results = []
    for dt in FLAGS.dtypes:
        dtype = jnp.dtype(dt)
        net = place(Network.random(config, 0, dtype=dtype), mesh, P())
        guide = None
        if any(method_spec(m)[0]['method'] == 'autoguidance' for m in FLAGS.methods):
            guide_config = config.replace(model_channels=FLAGS.guide_channels or max(1, config.model_channels // 2))
            guide = place(Network.random(guide_config, 1, dtype=dtype), mesh, P())
        inputs = network_inputs(net, np.arange(FLAGS.batch))
        inputs = type(inputs)(*(None if a is None else place(a, mesh, P('data')) for a in inputs))
        rows = []
        for name in FLAGS.methods:
            rows.append(dict(measure(name, net, guide, inputs, FLAGS.steps, FLAGS.repeats, values, interval, log,
                                     FLAGS.count == 'inline'), dtype=dt))
            print(f'{name} ({dt}): {rows[-1]["sec_per_image"]:.4g} s/image', flush=True)
        base = next((r['sec_per_image'] for r in rows if r['method'] == 'none'), None)
        peak = FLAGS.peak_tflops or peak_tflops(jax.devices()[0].device_kind, dt)
        for r in rows:
            r['ratio_to_none'] = None if base is None else r['sec_per_image'] / base
            r['peak_tflops'] = peak
            r['fraction_of_peak'] = None if not (peak and r['flop_per_s']) else r['flop_per_s'] / (peak * 1e12)
        results += rows
        if official is not None and dt == FLAGS.dtypes[0]:
            side_by_side(official, net, guide, inputs, rows, values)

    report = {
        'machine': machine(),
        'config': {'network': config.to_dict(), 'preset': FLAGS.preset or None, 'batch': FLAGS.batch,
                   'steps': FLAGS.steps, 'dtypes': list(FLAGS.dtypes), 'devices': FLAGS.devices,
                   'repeats': FLAGS.repeats, 'nfe_count': FLAGS.count, 'guidance': list(values[0]),
                   'dropout': list(values[1]), 'interval': list(interval),
                   'guide_channels': FLAGS.guide_channels or max(1, config.model_channels // 2),
                   'xla_flags': os.environ.get('XLA_FLAGS', ''), 'vs_official': FLAGS.vs_official or None},
        'results': results,
    }
    print(table(results))
    if FLAGS.out:
        io.write_text(FLAGS.out, json.dumps(report, indent=1))
        print(f'wrote {FLAGS.out}')


OFFICIAL_METHODS = {'none': None, 'insitu-fused': 'all', 'insitu-unfused': 'all', 'insitu-prefix': 'all',
                    'insitu-decoder-prefix': 'decoder', 'insitu-decoder-fused': 'decoder', 'autoguidance': None}


def side_by_side(official, net, guide, inputs, rows, values):
    """The official edm_sampler on the same weights and noise, for the methods it has; adds
    'official' and 'speedup_vs_official' (official s/image ÷ ours) to those rows."""
    from edm2_jax import official as official_lib
    device = FLAGS.official_device
    main = official_lib.precond(official, net, device, FLAGS.official_fp16)
    (g1, _), (p1, _) = values
    labels = None if inputs.class_labels is None else np.asarray(inputs.class_labels)
    for r in rows:
        if r['method'] not in OFFICIAL_METHODS:
            continue
        guidance, gnet = 1.0, None
        if r['method'] == 'autoguidance':
            guidance, gnet = g1, official_lib.precond(official, guide, device, FLAGS.official_fp16)
        elif r['method'] != 'none':
            guidance, gnet = g1, official_lib.dropout_guide(main, p1, OFFICIAL_METHODS[r['method']])
        r['official'] = official_lib.time_sample(official, main, np.asarray(inputs.noise), labels, guide=gnet,
                                                 guidance=guidance, num_steps=FLAGS.steps, repeats=FLAGS.repeats,
                                                 device=device)
        r['speedup_vs_official'] = r['official']['sec_per_image'] / r['sec_per_image']
        print(f"{r['method']}: official {r['official']['sec_per_image']:.4g} s/image, edm2-jax "
              f"{r['speedup_vs_official']:.2f}x faster", flush=True)


if __name__ == '__main__':
    app.run(main)

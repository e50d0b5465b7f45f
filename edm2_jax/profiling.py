"""Measuring what sampling costs: JAX compile events, network evaluations counted at run time, XLA's
FLOP counts, random-weight networks (cost does not depend on the values), the machine, device peaks.
Used by experiments.benchmark."""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import threading

import flax.struct
import jax
import jax.numpy as jnp

from edm2_jax import backend
from edm2_jax.denoiser import edm2_denoiser, prepare_terms
from edm2_jax.network import Network

SAMPLER_FUN = '_sample'  # name of the sampler's jitted function in edm2_jax.sampling (compile events)


# ---------------------------------------------------------------------------------------------------
# Compile events and NFE counting.

class CompileLog:
    """JAX compile events (trace, lowering, XLA compile) with their function names and durations."""

    def __init__(self):
        self.events = []
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, duration, **kwargs):
        if event.startswith('/jax/core/compile/'):
            self.events.append((event.rsplit('/', 1)[-1], str(kwargs.get('fun_name', '')), duration))

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, fun: str = SAMPLER_FUN) -> tuple[int, float, int]:
        """(XLA compiles of `fun`, seconds spent tracing + lowering + compiling it, all XLA compiles)."""
        new = self.events[mark:]
        mine = [(e, d) for e, f, d in new if f in (fun, f'jit_{fun}', f'jit({fun})')]
        compiles = sum(e == 'backend_compile_duration' for e, _ in mine)
        return compiles, sum(d for _, d in mine), sum(e == 'backend_compile_duration' for e, _, _ in new)


class Counter:
    """Images processed per network role, added up at run time by debug callbacks."""

    def __init__(self):
        self.lock, self.rows = threading.Lock(), {}

    def add(self, role, rows):
        with self.lock:
            self.rows[role] = self.rows.get(role, 0) + rows

    def reset(self):
        with self.lock:
            self.rows = {}


COUNTER = Counter()


@flax.struct.dataclass
class CountedNetwork(Network):
    """A Network that reports every forward (images in the pass) to COUNTER, at run time."""
    role: str = flax.struct.field(pytree_node=False, default='main')

    def __call__(self, x, *args, **kwargs):
        jax.debug.callback(functools.partial(COUNTER.add, self.role, x.shape[0]))
        return super().__call__(x, *args, **kwargs)

    def stacked(self, x, *args, copies, **kwargs):
        jax.debug.callback(functools.partial(COUNTER.add, self.role, copies * x.shape[0]))
        return super().stacked(x, *args, copies=copies, **kwargs)


def counted(net: Network | None, role: str):
    if net is None:
        return None
    return CountedNetwork(**{f.name: getattr(net, f.name) for f in dataclasses.fields(net)}, role=role)


def machine() -> dict:
    """The host, its load and the JAX backend in use."""
    dev = jax.devices()
    return {'host': platform.node(), 'platform': platform.platform(), 'processor': platform.processor(),
            'cpu_count': os.cpu_count(), 'load_avg_1m_at_start': round(os.getloadavg()[0], 2),
            'devices': [d.device_kind for d in dev], **backend.describe()}


# ---------------------------------------------------------------------------------------------------
# FLOPs from XLA's cost analysis.

def flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    value = None if not analysis else analysis.get('flops')
    return None if value is None or value < 0 else float(value)


_FORWARD_FLOPS = {}


def forward_flops(net, x, sigma, labels) -> float | None:
    """FLOPs of one unguided forward over the batch x (computed once per network and shape)."""
    key = (id(net), x.shape, x.dtype)
    if key not in _FORWARD_FLOPS:
        fn = jax.jit(lambda net, x, sigma, labels: net(x, sigma, labels))
        _FORWARD_FLOPS[key] = flops(fn.lower(net, x, sigma, labels).compile())
    return _FORWARD_FLOPS[key]


def guided_flops(net, x, sigma, labels, keys, terms, fusion) -> float | None:
    """FLOPs of one guided evaluation (the main pass and every guide pass, as the sampler runs them)."""
    def evaluate(net, terms, x, sigma, labels, keys):
        return edm2_denoiser(net, labels, terms, fusion=fusion, sample_keys=keys)(x, sigma, jnp.int32(0), keys)
    return flops(jax.jit(evaluate).lower(net, terms, x, sigma, labels, keys).compile())


def flops_per_image(net, terms, num_steps: int, interval=None, fusion: str = 'prefix') -> float | None:
    """XLA's FLOPs to sample one image with `sample(net, ..., terms=terms, interval=interval)`: one
    forward at each of the 2N − 1 evaluations, plus for each term the extra cost of its guided
    evaluation (that term alone, as the sampler runs it) at each evaluation where it is guided
    (`methods.evaluation_counts`, which applies the intervals). Rules are left out (elementwise, a few
    FLOPs per pixel). None when XLA gives no count."""
    from edm2_jax import methods
    from edm2_jax.sampling import network_inputs
    inputs = network_inputs(net, [0])
    sigma = jnp.ones((), jnp.float32)
    forward = forward_flops(net, inputs.noise, sigma, inputs.class_labels)
    evaluations, guided = methods.evaluation_counts(terms, num_steps, interval)
    extra = 0.0
    for t, n in zip(terms, guided):
        alone = prepare_terms(net, (t.replace(rule=None, interval=None),), jnp.float32)
        g = guided_flops(net, inputs.noise, sigma, inputs.class_labels, inputs.keys, alone, fusion)
        if g is None or forward is None:
            return None
        extra += n * (g - forward)
    return None if forward is None else evaluations * forward + extra


# Dense peak TFLOP/s by device kind (vendor datasheets; float32 matmuls run as TF32 on these GPUs
# under XLA's default precision).
PEAK_TFLOPS = {'H200': {'bfloat16': 989.0, 'float32': 494.7}, 'H100': {'bfloat16': 989.0, 'float32': 494.7},
               'A100': {'bfloat16': 312.0, 'float32': 156.0}}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for kind, peaks in PEAK_TFLOPS.items():
        if kind in device_kind:
            return peaks[dtype]
    return None

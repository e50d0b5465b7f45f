"""Data-parallel sampling on a 1-D 'data' mesh over every device of every process.

The global batch (per-device batch × device count) is sharded over the mesh with `NamedSharding`;
parameters are replicated; the sampler runs under `jax.jit` of a `jax.shard_map`, so each device runs
the single-device program on its rows, with no communication. With several processes (`jax.distributed`), each process
builds only its own rows (`jax.make_array_from_process_local_data`) and reads back only the rows of
its addressable shards: no host ever holds all images.

Devices are ordered by (process, id), so process p owns rows [p·L, (p+1)·L) of every global batch
(L = per-device batch × its local device count). Each sample's randomness comes from its seed alone
(`sampling.seed_inputs`); with the same per-device batch the per-device programs, hence the results,
are identical for any number of devices and hosts (XLA:CPU results can differ at the ulp level
across batch sizes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edm2_jax import sampling
from edm2_jax import vae as vae_lib
from edm2_jax.decoder import DecoderSpec, as_spec

AXIS = 'data'


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize` (auto-detects TPU slices, SLURM, …; kwargs for a manual
    coordinator) unless already done. Must run before anything touches a device."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all), ordered by (process, id) so that each
    process's devices hold a contiguous block of the batch."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a global batch maps onto the mesh and this process."""
    mesh: Mesh
    per_device_batch: int

    def __post_init__(self):
        if self.per_device_batch < 1:
            raise ValueError(f'per-device batch must be >= 1, got {self.per_device_batch}')

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def local_devices(self) -> int:
        return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.num_devices

    @property
    def local_batch(self) -> int:
        return self.per_device_batch * self.local_devices


def process_slice(seeds, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous share of the global seed sequence, `seeds[start:stop]` (so a lazy
    `seeds.Seeds` stays lazy); sizes differ by ≤ 1, the larger shares first (as np.array_split)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    size, extra = divmod(len(seeds), n)
    start = p * size + min(p, extra)
    return seeds[start:start + size + (p < extra)]


def agree_max(value: int) -> int:
    """The maximum of `value` over all processes (every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def agree_sum(value: int) -> int:
    """The sum of `value` over all processes (every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def local_batches(seeds, local_batch: int, num_batches: int):
    """`num_batches` chunks of exactly `local_batch` seeds, the tail padded by repeating a seed:
    yields (padded seeds, number of real ones). Empty chunks (other processes have more work) are
    all padding."""
    seeds = np.asarray(seeds, np.int64)
    fill = seeds[-1] if len(seeds) else 0
    for b in range(num_batches):
        chunk = seeds[b * local_batch:(b + 1) * local_batch]
        n = len(chunk)
        yield np.concatenate([chunk, np.full(local_batch - n, fill, np.int64)]), n


def global_inputs(layout: Layout, net, local_seeds, class_idx: int | None = None):
    """(noise, labels, key_data) as global arrays sharded over the batch, from this process's seeds.
    Keys travel as raw uint32 key data (wrapped again inside the jitted sampler)."""
    if len(local_seeds) != layout.local_batch:
        raise ValueError(f'expected {layout.local_batch} local seeds, got {len(local_seeds)}')
    inputs = sampling.network_inputs(net, local_seeds, class_idx)
    sharding = batch_sharding(layout.mesh)

    def put(a):
        if a is None:
            return None
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(sharding, a, (layout.global_batch,) + a.shape[1:])
    return put(inputs.noise), put(inputs.class_labels), put(jax.random.key_data(inputs.keys))


def make_sampler(layout: Layout, terms_of: Callable | None = None, **sample_kwargs) -> Callable:
    """jit(fn(net, guide, noise, labels, key_data) -> samples), batch sharded over the mesh.

    `shard_map`: every device runs the single-device sampler on its own `per_device_batch` rows, so
    a row's arithmetic is the same program whatever the device count (letting the SPMD partitioner
    reshard the doubled in-situ batch changed results by ~1e-4 on 4 CPU devices). `sample_kwargs`
    go to `sampling.sample` (method, guidance, strength, blocks, interval, num_steps, …) and are
    fixed for the sampler's life: one compilation per configuration. terms_of: None, or guide →
    the guidance terms (a guidance configuration's, `generation.guidance_terms`), given as `terms`.
    """
    def per_device(net, guide, noise, labels, key_data):
        keys = jax.random.wrap_key_data(key_data)
        guiding = {'guide': guide} if terms_of is None else {'terms': terms_of(guide)}
        return sampling.sample(net, noise, labels, keys=keys, **guiding, **sample_kwargs)

    mapped = jax.shard_map(per_device, mesh=layout.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                           out_specs=P(AXIS))
    return jax.jit(mapped, out_shardings=batch_sharding(layout.mesh))


def make_decoder(layout: Layout, decoder: DecoderSpec | dict | None, vae=None,
                 chunk: int = 4) -> Callable:
    """jit(fn(x) -> uint8 NHWC images), sharded like the batch, for `decoder` (a DecoderSpec or its
    config.json dict; None = pixels). Pixel models: edm2-spec §3.3 RGB decode. Latent models: the SD-VAE
    on each device's rows, `chunk` at a time (EDM2 decodes 4 at a time; this bounds the decoder's
    memory)."""
    decoder = as_spec(decoder)
    out = batch_sharding(layout.mesh)
    if decoder.kind == 'rgb':
        return jax.jit(vae_lib.rgb_to_uint8, out_shardings=out)
    decoder.require_vae(vae)
    scale, bias = np.asarray(decoder.scale, np.float32), np.asarray(decoder.bias, np.float32)
    b = layout.per_device_batch
    c = chunk if b % chunk == 0 else b

    def per_device(vae, x):  # x: this device's [b, h, w, C]
        chunks = x.reshape((b // c, c) + x.shape[1:])
        imgs = jax.lax.map(lambda z: vae_lib.latents_to_uint8(vae, z, scale, bias), chunks)
        return imgs.reshape((b,) + imgs.shape[2:])

    mapped = jax.jit(jax.shard_map(per_device, mesh=layout.mesh, in_specs=(P(), P(AXIS)),
                                   out_specs=P(AXIS)), out_shardings=out)
    return lambda x: mapped(vae, x)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order (one copy per row)."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)

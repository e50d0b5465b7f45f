"""Call-time perturbations of an EDM2 network: the "degraded self" of the self-guidance family.

A `Perturbation` says *what* is degraded (`kind`, static), *where* (`where`, static: which blocks) and
*how much* (`strength`: a traced number, one per batch row, or a `guidance.Schedule` of σ inside a
guidance term). Strength 0 is the plain network, bit for bit (rows are selected with `where`, never
blended), so one row of a fused batch is switched off by a 0. Every kind acts per example — a row's
result depends only on its own input, strength and key — so the guides that share the main network's
parameters run in one pass over the stacked batch and a seed's image never depends on the batch.

Kinds (`where`, the block selection of `select_blocks`: None = the kind's default; 'all', 'encoder',
'decoder', 'bottleneck', a resolution level 'RxR' (or the int R), one side of a level 'enc.RxR' /
'dec.RxR', or block names as in `config.block_specs`, torch or flax spelling; a comma-separated
string or a sequence of any of these):
- `dropout(p)`: inverted dropout with rate p in the residual branch of the blocks (in-situ
  autoguidance; the same mask stream as `Network(dropout_rate=...)`). Default: all blocks.
- `skip`: the block outputs its resampled, projected input with the residual and attention branches
  removed (SLG / STG-R): encoder blocks `clip(normalize(conv_skip(resample(x))))`, decoder blocks
  `clip(conv_skip(resample(x)))` (x after the skip concatenation; conv_skip only where the widths
  differ, else the identity). Strength 1 = on, 0 = off. Default: the decoder blocks at the lowest
  resolution ('dec.RxR' with R the smallest level).
- `attention_identity`: every position attends only to itself, so the attention output is
  `attn_proj(v)` (PAG). Default: all attention blocks.
- `attention_blur(s)`: the normalised queries are blurred over the spatial grid by a separable
  Gaussian of standard deviation s pixels, the weights renormalised at the border (SEG); s = inf
  makes every query the mean query. Default: all attention blocks.
- `token_shuffle`: the block input's H·W positions are permuted by a permutation drawn from the row's
  key folded with the block index (TPG). Strength 1 = on, 0 = off. Default: the bottleneck.
- `sigma_shift(δ)`: the whole denoiser (preconditioning included) is evaluated at σ·(1 + δ), δ > −1.
- `window(size, stride)`: the network sees only size×size crops at offsets 0, stride, … (plus one
  flush with the border), batched, and the crop outputs are averaged where they overlap (M-SWG).
  It changes the batch shape, so a window guide runs its own pass; size = the image is the plain
  network. Defaults: size = R/2 (rounded to the U-Net's granularity), stride = size/2.

The network calls one hook, `apply(point, x, perturbations, ...)`, at each place a kind can act
(POINTS: the block input, the residual branch, the attention queries and output, the block output,
the noise level); the kinds' operations live here, so the network reads like EDM2's.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax.config import EDM2Config, block_specs
from edm2_jax.layers import dropout as dropout_layer

KINDS = ('dropout', 'skip', 'attention_identity', 'attention_blur', 'token_shuffle', 'sigma_shift', 'window')
BLOCK_KINDS = ('dropout', 'skip', 'attention_identity', 'attention_blur', 'token_shuffle')
ATTENTION_KINDS = ('attention_identity', 'attention_blur')
RANDOM_KINDS = ('dropout', 'token_shuffle')  # need a key per example
NO_PREFIX_KINDS = ('sigma_shift', 'window')  # change the network's input: nothing can be shared


@flax.struct.dataclass
class Perturbation:
    """What, where, how much. `where` is static (a frozenset of block names after `resolve`);
    `strength` is a pytree leaf (traced); `size`/`stride` are the window's (static); `rows`: None, or
    the (start, stop) rows of a stacked batch outside which the strength is 0 (static: random kinds
    then draw their numbers for those rows only)."""
    kind: str = flax.struct.field(pytree_node=False)
    strength: Any = 1.0
    where: Any = flax.struct.field(pytree_node=False, default=None)
    size: Any = flax.struct.field(pytree_node=False, default=None)
    stride: Any = flax.struct.field(pytree_node=False, default=None)
    rows: Any = flax.struct.field(pytree_node=False, default=None)


def dropout(p, where=None) -> Perturbation:
    return Perturbation('dropout', p, _freeze(where))


def skip(where=None, strength=1.0) -> Perturbation:
    return Perturbation('skip', strength, _freeze(where))


def attention_identity(where=None, strength=1.0) -> Perturbation:
    return Perturbation('attention_identity', strength, _freeze(where))


def attention_blur(sigma, where=None) -> Perturbation:
    return Perturbation('attention_blur', sigma, _freeze(where))


def token_shuffle(where=None, strength=1.0) -> Perturbation:
    return Perturbation('token_shuffle', strength, _freeze(where))


def sigma_shift(delta) -> Perturbation:
    return Perturbation('sigma_shift', delta)


def window(size=None, stride=None) -> Perturbation:
    return Perturbation('window', 1.0, None, size, stride)


def _freeze(where):
    """A hashable block selection (it is static under jit)."""
    if where is None or isinstance(where, (str, int, frozenset)):
        return where
    return tuple(where)


# ---------------------------------------------------------------------------------------------------
# Checks against a network configuration, before anything is compiled.

def select_blocks(config: EDM2Config, where) -> frozenset[str]:
    """Block names for a selection (see the module docstring): the one block selector of the project."""
    blocks = [s for s in block_specs(config) if s.kind == 'block']
    if isinstance(where, frozenset) and where <= {s.name for s in blocks}:
        return where  # already resolved
    if isinstance(where, str) and ',' in where:
        where = [w.strip() for w in where.split(',') if w.strip()]
    if where is None or where == 'all':
        return frozenset(s.name for s in blocks)
    if where in ('encoder', 'decoder'):
        return frozenset(s.name for s in blocks if s.flavor == where[:3])
    if where == 'bottleneck':
        return frozenset(s.name for s in blocks if s.name.endswith(('_in0', '_in1')))
    items = [where] if isinstance(where, (str, int, np.integer)) else list(where)
    names = {s.name.replace('.', '_', 1): s.name for s in blocks} | {s.name: s.name for s in blocks}
    levels = {}
    for s in blocks:
        level = f'{s.resolution}x{s.resolution}'
        for key in (level, f'{s.flavor}.{level}'):
            levels.setdefault(key, set()).add(s.name)
    out, unknown = set(), []
    for item in items:
        key = f'{item}x{item}' if isinstance(item, (int, np.integer)) else item
        if key in ('all', 'encoder', 'decoder', 'bottleneck'):
            out |= select_blocks(config, key)
        elif key in levels:
            out |= levels[key]
        elif key in names:
            out.add(names[key])
        else:
            unknown.append(item)
    if unknown:
        raise ValueError(f'unknown blocks {unknown}; choose "all", "encoder", "decoder", "bottleneck", '
                         f'a level from {sorted(k for k in levels if "." not in k)} (or "enc."/"dec." + '
                         f'level) or names from {[s.name for s in blocks]}')
    return frozenset(out)


def lowest_decoder_level(config: EDM2Config) -> str:
    """'dec.RxR' for the smallest resolution R of the U-Net (skip-layer guidance's default)."""
    low = min(s.resolution for s in block_specs(config) if s.kind == 'block')
    return f'dec.{low}x{low}'


def default_where(config: EDM2Config, kind: str):
    """The block selection a kind uses when none is given."""
    return {'skip': lowest_decoder_level(config), 'token_shuffle': 'bottleneck'}.get(kind)


def resolve(config: EDM2Config, perturbation) -> tuple[Perturbation, ...]:
    """None, one `Perturbation` or a sequence of them → a tuple checked against `config`: block
    selections become frozensets of names, window size/stride are fixed, concrete strengths are
    range-checked. Raises ValueError for anything that cannot apply (before compiling)."""
    if perturbation is None:
        return ()
    items = (perturbation,) if isinstance(perturbation, Perturbation) else tuple(perturbation)
    out = tuple(_resolve_one(config, p) for p in items)
    if any(p.kind == 'window' for p in out) and len(out) > 1:
        raise ValueError('a window perturbation changes the batch shape: it cannot be combined with '
                         'other perturbations in one call')
    return out


def _resolve_one(config, p):
    if not isinstance(p, Perturbation):
        raise TypeError(f'a perturbation must be a perturb.Perturbation, got {type(p).__name__}')
    if p.kind not in KINDS:
        raise ValueError(f'unknown perturbation kind {p.kind!r}; choose from {KINDS}')
    check_values(p.kind, _concrete(p.strength))
    if p.kind == 'window':
        size, stride = window_geometry(config, p.size, p.stride)
        return p.replace(size=size, stride=stride)
    if p.kind == 'sigma_shift':
        if p.where is not None:
            raise ValueError('sigma_shift changes the noise level of the whole network; it takes no blocks')
        return p
    blocks = select_blocks(config, default_where(config, p.kind) if p.where is None else p.where)
    if p.kind in ATTENTION_KINDS:
        heads = frozenset(s.name for s in block_specs(config) if s.num_heads)
        if not heads:
            raise ValueError(f'{p.kind} needs attention blocks and this network has none '
                             f'(attn_resolutions={config.attn_resolutions})')
        if blocks and not blocks & heads:
            raise ValueError(f'{p.kind}: none of the blocks {sorted(blocks)} has attention; the '
                             f'attention blocks are {sorted(heads)}')
        blocks = blocks & heads
    return p.replace(where=blocks)


def _concrete(value):
    v = getattr(value, 'values', value)  # a guidance.Schedule: all its levels
    try:
        return np.asarray(v, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def check_values(kind, values):
    """Range check of concrete strengths (None: traced, checked where they were concrete)."""
    if values is None:
        return
    v = np.asarray(values, np.float64)
    ok = {'dropout': (v >= 0) & (v < 1), 'attention_blur': v >= 0, 'sigma_shift': v > -1,
          'window': v == 1}.get(kind)
    if ok is None:
        ok = (v == 0) | (v == 1)
    if not np.all(ok):
        need = {'dropout': 'a rate p in [0, 1)', 'attention_blur': 'a blur σ >= 0 (inf allowed)',
                'sigma_shift': 'δ > -1', 'window': 'no strength'}.get(kind, 'strength 1 (on) or 0 (off)')
        raise ValueError(f'{kind} needs {need}, got {v}')


def check_strengths(perturbations, n) -> tuple[Perturbation, ...]:
    """Strengths as float32 [n] arrays (a scalar is broadcast; [n] kept)."""
    out = []
    for p in perturbations:
        s = jnp.asarray(p.strength, jnp.float32)
        if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, n)):
            raise ValueError(f'{p.kind} strength must be a scalar or one per example ({n}), got {s.shape}')
        out.append(p.replace(strength=jnp.broadcast_to(s.reshape(-1), (n,))))
    return tuple(out)


def window_geometry(config: EDM2Config, size=None, stride=None) -> tuple[int, int]:
    """(size, stride) of the sliding window, checked against the image and the U-Net's downsampling."""
    r, g = config.img_resolution, 1 << (len(config.channel_mult) - 1)
    size = max(g, (r // 2) // g * g) if size is None else int(size)
    stride = max(1, size // 2) if stride is None else int(stride)
    if not 0 < size <= r:
        raise ValueError(f'window size must lie in [1, {r}] (the image is {r}x{r}), got {size}')
    if size % g:
        raise ValueError(f'window size must be a multiple of {g} (the U-Net downsamples {g}x), got {size}')
    if stride < 1:
        raise ValueError(f'window stride must be >= 1, got {stride}')
    return size, stride


def window_starts(resolution: int, size: int, stride: int) -> list[int]:
    """Crop offsets along one axis: 0, stride, … and a last crop flush with the border."""
    starts = list(range(0, resolution - size + 1, stride))
    if starts[-1] != resolution - size:
        starts.append(resolution - size)
    return starts


def first_index(config: EDM2Config, perturbations):
    """Execution index of the first module any perturbation touches (None: none touches a block, or a
    kind changes the input so nothing can be shared)."""
    if any(p.kind in NO_PREFIX_KINDS for p in perturbations):
        return None
    names = frozenset().union(*(p.where for p in perturbations if p.kind in BLOCK_KINDS))
    indices = [s.index for s in block_specs(config) if s.name in names]
    return min(indices) if indices else None


# ---------------------------------------------------------------------------------------------------
# The hook the network calls, and the kinds' operations (strengths [N], traced).

POINTS = {'token_shuffle': 'input', 'dropout': 'residual', 'attention_blur': 'query',
          'attention_identity': 'attention', 'skip': 'output', 'sigma_shift': 'sigma'}


def merge(perturbations) -> tuple[Perturbation, ...]:
    """One perturbation per kind: the terms of a fused pass perturb disjoint rows, so the strengths of
    one kind add up row by row (a row's own strength, zeros elsewhere)."""
    out: dict[str, Perturbation] = {}
    for p in perturbations:
        out[p.kind] = p if p.kind not in out else \
            out[p.kind].replace(strength=out[p.kind].strength + p.strength, rows=None)
    return tuple(out.values())


def apply(point: str, x, perturbations, **context):
    """x after the perturbations that act at `point` (see POINTS); rows of strength 0 keep x exactly.
    context: what an operation needs there (keys and the block index at the input, the dropout
    noise in the residual branch, the grid at the queries, v at the attention, the skip path at the
    output)."""
    for p in perturbations:
        if POINTS.get(p.kind) == point:
            x = _OPERATIONS[p.kind](x, p.strength, **context)
    return x


def _shuffle(x, on, keys, index):
    """Each row's own permutation stream: its key folded with the block's index."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1 << 20 | index)
    return jnp.where(rows(on > 0, x), shuffle_positions(x, keys), x)


def _blur_queries(q, sigma, grid):
    n, _, heads, c = q.shape
    blurred = gaussian_blur(q.reshape((n,) + grid + (heads, c)), sigma).reshape(q.shape)
    return jnp.where(rows(sigma > 0, q), blurred, q)


_OPERATIONS = {
    'token_shuffle': _shuffle,
    'dropout': lambda y, rate, uniform: dropout_layer(y, rate, uniform.reshape(y.shape)),
    'attention_blur': _blur_queries,
    'attention_identity': lambda y, on, v: jnp.where(rows(on > 0, y), v, y),  # each pixel attends to itself
    'skip': lambda x, on, skipped: jnp.where(rows(on > 0, x), skipped, x),
    'sigma_shift': lambda sigma, delta: sigma * (1 + delta.reshape(-1, 1, 1, 1)),  # δ = 0: × exactly 1
}


def dropout_noise(config: EDM2Config, perturbations, keys) -> dict:
    """Uniform [0, 1) noise for the residual branch of every block a dropout perturbation touches,
    drawn in one call per example: one draw of Σ H·W·C numbers (then cut per block) compiles one RNG
    kernel instead of one per block; row i's noise depends only on keys[i]. Rows outside every
    dropout's `rows` draw nothing (their noise is 1: keep everything)."""
    drops = [p for p in perturbations if p.kind == 'dropout']
    blocks = frozenset().union(*(p.where for p in drops))
    if not blocks:
        return {}
    shapes = {s.name: (s.resolution, s.resolution, s.out_channels)
              for s in block_specs(config) if s.name in blocks}
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    n = keys.shape[0]
    drawn = np.zeros(n, bool)
    for p in drops:
        drawn[slice(*(p.rows or (0, n)))] = True
    rows = np.flatnonzero(drawn)
    uniform = jax.vmap(lambda k: jax.random.uniform(k, (sum(sizes),), jnp.float32))(keys[rows])
    if len(rows) < n:
        uniform = jnp.ones((n, sum(sizes)), jnp.float32).at[rows].set(uniform)
    parts = jnp.split(uniform, np.cumsum(sizes)[:-1], axis=1)
    return {name: part.reshape((-1,) + shape) for (name, shape), part in zip(shapes.items(), parts)}


# ---------------------------------------------------------------------------------------------------
# Per-example operations (strengths [N], traced).

def rows(mask, like):
    """A per-example [N] mask shaped to broadcast against `like` [N, ...]."""
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def gaussian_matrix(size, sigma):
    """[N, size, size]: row-normalised exp(−(i − j)²/(2σ²)) for per-row σ [N] (σ = inf → the mean;
    σ = 0 rows are placeholders, the caller keeps the unblurred value there)."""
    d = jnp.arange(size, dtype=jnp.float32)
    d2 = jnp.square(d[:, None] - d[None, :])
    s = jnp.where(sigma > 0, sigma, 1.0).astype(jnp.float32).reshape(-1, 1, 1)
    k = jnp.exp(-d2 / (2 * jnp.square(s)))
    return k / k.sum(axis=-1, keepdims=True)


def gaussian_blur(q, sigma):
    """q [N, H, W, ...] blurred over (H, W) by a separable Gaussian of per-row σ [N]."""
    h, w = q.shape[1:3]
    kh, kw = gaussian_matrix(h, sigma).astype(q.dtype), gaussian_matrix(w, sigma).astype(q.dtype)
    b = jnp.einsum('nij,njw...->niw...', kh, q)
    return jnp.einsum('nvw,niw...->niv...', kw, b)


def shuffle_positions(x, keys):
    """x [N, H, W, C] with the H·W positions of row i permuted by a permutation drawn from keys[i]."""
    n, h, w, c = x.shape
    perms = jax.vmap(lambda k: jax.random.permutation(k, h * w))(keys)
    return jnp.take_along_axis(x.reshape(n, h * w, c), perms[:, :, None], axis=1).reshape(x.shape)

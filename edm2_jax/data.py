"""Data sets as uint8 numpy arrays [N,H,W,C]: Fashion-MNIST (IDX files of the Debian package
`dataset-fashion-mnist`), EDM2-style image folders / zips with an optional dataset.json, and .npz files.
Also the resolution maps used for Fashion-MNIST (28 → 32 zero padding, 28 → 16 exact area averaging and
their evaluator-side inverses), the model's [-1, 1] range, and the deterministic batch order.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edm2_jax.errors import UserError

FASHION_MNIST_ROOT = '/usr/share/datasets/fashion-mnist'
IDX_IMAGES, IDX_LABELS = 2051, 2049          # magic numbers: unsigned bytes, 3 resp. 1 dimensions
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# What a damaged archive or image raises (zipfile, zlib, numpy's format reader, PIL).
UNREADABLE = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error)


class ImageData(NamedTuple):
    images: np.ndarray             # uint8 [N,H,W,C]
    labels: np.ndarray | None      # int32 [N], or None if unlabeled
    num_classes: int               # max label + 1 (10 for Fashion-MNIST), 0 if unlabeled


# ------------------------------------------------------------------------------------------- IDX
def read_idx(path, magic: int) -> np.ndarray:
    """An IDX array (big-endian header: magic, then one uint32 per dimension; then uint8 data).
    Checks the magic number and that the data is exactly as long as the header says."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f'{path}: corrupt gzip stream ({e})') from None
    if len(raw) < 4 or int.from_bytes(raw[:4], 'big') != magic:
        found = int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else 'none (file too short)'
        raise ValueError(f'{path}: IDX magic number {found}, expected {magic}')
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f'{path}: truncated IDX header ({len(raw)} bytes)')
    dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
    size = len(raw) - 4 - 4 * ndim
    if size != math.prod(dims):
        raise ValueError(f'{path}: header says shape {dims} ({math.prod(dims)} bytes), file has {size}')
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = 'train', root=None):
    """Fashion-MNIST images uint8 [N,28,28,1] and labels int32 [N]; split 'train' (60000) | 'test' (10000).
    root: argument, else $FASHION_MNIST_DIR, else the Debian package's directory."""
    prefix = {'train': 'train', 'test': 't10k'}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get('FASHION_MNIST_DIR') or FASHION_MNIST_ROOT)
    paths = [root / f'{prefix}-images-idx3-ubyte.gz', root / f'{prefix}-labels-idx1-ubyte.gz']
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(
                f'Fashion-MNIST file {p} not found. Install the Debian package dataset-fashion-mnist '
                f'(`apt-get install dataset-fashion-mnist`), or point root= / $FASHION_MNIST_DIR at the files.')
    images, labels = read_idx(paths[0], IDX_IMAGES), read_idx(paths[1], IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f'{root}: {len(images)} images but {len(labels)} labels ({split})')
    return images[..., None], labels.astype(np.int32)


# ---------------------------------------------------------------------------- generic sources
def _decode(data: bytes, name: str) -> np.ndarray:
    """One PNG/JPG as uint8 [H,W,C]: grayscale stays 1 channel, every other mode becomes RGB."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img if img.mode in ('L', 'RGB') else img.convert('RGB')
            a = np.asarray(img, np.uint8)
    except (*UNREADABLE, Image.DecompressionBombError) as e:
        raise UserError(f'cannot decode image ({e})', where=name, fix='replace or remove the file') from None
    return a[..., None] if a.ndim == 2 else a


def _checked(images, labels, name: str) -> ImageData:
    """Validates shapes, dtypes and labels; returns ImageData with [N,H,W,C] images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise UserError(f'images must be non-empty uint8 [N,H,W] or [N,H,W,C], got {images.dtype} '
                        f'{images.shape}', where=name)
    images = images[..., None] if images.ndim == 3 else images
    if labels is None:
        return ImageData(images, None, 0)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise UserError(f'labels must be integers of shape ({len(images)},), got {labels.dtype} '
                        f'{labels.shape}', where=name)
    if labels.min() < 0 or labels.max() >= 2 ** 31:
        raise UserError(f'labels must lie in [0, 2^31), got [{labels.min()}, {labels.max()}]', where=name)
    return ImageData(images, labels.astype(np.int32), int(labels.max()) + 1)


def _load_image_set(source: str) -> ImageData:
    """EDM2/StyleGAN-style folder or zip: images sorted by relative path ('/'-separated), labels from
    an optional top-level dataset.json {"labels": [[relpath, int], ...] | null}."""
    def wanted(name):
        return name.lower().endswith(IMAGE_SUFFIXES) or name == 'dataset.json'
    if zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as z:
                files = {n: z.read(n) for n in z.namelist() if wanted(n)}
        except UNREADABLE as e:
            raise UserError(f'damaged zip archive ({e})', where=source, fix='recreate the archive') from None
    else:
        paths = {p.relative_to(source).as_posix(): p for p in Path(source).rglob('*') if p.is_file()}
        files = {n: p.read_bytes() for n, p in paths.items() if wanted(n)}
    meta, names = files.pop('dataset.json', None), sorted(files)
    if not names:
        raise UserError(f'no {"/".join(IMAGE_SUFFIXES)} images found', where=source)
    try:
        labels = json.loads(meta)['labels'] if meta is not None else None
        table = {str(k): v for k, v in labels or ()}
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f'expected {{"labels": [[relpath, int], ...] | null}} ({e!r})',
                        where=f'{source}/dataset.json') from None
    if labels is not None:
        missing = [n for n in names if n not in table]
        if missing or len(table) != len(names):
            raise UserError(f'labels do not match the images ({len(table)} labels, {len(names)} images, '
                            f'first unlabeled: {missing[:3]})', where=f'{source}/dataset.json')
        if not all(type(table[n]) is int for n in names):
            raise UserError('labels must be integers', where=f'{source}/dataset.json')
        labels = np.array([table[n] for n in names], np.int64)
    arrays = [_decode(files[n], f'{source}/{n}') for n in names]
    for n, a in zip(names, arrays):
        if a.shape != arrays[0].shape:
            raise UserError(f'shape {a.shape} differs from {names[0]}: {arrays[0].shape}', where=f'{source}/{n}')
    return _checked(np.stack(arrays), labels, source)


def _load_npz(source: str) -> ImageData:
    """`images` (and optional `labels`) of an .npz; a damaged file is a UserError naming it."""
    try:
        with np.load(source, allow_pickle=False) as z:
            if 'images' not in z:
                raise UserError(f'no `images` array (found {list(z.keys())})', where=source)
            images, labels = z['images'], z['labels'] if 'labels' in z else None
    except UserError:
        raise
    except UNREADABLE as e:
        raise UserError(f'not a readable .npz ({type(e).__name__}: {e})', where=source,
                        fix='write it again with numpy.savez') from None
    return _checked(images, labels, source)


def load_images(source: str, resolution: int | None = None) -> ImageData:
    """source: 'fashion-mnist[:train|:test]', a .npz (`images`, optional `labels`), or an image
    folder / .zip. resolution: None keeps the size; otherwise see `resize`."""
    if source.split(':')[0] == 'fashion-mnist':
        data = ImageData(*load_fashion_mnist(source.partition(':')[2] or 'train'), 10)
    elif not os.path.exists(source):
        raise UserError('data source not found', where=source,
                        fix="give 'fashion-mnist', an image folder / .zip, or a .npz")
    elif source.endswith('.npz'):
        data = _load_npz(source)
    elif os.path.isdir(source) or zipfile.is_zipfile(source):
        data = _load_image_set(source)
    else:
        raise UserError('not a directory, .zip or .npz', where=source)
    return data._replace(images=resize(data.images, resolution))


# ---------------------------------------------------------------------------------- resolution
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] exact area-averaging matrix: output cell i spans [i, i+1)·n_in/n_out in input
    pixels; its weight on pixel j is the overlap length over the cell width (rows sum to 1).
    Computed in integer units of 1/n_out pixel, so it is exact."""
    i, j = np.arange(n_out)[:, None], np.arange(n_in)[None, :]
    overlap = np.minimum((i + 1) * n_in, (j + 1) * n_out) - np.maximum(i * n_in, j * n_out)
    return np.maximum(overlap, 0) / n_in


def _separable(images, wh, ww) -> np.ndarray:
    """[N,H,W,C] → [N,h,w,C] float64: wh [h,H] applied along rows, ww [w,W] along columns."""
    x = np.moveaxis(np.asarray(images, np.float64), 3, 1)                 # [N,C,H,W]
    return np.moveaxis(wh @ x @ ww.T, 1, 3)


def resize(images: np.ndarray, resolution: int | None) -> np.ndarray:
    """uint8 [N,H,W,C] to `resolution`: None or same size keeps; 28 → 32 zero-pads 2 px per side;
    28 → 16 averages exact areas (rounded to nearest, ties to even). Anything else is a ValueError."""
    size = images.shape[1]
    if resolution is None or (resolution, resolution) == images.shape[1:3]:
        return images
    if images.shape[1:3] == (28, 28) and resolution == 32:
        return np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    if images.shape[1:3] == (28, 28) and resolution == 16:
        out = _separable(images, area_weights(28, 16), area_weights(28, 16))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    raise ValueError(f'unsupported resolution change {size}x{images.shape[2]} -> {resolution} '
                     f'(supported: 28 -> 32 padding, 28 -> 16 area downsampling)')


def crop_padding(images: np.ndarray, to: int = 28) -> np.ndarray:
    """Inverse of the zero padding: the central to×to window of [N,H,W,C] (H − to even, ≥ 0)."""
    pad = images.shape[1] - to
    if pad < 0 or pad % 2 or images.shape[1] != images.shape[2]:
        raise ValueError(f'cannot crop {images.shape[1]}x{images.shape[2]} to {to}x{to} symmetrically')
    return images[:, pad // 2:pad // 2 + to, pad // 2:pad // 2 + to]


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation with half-pixel centres (align_corners=False, as
    jax.image.resize / PIL): output i samples input coordinate (i + ½)·n_in/n_out − ½, clamped."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi, frac = np.minimum(lo + 1, n_in - 1), x - lo
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def upsample(images: np.ndarray, to: int = 28) -> np.ndarray:
    """Bilinear upsampling of [N,H,W,C] to to×to (the evaluator's inverse of area downsampling);
    uint8 in → uint8 out (rounded), float in → float32 out."""
    if images.shape[1] > to or images.shape[2] > to:
        raise ValueError(f'upsample: {images.shape[1]}x{images.shape[2]} is larger than {to}x{to}')
    wh, ww = bilinear_weights(images.shape[1], to), bilinear_weights(images.shape[2], to)
    out = _separable(images, wh, ww)
    if images.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def restore_resolution(images: np.ndarray, to: int = 28) -> np.ndarray:
    """Maps generated images back to to×to: larger → `crop_padding`, smaller → `upsample`."""
    size = images.shape[1]
    return images if size == to else crop_padding(images, to) if size > to else upsample(images, to)


# ------------------------------------------------------------------------------ values, batches
def to_model_range(images_uint8) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1] (x / 127.5 − 1)."""
    return np.asarray(images_uint8, np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(x) -> np.ndarray:
    """Inverse of `to_model_range`: (x + 1)·127.5, rounded and clipped to [0, 255]."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices at global positions [step·B, (step+1)·B) of the endless sequence formed by
    concatenating per-epoch permutations (epoch e from default_rng([seed, e])). Pure: resuming at
    any step, on any device count, sees the same data."""
    if num_examples < 1 or batch_size < 1 or seed < 0 or step < 0:
        raise ValueError(f'batch_indices: need num_examples, batch_size ≥ 1 and seed, step ≥ 0; got '
                         f'{num_examples}, {batch_size}, {seed}, {step}')
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epoch, offset = np.divmod(pos, num_examples)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = _epoch_permutation(num_examples, seed, int(e))[offset[sel]]
    return out

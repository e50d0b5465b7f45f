"""FID and FD_DINOv2 of an image set in EDM2's protocol (edm2-spec §5), and reference statistics.

    python -m experiments.evaluate --images=DIR_OR_NPZ --ref=img512.pkl --metrics=fid,fd_dinov2
    python -m experiments.evaluate --images=REAL_DIR --make_ref --ref=OUT.pkl --num_images=0

--images: a folder of PNGs (searched recursively, EDM2's `{seed:06d}.png` layout, ours or NVIDIA's)
or an .npz holding uint8 [N, H, W, 3] (`arr_0`, `samples` or `images`). --detectors: the directory
written by `python -m convert.detectors`. Protocol: --num_images=50000 images; fewer is an error,
more → a random subset drawn with --seed; 0 takes every image. --ref: EDM2 `dataset-refs` .pkl
(NVIDIA's img512.pkl works) or an image folder/.npz (its statistics are computed here, which also
enables --metrics=precision,recall on DINOv2 features). Features are extracted in batches sharded
over the local devices, each host taking every process_count-th image; statistics are summed across
hosts. Result: JSON on stdout and, with --out, in a file.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from edm2_jax.errors import UserError, cli_main
from edm2_jax.io import write_json

DETECTOR_OF = {'fid': 'inception', 'fd_dinov2': 'dinov2'}
PR_METRICS = ('precision', 'recall')
NPZ_KEYS = ('arr_0', 'samples', 'images')

FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------------------------
# Images

class ImageSet:
    """Uint8 [N, H, W, 3] images from a PNG folder (read lazily) or an .npz.

    A folder is checked whole on construction, from the PNG headers only: every file must open and
    all must share one size, else a UserError names the first offending file. A file that is damaged
    past its header names itself when it is read.
    """

    def __init__(self, path, flag: str = '--images'):
        path = Path(path)
        self.path, self.array, self.files = path, None, None
        if path.is_dir():
            self.files = sorted(p for p in path.rglob('*.png') if not p.name.startswith('.'))
            if not self.files:
                raise UserError('no .png files', where=f'{flag} {path}', fix='give a folder of PNGs or an .npz')
            self.size = _common_size(self.files)
        elif path.suffix == '.npz' and path.is_file():
            self.array = _read_npz(path, flag)
            self.size = self.array.shape[2:0:-1]
        elif not path.exists():
            raise UserError('does not exist', where=f'{flag} {path}')
        else:
            raise UserError('not a folder of PNGs or an .npz', where=f'{flag} {path}')

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def get(self, indices) -> np.ndarray:
        if self.array is not None:
            return self.array[np.asarray(indices)]
        return np.stack([_decode(self.files[i]) for i in indices])


def _png_size(file: Path) -> tuple[int, int]:
    """(width, height) from the header; UserError naming the file if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    if file.stat().st_size == 0:
        raise UserError('is empty (0 bytes)', where=str(file), fix='regenerate or remove it')
    try:
        with Image.open(file) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f'not a readable image ({e})', where=str(file), fix='regenerate or remove it') from None


def _common_size(files) -> tuple[int, int]:
    """The one (width, height) of all `files`; mixed sizes would silently mix feature statistics."""
    first = _png_size(files[0])
    for file in files[1:]:
        size = _png_size(file)
        if size != first:
            raise UserError(f'is {size[0]}x{size[1]} but {files[0].name} is {first[0]}x{first[1]}',
                            where=str(file), fix='every image of a set must have the same size')
    return first


def _decode(file: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert('RGB'))
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f'cannot decode ({e})', where=str(file), fix='regenerate or remove it') from None


def _read_npz(path: Path, flag: str) -> np.ndarray:
    """The uint8 [N, H, W, 3] image array of an .npz (under one of NPZ_KEYS)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in NPZ_KEYS if k in npz.files), None)
            if key is None:
                raise UserError(f'none of {NPZ_KEYS} in {npz.files}', where=f'{flag} {path}')
            array = npz[key]
    except UserError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f'not a readable .npz ({type(e).__name__}: {e})', where=f'{flag} {path}') from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or not len(array):
        raise UserError(f'expected uint8 [N, H, W, 3] with N > 0, got {array.dtype} {array.shape}',
                        where=f'{flag} {path}')
    return array


def select(n_available: int, num_images: int, seed: int) -> np.ndarray:
    """EDM2's protocol: exactly `num_images` (a seeded random subset if more); 0 = all."""
    if num_images < 0:
        raise UserError(f'must be >= 0, got {num_images}', where='--num_images')
    if num_images == 0:
        return np.arange(n_available)
    if n_available < num_images:
        raise UserError(f'found {n_available} images, need {num_images}', where='--images',
                        fix='generate more, or set --num_images (0 = all)')
    if n_available == num_images:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).permutation(n_available)[:num_images])


# ------------------------------------------------------------------------------------------------
# Detectors and features

def load_detector(detectors_dir, name):
    """A function uint8 [N, H, W, 3] → float32 features, from a convert.detectors output."""
    from convert import detectors
    from edm2_jax import checkpoint
    from edm2_jax.metrics import dinov2, inception
    path = Path(detectors_dir) / name
    if not path.is_dir():
        raise UserError('not found', where=f'--detectors {path}',
                        fix=f'run `python -m convert.detectors --{name}=WEIGHTS --dst_dir={detectors_dir}` first')
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables, meta = checkpoint.load_variables(path, sharding=replicated)
    if name == 'inception' and meta.get('format') == detectors.INCEPTION_FORMAT:
        return inception.make_feature_fn(variables, 'nvidia'), mesh
    if name == 'dinov2' and meta.get('format') == detectors.DINOV2_FORMAT:
        return dinov2.make_feature_fn(dinov2.DINOv2Config(**meta['config']), variables), mesh
    raise UserError(f'format {meta.get("format")!r} is not a {name} detector', where=str(path),
                    fix='run convert.detectors again')


def extract(images: ImageSet, indices, feature_fns: dict, batch: int, keep_features=(), progress=True):
    """Per detector: FeatureStats over `indices` (summed across hosts) and, for names in
    `keep_features`, the features themselves (this host's share only on multi-host runs)."""
    from edm2_jax.metrics.frechet import FeatureStats
    n_proc, proc = jax.process_count(), jax.process_index()
    mine = indices[proc::n_proc]
    per_host = max(batch // n_proc, 1)
    stats, kept = {}, {k: [] for k in keep_features}
    try:
        from tqdm import tqdm
        steps = tqdm(range(0, len(mine), per_host), desc='features', disable=not progress or proc > 0)
    except ImportError:
        steps = range(0, len(mine), per_host)
    for s in steps:
        x = images.get(mine[s:s + per_host])
        for name, (fn, mesh) in feature_fns.items():
            n_dev = mesh.devices.size
            pad = (-len(x)) % n_dev
            xp = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
            xs = jax.device_put(xp, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
            f = np.asarray(jax.device_get(fn(xs)), np.float64)[:len(x)]
            stats.setdefault(name, FeatureStats(f.shape[1])).add(f)
            if name in kept:
                kept[name].append(f)
    if n_proc > 1:
        from jax.experimental import multihost_utils
        for st in stats.values():
            n, total, outer = multihost_utils.process_allgather((np.array(st.n), st.total, st.total_outer))
            st.n, st.total, st.total_outer = int(n.sum()), total.sum(0), outer.sum(0)
    return stats, {k: np.concatenate(v) for k, v in kept.items()}


# ------------------------------------------------------------------------------------------------

def run(images_path, ref_path, metrics, detectors_dir, *, make_ref=False, num_images=50000, seed=0,
        batch=64, pr_k=3, overwrite=False, progress=True) -> dict:
    from edm2_jax.metrics.frechet import frechet_distance, load_refs, save_refs
    from edm2_jax.metrics.prdc import precision_recall
    unknown = set(metrics) - set(DETECTOR_OF) - set(PR_METRICS)
    if unknown or not metrics:
        raise UserError(f'unknown metrics {sorted(unknown)}' if unknown else 'no metrics given', where='--metrics',
                        fix='choose from fid, fd_dinov2, precision, recall')
    if batch < 1:
        raise UserError(f'must be >= 1, got {batch}', where='--batch')
    if not Path(images_path).exists():
        raise UserError('does not exist', where=f'--images {images_path}')
    ref_path = Path(ref_path)
    wants_pr = bool(set(metrics) & set(PR_METRICS))
    ref_is_images = ref_path.is_dir() or (ref_path.suffix == '.npz' and _is_image_npz(ref_path))
    if make_ref:
        if ref_path.exists() and not overwrite:
            raise UserError('exists', where=f'--ref {ref_path}', fix='pass --overwrite to replace it')
        if wants_pr:
            raise UserError('precision/recall need reference images, not statistics', where='--metrics',
                            fix='drop them with --make_ref')
    elif not ref_path.exists():
        raise UserError('does not exist', where=f'--ref {ref_path}')
    elif wants_pr and not ref_is_images:
        raise UserError('precision/recall need --ref to be an image folder or image .npz', where='--metrics')
    names = sorted({DETECTOR_OF[m] for m in metrics if m in DETECTOR_OF} | ({'dinov2'} if wants_pr else set()))
    images = ImageSet(images_path)
    indices = select(len(images), num_images, seed)
    ref_images = ImageSet(ref_path, '--ref') if ref_is_images and not make_ref else None
    refs = None if make_ref or ref_is_images else load_refs(ref_path)
    for m in metrics:
        if refs is not None and m in DETECTOR_OF and m not in refs:
            raise UserError(f'holds no statistics for {m} (has {sorted(refs)})', where=f'--ref {ref_path}')
    fns = {name: load_detector(detectors_dir, name) for name in names}
    keep = ('dinov2',) if wants_pr else ()
    stats, feats = extract(images, indices, fns, batch, keep, progress)
    detector_metric = {v: k for k, v in DETECTOR_OF.items()}
    ours = {detector_metric[name]: dict(zip(('mu', 'sigma'), st.mu_sigma())) for name, st in stats.items()}
    if make_ref:
        if jax.process_index() == 0:
            save_refs(ref_path, {'num_images': len(indices), **{m: ours[m] for m in metrics}})
        return {'num_images': len(indices), 'ref': str(ref_path), 'metrics': sorted(metrics)}
    ref_feats = {}
    if ref_images is not None:
        ref_stats, ref_feats = extract(ref_images, np.arange(len(ref_images)), fns, batch, keep, progress)
        refs = {detector_metric[n]: dict(zip(('mu', 'sigma'), st.mu_sigma())) for n, st in ref_stats.items()}
    result = {'num_images': int(len(indices)), 'images': str(images_path), 'ref': str(ref_path)}
    for m in metrics:
        if m in DETECTOR_OF:
            result[m] = frechet_distance(ours[m]['mu'], ours[m]['sigma'], refs[m]['mu'], refs[m]['sigma'])
    if wants_pr:
        pr = precision_recall(ref_feats['dinov2'], feats['dinov2'], k=pr_k)
        result.update({f'{k}_dinov2': v for k, v in pr.items() if k in metrics})
    return result


def _is_image_npz(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return any(k in npz.files for k in NPZ_KEYS)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f'not a readable .npz ({type(e).__name__}: {e})', where=f'--ref {path}') from None


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (tests import several scripts' modules)."""
    flags.DEFINE_string('images', None, 'PNG folder or .npz of uint8 [N, H, W, 3] images')
    flags.DEFINE_string('ref', None, 'reference statistics .pkl/.npz, or a reference image folder/.npz')
    flags.DEFINE_list('metrics', ['fid', 'fd_dinov2'], 'fid, fd_dinov2, precision, recall')
    flags.DEFINE_string('detectors', 'checkpoints/detectors', 'output directory of convert.detectors')
    flags.DEFINE_bool('make_ref', False, 'write the statistics of --images to --ref instead of evaluating')
    flags.DEFINE_integer('num_images', 50000, 'images to use (EDM2: 50000); 0 = all')
    flags.DEFINE_integer('seed', 0, 'seed of the random subset when there are more than --num_images')
    flags.DEFINE_integer('batch', 64, 'images per step (all hosts together)')
    flags.DEFINE_integer('pr_k', 3, 'k of the k-NN manifolds for precision/recall')
    flags.DEFINE_string('out', None, 'also write the JSON result here')
    flags.DEFINE_bool('overwrite', False, 'replace an existing --ref with --make_ref')


@cli_main('evaluate')
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS.images or not FLAGS.ref:
        raise app.UsageError('--images and --ref are required')
    result = run(FLAGS.images, FLAGS.ref, FLAGS.metrics, FLAGS.detectors, make_ref=FLAGS.make_ref,
                 num_images=FLAGS.num_images, seed=FLAGS.seed, batch=FLAGS.batch, pr_k=FLAGS.pr_k,
                 overwrite=FLAGS.overwrite)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))
        if FLAGS.out:
            write_json(FLAGS.out, result)


if __name__ == '__main__':
    define_flags()
    app.run(main)

"""Fashion-MNIST evaluator: a small CNN classifier trained here on the training split.

- FD-FMNIST: Fréchet distance between the classifier's 128-d penultimate features of the images and
  of the 10,000 test images (EDM2 refs format, key 'fd_fmnist').
- KID: unbiased kernel distance (Bińkowski et al. 2018; `edm2_jax.metrics.kid`: 100 seeded subsets of
  1,000) on the same features standardized per dimension by the test statistics (`kid.standardize`:
  on the raw features, |x|²/d ≈ 15, the cubic kernel's spread hid every difference), against the
  test features, as 'kid' and 'kid_std' (over subsets).
- precision / recall: k-NN manifolds (Kynkäänniemi et al. 2019, k = 3) on the same features, the
  10,000 test images being the real set.
- class accuracy: fraction of images whose argmax class is the requested label.

Architecture: conv3×3(32)–ReLU–maxpool2 → conv3×3(64)–ReLU–maxpool2 → dense(128) → ReLU–dropout →
dense(10). The features are the 128 pre-ReLU activations of the dense(128) layer (no dead units, so
their covariance has full rank). Max pooling is a reshape + max: XLA CPU's reduce_window gradient is
an order of magnitude slower.

Resolution: generated images at 32×32 (zero-padded 28) or 16×16 (area-downsampled 28) are mapped back
with `edm2_jax.data.restore_resolution` (32: centre crop; 16: bilinear upsampling, rounded to uint8).
The reference statistics for resolution r are those of the test images taken through the same round
trip (`data.resize` then `restore_resolution`), so the test set itself scores FD 0 at every r.

Cache layout (`cache_dir`):
  classifier/                     weights + config.json (settings, test accuracy), checkpoint.save_variables
  fmnist-test-{r}.pkl             EDM2 refs {'num_images', 'fd_fmnist': {mu, sigma}} at resolution r
  fmnist-test-{r}-features.npz    test features and labels at r (KID, precision/recall), classifier fingerprint
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from edm2_jax import checkpoint, data
from edm2_jax.io import save_npz
from edm2_jax.metrics.frechet import FeatureStats, frechet_distance, save_refs
from edm2_jax.metrics import kid as kid_lib
from edm2_jax.metrics.prdc import precision_recall

FORMAT = 'edm2-jax-fmnist-classifier'
FEATURE_DIM = 128
NUM_CLASSES = 10
RESOLUTIONS = (28, 32, 16)
REFS_KEY = 'fd_fmnist'


def _max_pool2(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Classifier(nn.Module):
    """float32 [N,28,28,1] in [-1, 1] → (features [N,128], logits [N,10])."""
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _max_pool2(nn.relu(nn.Conv(32, (3, 3))(x)))
        x = _max_pool2(nn.relu(nn.Conv(64, (3, 3))(x)))
        features = nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(features))
        return features, nn.Dense(NUM_CLASSES)(h)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Adam with cosine decay to 0; batches from `data.batch_indices` (epoch permutations of `seed`).
    Defaults: 2000 steps × 128 = 4.3 epochs."""
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    dropout: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0 or self.seed < 0 \
                or not 0 <= self.dropout < 1:
            raise ValueError(f'invalid classifier training settings {self}')


# ------------------------------------------------------------------------------------ inputs

def check_images(images, resolutions=RESOLUTIONS) -> np.ndarray:
    """uint8 [N,r,r,1] with r in `resolutions`, N ≥ 1; anything else is a ValueError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f'images must be a uint8 numpy array, got {type(images).__name__} '
                         f'{getattr(images, "dtype", "")}')
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] not in resolutions \
            or images.shape[3] != 1 or len(images) == 0:
        raise ValueError(f'images must have shape [N, r, r, 1] with r in {resolutions} and N ≥ 1, '
                         f'got {images.shape}')
    return images


def check_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise ValueError(f'requested labels must be integers of shape ({n},), '
                         f'got {labels.dtype} {labels.shape}')
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f'requested labels must lie in [0, {NUM_CLASSES}), '
                         f'got [{labels.min()}, {labels.max()}]')
    return labels


def round_trip(images: np.ndarray, resolution: int) -> np.ndarray:
    """28×28 images as a generator at `resolution` sees them, mapped back to 28×28 for the classifier."""
    return data.restore_resolution(data.resize(check_images(images, (28,)), resolution))


# ---------------------------------------------------------------------------------- evaluator

def fingerprint(variables) -> str:
    """sha256 of the weights (paths, shapes, dtypes, bytes): ties cached statistics to a classifier."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.asarray(leaf)
        h.update(f'{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};'.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Evaluator:
    """The trained classifier. Images run in fixed-size batches (the last one zero-padded): one
    compilation, and an image's features do not depend on what else is in the call."""

    def __init__(self, variables, meta: dict, batch_size: int = 500):
        self.variables = jax.tree.map(jnp.asarray, variables)
        self.meta = meta
        self.batch_size = batch_size
        self.fingerprint = fingerprint(self.variables)
        model = Classifier()
        self._apply = jax.jit(lambda v, x: model.apply(v, x))

    @property
    def test_accuracy(self) -> float:
        return self.meta['test_accuracy']

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,28,28,1] → (float32 [N,128], float32 [N,10])."""
        images = check_images(images, (28,))
        feats, logits = [], []
        for s in range(0, len(images), self.batch_size):
            x = images[s:s + self.batch_size]
            pad = self.batch_size - len(x)
            xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.uint8)]) if pad else x
            f, l = jax.device_get(self._apply(self.variables, data.to_model_range(xp)))
            feats.append(f[:len(x)])
            logits.append(l[:len(x)])
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        return self.features_and_logits(images)[0]

    def logits(self, images) -> np.ndarray:
        return self.features_and_logits(images)[1]


def train_classifier(settings: TrainSettings, log=print) -> tuple[dict, dict]:
    """Trains on the full training split; returns (variables, meta with the test accuracy)."""
    images, labels = data.load_fashion_mnist('train')
    test_images, test_labels = data.load_fashion_mnist('test')
    model = Classifier(dropout=settings.dropout)
    key = jax.random.key(settings.seed)
    params = model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))['params']
    tx = optax.adam(optax.cosine_decay_schedule(settings.learning_rate, settings.steps))
    opt_state = tx.init(params)
    dropout_key = jax.random.fold_in(key, 1)

    @jax.jit
    def step(params, opt_state, x, y, i):
        def loss_fn(p):
            _, logits = model.apply({'params': p}, x, train=True,
                                    rngs={'dropout': jax.random.fold_in(dropout_key, i)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.time()
    for i in range(settings.steps):
        idx = data.batch_indices(len(images), settings.batch_size, settings.seed, i)
        params, opt_state, loss = step(params, opt_state, data.to_model_range(images[idx]), labels[idx],
                                       jnp.int32(i))
        if log and (i + 1) % 250 == 0:
            log(f'classifier step {i + 1}/{settings.steps}: loss {float(loss):.4f} '
                f'({time.time() - start:.0f} s)')
    variables = {'params': jax.device_get(params)}
    train_seconds = time.time() - start
    predicted = np.argmax(Evaluator(variables, {}).logits(test_images), axis=1)
    meta = {
        'format': FORMAT,
        'architecture': 'conv3x3(32)-relu-maxpool2, conv3x3(64)-relu-maxpool2, dense(128)=features, '
                        'relu-dropout, dense(10)',
        'feature_dim': FEATURE_DIM,
        'settings': dataclasses.asdict(settings),
        'test_accuracy': float(np.mean(predicted == test_labels)),
        'train_seconds': round(train_seconds, 1),
    }
    if log:
        log(f'classifier test accuracy {meta["test_accuracy"]:.4f} after {train_seconds:.0f} s')
    return variables, meta


def load_or_train_evaluator(cache_dir, settings: TrainSettings = TrainSettings(), log=print) -> Evaluator:
    """The classifier in `cache_dir/classifier`, trained and saved (atomically) on the first call.
    A cached classifier trained with other settings is an error (use another cache_dir)."""
    path = Path(cache_dir) / 'classifier'
    if not path.exists():
        variables, meta = train_classifier(settings, log)
        try:
            checkpoint.save_variables(path, variables, meta)
        except FileExistsError:     # a concurrent process saved first; its copy is checked below
            pass
    variables, meta = checkpoint.load_variables(path)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path}: format {meta.get("format")!r}, expected {FORMAT!r}')
    if meta['settings'] != dataclasses.asdict(settings):
        raise ValueError(f'{path} was trained with {meta["settings"]}, not {dataclasses.asdict(settings)}: '
                         f'use another cache_dir or delete it')
    return Evaluator(variables, meta)


# --------------------------------------------------------------------------------- references

class Reference(NamedTuple):
    """Test-split statistics at one generator resolution."""
    resolution: int
    mu: np.ndarray            # float64 [128]
    sigma: np.ndarray         # float64 [128, 128]
    features: np.ndarray      # float32 [10000, 128], for KID and precision/recall
    labels: np.ndarray        # int32 [10000]


def reference_stats(evaluator: Evaluator, cache_dir, resolution: int = 28) -> Reference:
    """Statistics of the 10,000 test images through the `resolution` round trip; cached in cache_dir
    (EDM2 refs .pkl + features .npz), recomputed when the cached ones belong to another classifier."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f'resolution must be one of {RESOLUTIONS}, got {resolution}')
    cache_dir = Path(cache_dir)
    pkl = cache_dir / f'fmnist-test-{resolution}.pkl'
    npz = cache_dir / f'fmnist-test-{resolution}-features.npz'
    features, computed = None, False
    if npz.exists():
        with np.load(npz) as z:
            if str(z['fingerprint']) == evaluator.fingerprint:
                features, labels = z['features'], z['labels']
    if features is None:
        images, labels = data.load_fashion_mnist('test')
        features, computed = evaluator.features(round_trip(images, resolution)), True
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_npz(npz, features=features, labels=labels, fingerprint=np.array(evaluator.fingerprint))
    mu, sigma = FeatureStats(FEATURE_DIM).add(features).mu_sigma()
    if computed or not pkl.exists():
        save_refs(pkl, {'num_images': len(features), REFS_KEY: {'mu': mu, 'sigma': sigma}})
    return Reference(resolution, mu, sigma, features, labels)


# --------------------------------------------------------------------------------- evaluation

def image_features(evaluator: Evaluator, images, refs: Reference) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N,128], logits [N,10]) of uint8 [N,r,r,1] images, r being refs' resolution."""
    images = check_images(images)
    if images.shape[1] != refs.resolution:
        raise ValueError(f'images are {images.shape[1]}x{images.shape[2]} but the reference statistics '
                         f'are for resolution {refs.resolution}')
    return evaluator.features_and_logits(data.restore_resolution(images))


def evaluate_features(features, logits, requested_labels, refs: Reference, k: int = 3) -> dict:
    """The metrics of `evaluate_images` from the images' features and logits (`image_features`)."""
    if len(features) <= k:
        raise ValueError(f'need more than k = {k} images for precision/recall, got {len(features)}')
    labels = None if requested_labels is None else check_labels(requested_labels, len(features))
    mu, sigma = FeatureStats(FEATURE_DIM).add(features).mu_sigma()
    result = {'num_images': len(features),
              REFS_KEY: frechet_distance(mu, sigma, refs.mu, refs.sigma),
              **kid_lib.kid(*(kid_lib.standardize(x, refs.mu, refs.sigma) for x in (refs.features, features))),
              **precision_recall(refs.features, features, k=k)}
    result['class_accuracy'] = None if labels is None else float(np.mean(np.argmax(logits, 1) == labels))
    return result


def evaluate_images(evaluator: Evaluator, images, requested_labels, refs: Reference, k: int = 3) -> dict:
    """FD-FMNIST, KID (mean and std over subsets), precision, recall (k-NN, k) and class accuracy (None
    without labels) of uint8 [N,r,r,1] images against `refs` computed at the same resolution r.
    Needs N > k."""
    return evaluate_features(*image_features(evaluator, images, refs), requested_labels, refs, k)

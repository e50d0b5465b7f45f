"""Sample-quality metrics for the 2-D toy (toy2d-spec §5.2), all against the exact class-A density
and a fixed set of exact reference samples. Every metric also has an exact-vs-exact noise floor.

Names (keys of `evaluate`'s dict):
  logp_median, logp_clip_mean   median / mean of max(log p_A, −10)  (concentration)
  outlier, outlier_fig, far     fraction with log p_A < τ (1 % exact quantile), < −1.596 (figure
                                contour), < −5
  escape                        fraction farther than 0.25 from every class-A component mean
  wrong_class                   fraction with p_B > p_A
  branch_tv                     ½ Σ_b |q_b − m_b| over the 127 branches (responsibility argmax)
  leaf_recall, leaf_recall_25   fraction of the 64 leaves with q_b ≥ 0.5 m_b (≥ 0.25 m_b)
  kl_clip                       reverse KL estimate −Ĥ_kNN(q) − clipped mean log p_A
  mmd_02, mmd_10                unbiased MMD² (Gaussian kernel, bandwidth 0.02 / 0.1), 4,096 subsamples
  swd                           sliced Wasserstein-2 distance (256 directions)
  precision, recall             k-NN precision / recall (k = 3), `edm2_jax.metrics.prdc`
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

from edm2_jax.metrics.prdc import precision_recall
from edm2_jax.toy import fractal as mixture_lib

LOGP_CLIP = -10.0
FIGURE_THRESHOLD = -1.596
FAR_THRESHOLD = -5.0
ESCAPE_DISTANCE = 0.25
LEAF_DEPTH = mixture_lib.NUM_LEVELS - 1
METRICS = ('logp_median', 'logp_clip_mean', 'outlier', 'outlier_fig', 'far', 'escape', 'wrong_class',
           'branch_tv', 'leaf_recall', 'leaf_recall_25', 'kl_clip', 'mmd_02', 'mmd_10', 'swd',
           'precision', 'recall')
# Direction of "better" for each metric relative to exact samples: +1 higher, −1 lower, 0 = close to exact.
LOWER_IS_BETTER = ('branch_tv', 'kl_clip', 'mmd_02', 'mmd_10', 'swd', 'escape', 'far')


def outlier_threshold(key, n: int = 1 << 18) -> float:
    """τ: the 1 % quantile of log p_A over n exact class-A samples (≈ −1.84)."""
    mix = mixture_lib.mixture('A')
    return float(jnp.quantile(mixture_lib.log_prob(mix, mixture_lib.draw(mix, key, n)), 0.01))


def knn_entropy(x, k: int = 5) -> float:
    """Kozachenko–Leonenko entropy estimate in 2-D: ψ(N) − ψ(k) + ln π + (2/N) Σ ln ε_i."""
    n = len(x)
    eps = cKDTree(x).query(x, k + 1)[0][:, k]
    return float(digamma(n) - digamma(k) + math.log(math.pi) + 2 * np.mean(np.log(np.maximum(eps, 1e-30))))


@jax.jit
def _mmd2(x, y, bandwidths):
    def kmean(a, b, same):
        d2 = jnp.sum(jnp.square(a[:, None] - b[None]), axis=-1)
        k = jnp.exp(-d2[None] / (2 * jnp.square(bandwidths))[:, None, None])
        n = a.shape[0]
        return (k.sum(axis=(1, 2)) - same * n) / (n * (n - same))
    return kmean(x, x, 1) + kmean(y, y, 1) - 2 * kmean(x, y, 0)


def mmd2(x, y, bandwidths=(0.02, 0.1)):
    """Unbiased MMD² with Gaussian kernels exp(−|x−y|²/2h²), one value per bandwidth h."""
    return np.asarray(_mmd2(jnp.asarray(x), jnp.asarray(y), jnp.asarray(bandwidths, jnp.float32)))


def sliced_wasserstein(x, y, key, num_directions: int = 256) -> float:
    """sqrt of the mean over random directions of W2² between the 1-D projections (equal sizes)."""
    n = min(len(x), len(y))
    angles = np.asarray(jax.random.uniform(key, (num_directions,), jnp.float32, 0, 2 * np.pi))
    dirs = np.stack([np.cos(angles), np.sin(angles)])
    px = np.sort(np.asarray(x[:n], np.float32) @ dirs, axis=0)
    py = np.sort(np.asarray(y[:n], np.float32) @ dirs, axis=0)
    return float(np.sqrt(np.mean(np.square(px - py))))


@jax.jit
def _density_terms(x):
    mix_a, mix_b = mixture_lib.mixture('A'), mixture_lib.mixture('B')
    return (mixture_lib.log_prob(mix_a, x), mixture_lib.log_prob(mix_b, x),
            mixture_lib.nearest_mean_distance(mix_a, x), mixture_lib.responsible_component(mix_a, x))


def evaluate(samples, reference, *, tau: float, key, mmd_subsample: int = 4096) -> dict[str, float]:
    """All metrics of `samples` [N, 2] against exact class-A `reference` samples [M, 2]."""
    x = np.asarray(samples, np.float32)
    ref = np.asarray(reference, np.float32)
    if x.ndim != 2 or x.shape[1] != 2 or ref.ndim != 2 or ref.shape[1] != 2:
        raise ValueError(f'samples and reference must be [N, 2], got {x.shape} and {ref.shape}')
    finite = np.all(np.isfinite(x), axis=1)
    if not finite.all():  # non-finite samples count as far escapes
        x = np.where(finite[:, None], x, 1e6)
    logp_a, logp_b, nearest, comp = (np.asarray(a) for a in _density_terms(jnp.asarray(x)))
    mix = mixture_lib.mixture('A')
    weights = np.asarray(mix.weights, np.float64)
    num_branches = int(mix.branch.max()) + 1
    m = np.bincount(mix.branch, weights=weights, minlength=num_branches)
    q = np.bincount(mix.branch[comp], minlength=num_branches) / len(x)
    leaves = np.unique(mix.branch[mix.depth == LEAF_DEPTH])
    clip_mean = float(np.mean(np.maximum(logp_a, LOGP_CLIP)))
    k_mmd, k_swd = jax.random.split(key)
    n_sub = min(mmd_subsample, len(x), len(ref))
    ia = jax.random.permutation(k_mmd, len(x))[:n_sub]
    ib = jax.random.permutation(jax.random.fold_in(k_mmd, 1), len(ref))[:n_sub]
    mmd = mmd2(x[np.asarray(ia)], ref[np.asarray(ib)])
    return {
        'logp_median': float(np.median(logp_a)),
        'logp_clip_mean': clip_mean,
        'outlier': float(np.mean(logp_a < tau)),
        'outlier_fig': float(np.mean(logp_a < FIGURE_THRESHOLD)),
        'far': float(np.mean(logp_a < FAR_THRESHOLD)),
        'escape': float(np.mean(nearest > ESCAPE_DISTANCE)),
        'wrong_class': float(np.mean(logp_b > logp_a)),
        'branch_tv': float(0.5 * np.abs(q - m).sum()),
        'leaf_recall': float(np.mean(q[leaves] >= 0.5 * m[leaves])),
        'leaf_recall_25': float(np.mean(q[leaves] >= 0.25 * m[leaves])),
        'kl_clip': -knn_entropy(x) - clip_mean,
        'mmd_02': float(mmd[0]),
        'mmd_10': float(mmd[1]),
        'swd': sliced_wasserstein(x, ref, k_swd),
        **precision_recall(ref, x),
    }

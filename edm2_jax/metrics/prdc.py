"""k-NN precision and recall (Kynkäänniemi et al. 2019): the one implementation, used by the image
evaluators (detector features) and by the 2-D toy. Argument order everywhere: `(real, fake)`.

Each set's manifold is the union of balls around its points with radius = distance to the point's
k-th nearest neighbour within the set (the point itself excluded; a duplicate counts as a neighbour).
  precision = fraction of fake (generated) points inside the real manifold,
  recall    = fraction of real points inside the fake manifold.
The neighbour search is exact either way: a k-d tree in at most KD_TREE_MAX_DIM dimensions (the toy),
blocked float64 distances on the host above it (O(block · N) memory).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from edm2_jax.errors import UserError

KD_TREE_MAX_DIM = 8


def sq_dists(a, b, block: int | None = None) -> np.ndarray:
    """[len(a), len(b)] squared distances |a_i|² + |b_j|² − 2a_i·b_j (float64), `block` rows of a at a time."""
    if block is not None:
        return np.concatenate([sq_dists(a[s:s + block], b) for s in range(0, len(a), block)])
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def knn_radii(features, k: int, block: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    f = np.asarray(features, np.float64)
    if not 1 <= k < len(f):
        raise UserError(f'k must be in [1, {len(f) - 1}] for {len(f)} points, got {k}', where='k')
    if f.shape[1] <= KD_TREE_MAX_DIM:
        return np.square(cKDTree(f).query(f, k + 1)[0][:, k])
    out = np.empty(len(f))
    for s in range(0, len(f), block):
        d = sq_dists(f[s:s + block], f)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]   # index 0 is the point itself (distance 0)
    return out


def inside(queries, points, radii, block: int = 1024) -> np.ndarray:
    """bool [N]: whether each query lies in at least one ball (points_j, sqrt(radii_j))."""
    queries, points = np.asarray(queries, np.float64), np.asarray(points, np.float64)
    out = np.zeros(len(queries), bool)
    if points.shape[1] <= KD_TREE_MAX_DIM:    # one ball at a time over a tree of the queries
        hits = cKDTree(queries).query_ball_point(points, np.sqrt(radii))
        out[np.concatenate([np.asarray(h, np.int64) for h in hits])] = True
        return out
    for s in range(0, len(queries), block):
        out[s:s + block] = (sq_dists(queries[s:s + block], points) <= radii[None]).any(axis=1)
    return out


def check_features(real, fake) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, D] and [M, D] with the same D, or a UserError."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(f'features must be [N, D] with equal D, got {real.shape} and {fake.shape}',
                        where='real, fake')
    return real, fake


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> dict[str, float]:
    real, fake = check_features(real, fake)
    return {'precision': float(inside(fake, real, knn_radii(real, k, block), block).mean()),
            'recall': float(inside(real, fake, knn_radii(fake, k, block), block).mean())}

"""k-NN precision and recall (Kynkäänniemi et al. 2019) on detector features — a cheap, honest
small-scale companion to the Fréchet distances for CPU work.

Each set's manifold is the union of balls around its points with radius = distance to the point's
k-th nearest neighbour within the set (the point itself excluded).
  precision = fraction of generated points inside the real manifold,
  recall    = fraction of real points inside the generated manifold.
Distances in float64 on the host; O(N·M) memory per `block` rows.
"""
from __future__ import annotations

import numpy as np


def _sq_dists(a, b):
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def knn_radii(features, k: int, block: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    f = np.asarray(features, np.float64)
    if not 1 <= k < len(f):
        raise ValueError(f'k must be in [1, {len(f) - 1}] for {len(f)} points, got {k}')
    out = np.empty(len(f))
    for s in range(0, len(f), block):
        d = _sq_dists(f[s:s + block], f)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]   # index 0 is the point itself (distance 0)
    return out


def _coverage(queries, points, radii, block):
    inside = np.zeros(len(queries), bool)
    for s in range(0, len(queries), block):
        inside[s:s + block] = (_sq_dists(queries[s:s + block], points) <= radii[None]).any(axis=1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> dict[str, float]:
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'features must be [N, D] with equal D, got {real.shape} and {fake.shape}')
    return {'precision': _coverage(fake, real, knn_radii(real, k, block), block),
            'recall': _coverage(real, fake, knn_radii(fake, k, block), block)}

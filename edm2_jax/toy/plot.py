"""Figures for the toy experiment: the Figure-2-style overview (samples over the class regions, and
zoomed trajectories) and the in-situ (w, p) heat-maps. Needs matplotlib."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from edm2_jax import io
from edm2_jax.toy import fractal as mixture_lib

OVERVIEW = ((0.30, 0.30), 1.2)     # (centre, half-size) of the overview panels
ZOOM = ((0.45, 1.22), 0.3)         # the zoom panels


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _grid(view, n):
    (cx, cy), h = view
    xs = np.linspace(cx - h, cx + h, n)
    ys = np.linspace(cy - h, cy + h, n)
    gx, gy = np.meshgrid(xs, ys)
    return gx, gy, np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def _logp_grid(classes, pts, shape):
    return np.asarray(mixture_lib.log_prob(mixture_lib.mixture(classes), jnp.asarray(pts))).reshape(shape)


REGION_STYLE = {'AB': ((0.9, 0.9, 0.9), (0.7, 0.7, 0.7)), 'A': ((1.0, 0.8, 0.6), (0.8, 0.6, 0.5))}


def _region_fields(gx, pts) -> dict:
    """Per class set, −√(grid max of log p − log p): the regions are where it is ≥ −2.12, as in the
    paper's figure (computed once per figure: every panel shares the grid)."""
    out = {}
    for classes in REGION_STYLE:
        v = _logp_grid(classes, pts, gx.shape)
        out[classes] = -np.sqrt(np.maximum(v.max() - v, 0))
    return out


def _regions(ax, gx, gy, fields):
    """A∪B (grey) and A (orange) regions."""
    for classes, (fill, edge) in REGION_STYLE.items():
        ax.contourf(gx, gy, fields[classes], levels=[-2.12, 0], colors=[fill], extend='max')
        ax.contour(gx, gy, fields[classes], levels=[-2.12, 0], colors=[edge], linewidths=1.0)


def _frame(ax, view, title):
    (cx, cy), h = view
    ax.set_xlim(cx - h, cx + h)
    ax.set_ylim(cy - h, cy + h)
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def overview_figure(path, panels, grid: int = 300):
    """panels: list of (title, samples [N, 2], trajectories [S+1, n, 2] or None), drawn left to right:
    samples over the class regions (top), zoomed trajectories over the class-A density (bottom)."""
    plt = _pyplot()
    cols = len(panels)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 7.0), squeeze=False)
    gx, gy, pts = _grid(OVERVIEW, grid)
    zx, zy, zpts = _grid(ZOOM, grid // 2)
    za = _logp_grid('A', zpts, zx.shape)
    fields = _region_fields(gx, pts)
    for j, (title, samples, traj) in enumerate(panels):
        ax = axes[0, j]
        _regions(ax, gx, gy, fields)
        s = np.asarray(samples)
        ax.scatter(s[:, 0], s[:, 1], s=1.0, c='k', alpha=0.25, linewidths=0)
        _frame(ax, OVERVIEW, title)
        ax = axes[1, j]
        ax.contourf(zx, zy, za, levels=np.linspace(-2.5, 3.07, 15)[1:-1], cmap='Oranges', extend='max')
        if traj is not None:
            t = np.asarray(traj)
            ax.plot(t[:, :, 0], t[:, :, 1], c='k', lw=0.8, alpha=0.35)
            ax.scatter(t[0, :, 0], t[0, :, 1], s=4, c='tab:blue', linewidths=0)
            ax.scatter(t[-1, :, 0], t[-1, :, 1], s=5, c='k', linewidths=0)
        _frame(ax, ZOOM, 'trajectories from σ = 0.03')
    fig.tight_layout()
    io.save_figure(path, fig, dpi=110)
    plt.close(fig)


def sweep_figure(path, ps, ws, values: dict[str, np.ndarray], reference: dict[str, float]):
    """One heat-map per metric over the in-situ (p rows, w columns) grid; titles show the value of
    the unguided model (reference) for comparison."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 3.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], values.items()):
        im = ax.imshow(v, origin='lower', cmap='viridis', aspect='auto')
        ax.set_xticks(range(len(ws)), [f'{w:g}' for w in ws])
        ax.set_yticks(range(len(ps)), [f'{p:g}' for p in ps])
        ax.set_xlabel('w')
        ax.set_ylabel('p')
        for i in range(len(ps)):
            for j in range(len(ws)):
                ax.text(j, i, f'{v[i, j]:.3g}', ha='center', va='center', fontsize=7, color='w')
        ax.set_title(f'{name} (no guidance: {reference.get(name, float("nan")):.3g})', fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    io.save_figure(path, fig, dpi=110)
    plt.close(fig)

"""Feature statistics, the Fréchet distance, and EDM2's `dataset-refs` files (edm2-spec §5).

Statistics are accumulated in float64 batch by batch (Σf, Σfᵀf, n), so they can be summed across
batches, devices and hosts before `mu = Σf/n`, `sigma = (Σfᵀf − n·mu·muᵀ)/(n − 1)`.
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg

from edm2_jax.errors import UserError
from edm2_jax.io import write_bytes

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray


@dataclasses.dataclass
class FeatureStats:
    """Running first and second moments of d-dimensional features, in float64."""
    dim: int
    n: int = 0
    total: np.ndarray | None = None
    total_outer: np.ndarray | None = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
            self.total_outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, features) -> FeatureStats:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f'features must have shape [N, {self.dim}], got {f.shape}')
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.total_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Combine statistics gathered elsewhere (another device or host)."""
        if other.dim != self.dim:
            raise ValueError(f'cannot merge statistics of dimension {other.dim} into {self.dim}')
        self.n += other.n
        self.total += other.total
        self.total_outer += other.total_outer
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f'need at least 2 feature vectors for a covariance, got {self.n}')
        mu = self.total / self.n
        sigma = (self.total_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖mu1 − mu2‖² + tr(S1 + S2 − 2·sqrtm(S1·S2)), with scipy's sqrtm and its real part (as EDM2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


# ---------------------------------------------------------------------------------------------------
# EDM2 reference statistics: {'num_images'?, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}.

_NUMPY_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy's array/dtype/scalar reconstructors and nothing else; object dtypes are refused."""

    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f'refusing global {module}.{name} in a reference-statistics file')
        if name == 'dtype':
            def safe_dtype(spec, *args):
                dt = np.dtype(spec)
                if dt.hasobject:
                    raise pickle.UnpicklingError(f'refusing object dtype {spec!r}')
                return np.dtype(spec, *args)
            return safe_dtype
        return getattr(_multiarray if name in ('_reconstruct', 'scalar') else np, name)


def load_refs(path) -> dict:
    """Reads EDM2 `dataset-refs` statistics (.pkl, numpy-only unpickling) or a legacy EDM .npz.

    Every entry must hold a finite real mu [d] and sigma [d, d]; anything else is a UserError naming
    the file and the entry, raised before any distance is computed.
    """
    path = Path(path)
    fix = 'give an EDM2 dataset-refs .pkl or write one with `evaluate --make_ref`'
    if not path.is_file():
        raise UserError('does not exist or is not a file', where=str(path), fix=fix)
    data = path.read_bytes()
    try:
        if path.suffix == '.npz':
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                refs = {'fid': {k: npz[k] for k in npz.files}}
        else:
            refs = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, OSError) as e:
        raise UserError(f'not a valid reference-statistics file ({e})', where=str(path), fix=fix) from None
    if not isinstance(refs, dict):
        raise UserError(f'expected a dict of statistics, got {type(refs).__name__}', where=str(path), fix=fix)
    for metric, stats in refs.items():
        if metric != 'num_images':
            _check_stats(stats, f'{path}: {metric!r}', fix)
    return refs


def _check_stats(stats, where: str, fix: str) -> None:
    if not isinstance(stats, dict) or set(stats) != {'mu', 'sigma'}:
        raise UserError('must hold exactly mu and sigma', where=where, fix=fix)
    mu, sigma = np.asarray(stats['mu']), np.asarray(stats['sigma'])
    for name, a in (('mu', mu), ('sigma', sigma)):
        if a.dtype.kind not in 'fiu':
            raise UserError(f'{name} has dtype {a.dtype}, expected real numbers', where=where, fix=fix)
        if not np.isfinite(a).all():
            raise UserError(f'{name} holds non-finite values', where=where, fix=fix)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise UserError(f'mu {mu.shape} and sigma {sigma.shape}, expected [d] and [d, d]', where=where, fix=fix)


def save_refs(path, refs: dict) -> None:
    """Writes statistics in EDM2's pickle format, atomically."""
    plain = {k: (int(v) if k == 'num_images' else
                 {'mu': np.asarray(v['mu'], np.float64), 'sigma': np.asarray(v['sigma'], np.float64)})
             for k, v in refs.items()}
    write_bytes(path, pickle.dumps(plain))

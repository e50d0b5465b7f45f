"""The study's protocol: what is sampled, on which seeds, and where each result is stored.

Every method is sampled the same way (Heun, `num_steps` steps, requested label = seed mod
label_dim) and scored on the same seed sets: tuning seeds 0 … tune_n − 1 and `report_sets`
disjoint report sets of report_n seeds (REPORT_BASE·k + i, k = 1, 2, …). Each (model, method,
setting, seed set) result is its own JSON file, which makes a study resumable; a report set's
evaluator features lie beside it (row i: the image of the set's seed i, the same for every method),
the data of the bootstrap intervals.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edm2_jax import io

REPORT_BASE = 10 ** 6
METRICS = ('fd_fmnist', 'kid', 'precision', 'recall', 'class_accuracy')


class Scored(NamedTuple):
    """What the study's score callback returns for N images."""
    metrics: dict             # at least the METRICS (None where undefined, e.g. no labels)
    features: np.ndarray      # float32 [N, D]: the evaluator's features, in the images' order


class Protocol(NamedTuple):
    num_steps: int
    tune_n: int
    report_n: int
    report_sets: int
    batch: int
    grid_n: int
    quick: bool = False

    @property
    def chunk(self) -> int:
        """The fixed sampler batch: every call has this shape (padding rows are dropped)."""
        return min(self.batch, self.tune_n, self.report_n)

    def seeds(self, seed_set: str) -> np.ndarray:
        if seed_set == 'tune':
            return np.arange(self.tune_n)
        k = int(seed_set.removeprefix('report'))
        return REPORT_BASE * (k + 1) + np.arange(self.report_n)

    @property
    def report_names(self) -> list[str]:
        return [f'report{k}' for k in range(self.report_sets)]


def check_protocol(p: Protocol):
    if p.num_steps < 1 or p.batch < 1 or p.report_sets < 1:
        raise ValueError('num_steps, batch and report_sets must be >= 1')
    if p.tune_n < 2 or p.report_n < 2:
        raise ValueError('tune_n and report_n must be >= 2 (a covariance needs two images)')
    if p.grid_n % 10 or not 0 < p.grid_n <= p.report_n:
        raise ValueError(f'grid_n must be a positive multiple of 10 and <= report_n, got {p.grid_n}')


# ---------------------------------------------------------------------------------------------------
# Sampling.

def sample_images(net, seeds, kwargs: dict, p: Protocol) -> tuple[np.ndarray, int]:
    """uint8 images [N, R, R, C] for `seeds` (label = seed mod label_dim) with sample(**kwargs), in fixed
    batches of p.chunk (the last padded with further seeds), so every call reuses one compilation.
    Also returns the number of samples that were not finite."""
    import jax
    from edm2_jax import sampling
    from edm2_jax.data import to_uint8
    seeds = np.asarray(seeds, np.int64)
    label_dim = net.config.label_dim
    out, bad = [], 0
    for start in range(0, len(seeds), p.chunk):
        chunk = seeds[start:start + p.chunk]
        n = len(chunk)
        padded = np.concatenate([chunk, chunk[-1] + 1 + np.arange(p.chunk - n)])
        inputs = sampling.network_inputs(net, padded)
        labels = np.eye(label_dim, dtype=np.float32)[padded % label_dim] if label_dim else None
        x = sampling.sample(net, inputs.noise, labels, keys=inputs.keys, num_steps=p.num_steps, **kwargs)
        x = np.asarray(jax.device_get(x))[:n]
        finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
        bad += int((~finite).sum())
        out.append(to_uint8(np.where(finite[:, None, None, None], x, 0.0)))
    return np.concatenate(out), bad


def requested_labels(net, seeds):
    return (np.asarray(seeds) % net.config.label_dim).astype(np.int32) if net.config.label_dim else None


# ---------------------------------------------------------------------------------------------------
# Result files.

def result_path(out: Path, model: str, method: str, sid: str, seed_set: str) -> Path:
    return out / 'runs' / model / method / sid / f'{seed_set}.json'


def features_path(out: Path, model: str, method: str, sid: str, seed_set: str) -> Path:
    return result_path(out, model, method, sid, seed_set).with_name(f'{seed_set}-features.npz')


def write_result(path: Path, obj) -> None:
    """Indented JSON with NaN kept as the JSON literal (not `io.write_json`'s strings): the results
    read back as floats, which a resumed study formats."""
    io.write_text(path, json.dumps(obj, indent=1, allow_nan=True) + '\n')

"""NVIDIA's published EDM2 raw snapshots as a source of post-hoc EMA (edm2-spec §6.1).

A raw-snapshot folder holds one pickle per (training time, tracked σ_rel), named
`<name>-<kimg:07d>-<σ_rel:.3f>.pkl` (kimg = t // 1000 images); each is a training snapshot
{encoder, dataset_kwargs, loss_fn, ema} whose 'ema' is the network averaged with that σ_rel's power
EMA up to t. They are read with the restricted unpickler (`convert.readers.read_pickle`: nothing in
them runs) and combined by `edm2_jax.train_state.reconstruct_phema`, so `experiments.phema` exports
any σ_rel at any snapshot time from them, e.g. a short-EMA or early guide for EDM2-S/XXL.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convert import readers
from convert.edm2 import resolve_config
from convert.torch_names import torch_to_network
from edm2_jax.errors import UserError
from edm2_jax.network import Network
from edm2_jax.train_state import Snapshot

NAME = re.compile(r'^.+-(\d{7})-(\d+\.\d+)\.pkl$')


def images_seen(kimg: int, name: str = '') -> int:
    """t from the file's kimg = t // 1000: the one multiple of 1024 with that kimg (EDM2's snapshot
    times are multiples of 8 Mi images)."""
    t = -(-kimg * 1000 // 1024) * 1024
    if t // 1000 != kimg:
        raise UserError(f'kimg {kimg} matches no multiple of 1024 images', where=name or None,
                        fix='give the unrenamed files of NVIDIA\'s raw snapshots')
    return t


def list_raw_snapshots(folder) -> list[Snapshot]:
    """The raw snapshots in `folder`, sorted by (t, σ_rel), read from the file names."""
    folder = Path(folder)
    found = [(m, p) for p in folder.iterdir() if (m := NAME.match(p.name))] if folder.is_dir() else []
    snaps = [Snapshot(images_seen(int(m[1]), str(p)), float(m[2]), p) for m, p in found]
    return sorted(snaps, key=lambda s: (s.t, s.sigma_rel))


class RawSnapshots:
    """The snapshots of a folder and their loader; `decoder` is that of the last file loaded."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.snapshots = list_raw_snapshots(folder)
        self.decoder = None

    def load(self, path) -> Network:
        """The 'ema' network of one pickle, float32 (what it says about its architecture, checked
        against its tensors)."""
        source = readers.read_pickle(Path(path))
        config = resolve_config({k: v.shape for k, v in source.state_dict.items()}, source.architecture,
                                None, {})
        self.decoder = source.decoder
        return torch_to_network(source.state_dict, config, np.float32, consume=True)

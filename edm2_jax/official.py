"""The official EDM2 code, imported at run time from the user's own clone of NVlabs/edm2 (nothing of
it is copied here), run on the same weights and inputs as edm2-jax: the benchmark's side-by-side.

The official in-situ guide is what the paper runs: the main network in train mode with dropout p in
its blocks (all, or the decoder's), a second pass at every guided evaluation of `edm_sampler`.
Needs torch; the clone brings its own `dnnlib` and `torch_utils`.
"""
from __future__ import annotations

import copy
import importlib
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edm2_jax.errors import UserError

FILES = ('training/networks_edm2.py', 'generate_images.py')


class Official(NamedTuple):
    networks: Any    # training.networks_edm2
    generate: Any    # generate_images (edm_sampler)


def load(path) -> Official:
    """The official modules from a clone at `path` (checked before anything is imported)."""
    root = Path(path).expanduser().resolve()
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise UserError(f'not a clone of the official EDM2 code (missing {", ".join(missing)})',
                        where=str(root), fix='git clone https://github.com/NVlabs/edm2 and give its path')
    sys.path.insert(0, str(root))
    try:
        return Official(importlib.import_module('training.networks_edm2'),
                        importlib.import_module('generate_images'))
    except ImportError as e:
        raise UserError(f'the official code does not import ({e})', where=str(root),
                        fix='install its requirements (torch, click, …) in this environment') from None


def precond(official: Official, net, device='cpu', fp16=False):
    """The official Precond with `net`'s weights (eval mode, no gradients)."""
    import torch
    from convert.torch_names import network_to_torch, precond_kwargs
    kwargs = precond_kwargs(net.config)
    kwargs['use_fp16'] = bool(fp16)
    module = official.networks.Precond(**kwargs)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in network_to_torch(net).items()}
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False).to(device)


def dropout_guide(module, rate: float, blocks: str = 'all'):
    """The paper's in-situ guide: a copy of `module` in train mode with dropout `rate` in its blocks
    ('all' or 'decoder'; the others keep rate 0)."""
    if blocks not in ('all', 'decoder'):
        raise UserError(f"the official side-by-side supports blocks 'all' or 'decoder', got {blocks!r}")
    guide = copy.deepcopy(module)
    for part in ('enc', 'dec'):
        for block in getattr(guide.unet, part).values():
            if hasattr(block, 'dropout'):
                block.dropout = rate if blocks == 'all' or part == 'dec' else 0.0
    return guide.train()


def sample(official: Official, module, noise_nhwc, labels=None, *, guide=None, guidance=1.0, num_steps=32,
           device='cpu'):
    """edm_sampler's images (NHWC numpy) from the same unit-variance noise as edm2-jax."""
    import torch
    noise = torch.from_numpy(np.ascontiguousarray(np.asarray(noise_nhwc, np.float32).transpose(0, 3, 1, 2)))
    labels = None if labels is None else torch.from_numpy(np.asarray(labels, np.float32))
    with torch.no_grad():
        x = official.generate.edm_sampler(module, noise.to(device), None if labels is None else labels.to(device),
                                          gnet=guide, num_steps=num_steps, guidance=guidance)
    return x.float().cpu().numpy().transpose(0, 2, 3, 1)


def time_sample(official: Official, module, noise, labels, *, guide=None, guidance=1.0, num_steps=32,
                repeats=3, device='cpu') -> dict:
    """Seconds per image (median of `repeats` after a warm-up) of the official sampler."""
    import torch

    def run():
        out = sample(official, module, noise, labels, guide=guide, guidance=guidance, num_steps=num_steps,
                     device=device)
        if device != 'cpu':
            torch.cuda.synchronize()
        return out
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    n = np.asarray(noise).shape[0]
    return {'sec_per_image': float(np.median(times)) / n, 'sec_per_image_min': min(times) / n,
            'torch': torch.__version__, 'threads': torch.get_num_threads(), 'device': str(device)}

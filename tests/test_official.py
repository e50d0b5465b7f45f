"""The benchmark's side-by-side with the official code (edm2_jax.official), on a stand-in clone.

The official code is not part of this repository (nor on the test machine), so these tests check the
plumbing on a stand-in with the official layout and call signatures: the modules are imported from
the given path, the weights load strictly under the official names (the names themselves are checked
against the official state_dict in test_torch_names.py), the paper's in-situ guide is a train-mode
copy with dropout in the chosen blocks, and edm_sampler gets the same noise, labels and settings.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edm2_jax import EDM2Config
from edm2_jax.errors import UserError
from helpers import random_network

ROOT = Path(__file__).resolve().parents[1]
CONFIG = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=())

NETWORKS = '''
"""Stand-in for training/networks_edm2.py: parameters under the official names, a trivial forward."""
import torch
from convert.torch_names import torch_shapes
from edm2_jax.config import EDM2Config

BUFFERS = ('freqs', 'phases')


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = 0.0


class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, dropout=0.0, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs, img_resolution=img_resolution, img_channels=img_channels,
                           label_dim=label_dim, use_fp16=use_fp16, dropout=dropout)
        config = EDM2Config(img_resolution, img_channels, label_dim, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
        for name, shape in torch_shapes(config).items():
            *path, leaf = name.split('.')
            module = self
            for depth, part in enumerate(path):
                if not hasattr(module, part):
                    kind = torch.nn.ModuleDict if part in ('enc', 'dec') else \\
                        Block if depth == 2 and path[1] in ('enc', 'dec') else torch.nn.Module
                    module.add_module(part, kind())
                module = getattr(module, part)
            if leaf in BUFFERS:
                module.register_buffer(leaf, torch.zeros(shape))
            else:
                module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))

    def forward(self, x, sigma, class_labels=None):
        return x * 0.5
'''

GENERATE = '''
"""Stand-in for generate_images.py: records each call of edm_sampler."""
CALLS = []


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, **kwargs):
    dropouts = None if gnet is None or not hasattr(gnet, 'unet') else {
        part: sorted({b.dropout for b in getattr(gnet.unet, part).values()}) for part in ('enc', 'dec')}
    CALLS.append(dict(net_training=net.training, gnet_training=None if gnet is None else gnet.training,
                      dropouts=dropouts, guidance=guidance, num_steps=num_steps, shape=tuple(noise.shape),
                      labels=None if labels is None else labels.numpy().copy()))
    return noise * 2
'''


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp('edm2-clone')
    (root / 'training').mkdir()
    (root / 'training' / '__init__.py').write_text('')
    (root / 'training' / 'networks_edm2.py').write_text(textwrap.dedent(NETWORKS))
    (root / 'generate_images.py').write_text(textwrap.dedent(GENERATE))
    return root


def test_side_by_side_plumbing(clone):
    from edm2_jax import official
    mod = official.load(clone)
    net = random_network(CONFIG, seed=0)
    main = official.precond(mod, net)  # strict load: every official name present, none extra
    assert mod.networks.__file__.startswith(str(clone)) and not main.training
    assert main.kwargs['model_channels'] == 8 and main.kwargs['channel_mult'] == [1, 2]
    guide = official.dropout_guide(main, 0.1, 'decoder')
    assert guide.training and not main.training
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 2]]
    out = official.sample(mod, main, noise, labels, guide=guide, guidance=1.7, num_steps=3)
    np.testing.assert_allclose(out, 2 * noise)  # NHWC → NCHW → NHWC, the stand-in doubles
    call = mod.generate.CALLS[-1]
    assert call['dropouts'] == {'enc': [0.0], 'dec': [0.1]} and call['gnet_training'] is True
    assert call['guidance'] == 1.7 and call['num_steps'] == 3 and call['shape'] == (2, 2, 8, 8)
    np.testing.assert_array_equal(call['labels'], labels)
    timing = official.time_sample(mod, main, noise, labels, guide=official.dropout_guide(main, 0.2, 'all'),
                                  guidance=2.0, num_steps=2, repeats=2)
    assert timing['sec_per_image'] > 0 and mod.generate.CALLS[-1]['dropouts'] == {'enc': [0.2], 'dec': [0.2]}


def test_not_a_clone_is_one_clear_error(tmp_path):
    from edm2_jax import official
    with pytest.raises(UserError, match='not a clone of the official EDM2 code'):
        official.load(tmp_path)


@pytest.mark.slow
def test_benchmark_reports_the_speedup(clone, tmp_path):
    out = tmp_path / 'bench.json'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    proc = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--resolution=8', '--img_channels=2',
                           '--channels=8', '--channel_mult=1,2', '--num_blocks=1', '--attn_resolutions=',
                           '--label_dim=3', '--batch=2', '--steps=2', '--repeats=1',
                           '--methods=none,insitu-decoder-prefix,autoguidance', f'--vs_official={clone}',
                           f'--out={out}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())['results']
    for r in rows:
        ours, theirs = r['sec_per_image'], r['official']['sec_per_image']
        assert r['speedup_vs_official'] == pytest.approx(theirs / ours)
    assert 'faster' in proc.stdout

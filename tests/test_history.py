"""Self-guidance from the training history ('history'): the guide is the same run's network at a short
EMA or an early snapshot, exported by experiments.phema from the run's own snapshots or from NVIDIA's
raw-snapshot pickles (synthetic files in NVIDIA's layout, read by the restricted unpickler); sampling
with it works from both sources."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import raw_snapshots
from convert.torch_names import network_to_torch, precond_kwargs
from edm2_jax import EDM2Config, checkpoint, ema, train_state
from edm2_jax import methods as M
from edm2_jax import sampling as S
from edm2_jax.ema import PowerEMA
from edm2_jax.errors import UserError
from edm2_jax.training import EDM2State, TrainConfig
from edm2_pickle_fixture import write_edm2_pickle
from experiments import phema
from helpers import random_network

NET = EDM2Config(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(), channels_per_head=8, logvar_channels=8)
STDS = (0.05, 0.10)
MI8 = 8 << 20  # NVIDIA's snapshot interval (8 Mi images)


def params_of(seed):
    return jax.tree.map(np.asarray, random_network(NET, seed).variables)


def settings(src, out, std, time=None):
    return phema.resolve_settings(types.SimpleNamespace(**{'in': str(src), 'std': [str(std)], 'time': time,
                                                           'out': str(out), 'overwrite': False}))


def sample_with(guide_dir):
    """Guided samples of a random main network with the exported guide, and the unguided ones."""
    main = random_network(NET, 99)
    guide = checkpoint.load(guide_dir)
    inputs = S.network_inputs(main, np.arange(3))
    run = lambda terms: np.asarray(S.sample(main, inputs.noise, inputs.class_labels, terms=terms,  # noqa: E731
                                            num_steps=3))
    return run(M.terms('history', 1.0, guide=guide)), run(())


def assert_guides(guided, unguided):
    assert np.all(np.isfinite(guided)) and np.abs(guided - unguided).max() > 1e-3


def leaves(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------------------
# The run's own snapshots.

def test_history_guide_from_a_runs_snapshots(tmp_path):
    """Snapshots at t = 16, 32, 64 images (random EMA weights per profile); the guide at an early time
    with a tracked σ_rel is that snapshot's weights (the least-squares weights are a unit vector)."""
    cfg = TrainConfig(NET, batch_size=8, duration=64, ema_sigma_rels=STDS)
    variables = {(t, s): params_of(10 * t + k) for t in (16, 32, 64) for k, s in enumerate(STDS)}
    for t in (16, 32, 64):
        base = variables[(t, STDS[0])]
        state = EDM2State(cfg, jnp.int32(t // 8), base['params'], base['buffers'], None,
                          PowerEMA(STDS, tuple(variables[(t, s)]['params'] for s in STDS)))
        train_state.save_snapshot(tmp_path, state)
    out = tmp_path / 'guides'
    early = phema.reconstruct(settings(tmp_path, out, 0.05, time=16))[0.05]
    guide = checkpoint.load(early)
    assert checkpoint.read_meta(early)['source']['images_seen'] == 16
    for a, b in zip(leaves(guide.variables['params']), leaves(variables[(16, 0.05)]['params'])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    short = phema.reconstruct(settings(tmp_path, out, 0.03))[0.03]  # a shorter EMA than tracked
    assert_guides(*sample_with(short))
    assert_guides(*sample_with(early))


# ---------------------------------------------------------------------------------------------------
# NVIDIA's raw snapshots.

@pytest.fixture(scope='module')
def raw(tmp_path_factory):
    """A folder of synthetic raw snapshots at t = 8, 16, 24 Mi images, σ_rel 0.050 and 0.100, named
    as NVIDIA names them (kimg = t // 1000), holding float16 networks in the snapshot pickle layout."""
    d = tmp_path_factory.mktemp('raw')
    nets = {}
    for i, t in enumerate((MI8, 2 * MI8, 3 * MI8)):
        for k, s in enumerate(STDS):
            net = random_network(NET.replace(dropout=0.0), 10 * i + k)
            nets[(t, s)] = net
            write_edm2_pickle(d / f'edm2-img8-test-{t // 1000:07d}-{s:.3f}.pkl', network_to_torch(net),
                              precond_kwargs(net.config), encoder='rgb')
    (d / 'notes.txt').write_text('not a snapshot')
    return d, nets


def test_raw_snapshot_names_give_the_images_seen(raw):
    d, nets = raw
    snaps = raw_snapshots.list_raw_snapshots(d)
    assert [(s.t, s.sigma_rel) for s in snaps] == sorted(nets)
    assert raw_snapshots.images_seen(8388) == MI8 and raw_snapshots.images_seen(2147483) == 2048 * MI8 // 8
    with pytest.raises(UserError, match='no multiple of 1024'):
        raw_snapshots.images_seen(1023)


def test_history_guide_from_nvidia_raw_snapshots(raw, tmp_path):
    d, nets = raw
    f16 = lambda net: [np.asarray(a, np.float16).astype(np.float64)  # noqa: E731 (what the files hold)
                       for a in jax.tree.leaves(net.variables['params'])]
    # At the first snapshot time with a tracked σ_rel: that file's network.
    early = phema.reconstruct(settings(d, tmp_path, 0.05, time=MI8))[0.05]
    meta = checkpoint.read_meta(early)
    assert meta['source']['images_seen'] == MI8 and meta['decoder']['type'] == 'rgb'
    guide = checkpoint.load(early)
    assert guide.config == NET.replace(dropout=0.0)
    for a, b in zip(leaves(guide.variables['params']), f16(nets[(MI8, 0.05)])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # A short EMA at the last time: Σ x_i θ_i over all six files, x the post-hoc weights, summed in NumPy.
    short = phema.reconstruct(settings(d, tmp_path, 0.03))[0.03]
    keys = sorted(nets)
    x = ema.posthoc_coefficients([t for t, _ in keys], [s for _, s in keys], 3 * MI8, [0.03])[:, 0]
    expected = [sum(xi * a for xi, a in zip(x, group)) for group in zip(*(f16(nets[k]) for k in keys))]
    for a, b in zip(leaves(checkpoint.load(short).variables['params']), expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))
    assert_guides(*sample_with(short))
    with pytest.raises(ValueError, match='snapshot time'):
        phema.reconstruct(settings(d, tmp_path / 'x', 0.05, time=MI8 + 1024))

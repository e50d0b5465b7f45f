"""experiments.train / experiments.phema and the training presets: the CLI end to end on a tiny
configuration (log, loss curve, exported networks loadable by checkpoint.load, done.json), kill and
resume giving the uninterrupted run's weights bit for bit, refusal of a run directory of another
configuration, the post-hoc EMA CLI, and the preset table against edm2-spec §2.1."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from edm2_jax import EDM2Config, checkpoint, train_state
from edm2_jax.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# 8×8 gray images with 3 classes; 10 steps of 8 images, a state every 3 steps, a snapshot every 2.
TINY = TrainConfig(
    network=EDM2Config(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=(1, 2),
                       num_blocks=1, attn_resolutions=(), channels_per_head=8, logvar_channels=8),
    batch_size=8, duration=80, lr_ref=0.01, lr_decay_images=40, lr_warmup_images=0, p_mean=-0.8, p_std=1.6,
    snapshot_every=16, checkpoint_every=24, seed=3)


def _env():
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
    env['PYTHONPATH'] = str(ROOT)
    return env


def _cli(module, *args):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('train_cli')
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 3
    images = np.clip(rng.normal(60 + 60 * labels[:, None, None, None], 30, (40, 8, 8, 1)), 0, 255).astype(np.uint8)
    np.savez(d / 'tiny.npz', images=images, labels=labels)
    (d / 'tiny.json').write_text(json.dumps(TINY.to_dict()))
    return d


def _settings(files, run_dir, **flags):
    from experiments import train
    f = dict(preset=None, config=str(files / 'tiny.json'), run_dir=str(run_dir), data=str(files / 'tiny.npz'),
             duration=None, batch=None, lr=None, seed=None, export_std=None, log_every=2, devices=None,
             stop_after_steps=None, stop_kind='kill', progress=False)
    f.update(flags)
    return train.resolve_settings(types.SimpleNamespace(**f))


def _final_state(run_dir):
    from edm2_jax.training import abstract_train_state
    state, _ = train_state.latest_state(run_dir, abstract_train_state(TINY))
    return jax.tree.leaves(jax.device_get(state))


def _assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def cli_run(files):
    """The whole CLI once, uninterrupted, as a subprocess."""
    run = files / 'cli'
    r = _cli('experiments.train', f'--config={files / "tiny.json"}', f'--data={files / "tiny.npz"}',
             f'--run_dir={run}', '--log_every=2', '--progress=false', '--export_std=0.05,0.10')
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_cli_end_to_end(cli_run):
    log = [json.loads(line) for line in (cli_run / 'training_log.jsonl').read_text().splitlines()]
    assert [rec['step'] for rec in log] == [2, 4, 6, 8, 10]
    assert [rec['images'] for rec in log] == [16, 32, 48, 64, 80]
    assert all(np.isfinite(rec['loss']) and rec['images_per_s'] > 0 for rec in log)
    # lr(t) = 0.01 / sqrt(max(t / 40, 1)) at t = images seen before the logged step (no warm-up).
    np.testing.assert_allclose([rec['lr'] for rec in log], [0.01 / np.sqrt(max(t / 40, 1)) for t in (8, 24, 40, 56, 72)],
                               rtol=1e-6)
    assert (cli_run / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    done = json.loads((cli_run / 'done.json').read_text())
    assert done['steps'] == 10 and done['images'] == 80
    assert sorted(done['networks']) == ['0.050', '0.100']
    assert sorted(s.t for s in train_state.list_snapshots(cli_run)) == sorted([16, 32, 48, 64, 80] * 2)
    for std in ('0.050', '0.100'):
        net = checkpoint.load(cli_run / f'network-{std}')
        assert net.config == TINY.network
        x = np.zeros((2, 8, 8, 1), np.float32)
        assert np.isfinite(np.asarray(net(x, np.ones(2), np.eye(3, dtype=np.float32)[:2]))).all()
    # The exports are the post-hoc EMA at the last snapshot time; σ_rel 0.05 and 0.10 being the tracked
    # profiles, that reconstruction is the EMA the run tracked itself (an independent computation).
    from edm2_jax.training import abstract_train_state
    state, _ = train_state.latest_state(cli_run, abstract_train_state(TINY))
    assert int(state.images_seen) == 80
    recon = train_state.reconstruct_phema(cli_run, [0.05, 0.10])
    exported = {s: jax.tree.leaves(checkpoint.load(cli_run / f'network-{s:.3f}').variables['params'])
                for s in (0.05, 0.10)}
    for s, leaves in exported.items():
        _assert_identical(leaves, jax.tree.leaves(recon[s].variables['params']))
        tracked = jax.tree.leaves(jax.device_get(state.ema.get(s)))
        assert len(tracked) == len(leaves)
        for a, b in zip(leaves, tracked):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(*exported.values())) > 1e-4
    # A finished run is not trained again.
    from experiments import train
    assert train.train(_settings(cli_run.parent, cli_run)) == done


@pytest.mark.slow
def test_kill_and_resume_match_uninterrupted(files, cli_run):
    from experiments import train
    whole = files / 'whole'
    assert train.train(_settings(files, whole))['steps'] == 10
    reference = _final_state(whole)
    # The CLI subprocess compiles with its own XLA flags (not the suite's optimisation level 0): equal up to
    # float32 rounding only.
    for x, y in zip(reference, _final_state(cli_run)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)

    killed = files / 'killed'
    assert train.train(_settings(files, killed, stop_after_steps=5)) == {'stopped': 5}
    assert sorted(p.name for p in killed.glob('state-*')) == ['state-000000003']  # nothing saved at the kill
    assert not (killed / 'done.json').exists()
    assert train.train(_settings(files, killed))['steps'] == 10
    _assert_identical(reference, _final_state(killed))
    steps = [json.loads(line)['step'] for line in (killed / 'training_log.jsonl').read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]  # lines past the resumed state were dropped, not duplicated

    saved = files / 'saved'
    assert train.train(_settings(files, saved, stop_after_steps=5, stop_kind='save')) == {'stopped': 5}
    assert 'state-000000005' in {p.name for p in saved.glob('state-*')}
    train.train(_settings(files, saved))
    _assert_identical(reference, _final_state(saved))
    for run in (killed, saved):
        a, b = checkpoint.load_variables(whole / 'network-0.100')[0], checkpoint.load_variables(run / 'network-0.100')[0]
        _assert_identical(jax.tree.leaves(a), jax.tree.leaves(b))


@pytest.mark.slow
def test_other_configuration_is_refused(files, cli_run):
    from experiments import train
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cli_run.rglob('*'))
    for flags, what in (({'lr': 0.02}, 'lr_ref'), ({'seed': 4}, 'seed'), ({'data': 'fashion-mnist'}, 'data')):
        with pytest.raises(ValueError, match=f'different configuration.*{what}'):
            train.train(_settings(files, cli_run, **flags))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cli_run.rglob('*')) == before
    r = _cli('experiments.train', f'--config={files / "tiny.json"}', f'--data={files / "tiny.npz"}',
             f'--run_dir={cli_run}', '--batch=16', '--progress=false')
    assert r.returncode != 0 and 'different configuration' in r.stderr and 'batch_size' in r.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cli_run.rglob('*')) == before
    with pytest.raises(ValueError, match='exactly one of --preset and --config'):
        _settings(files, cli_run, preset='fmnist-main')
    with pytest.raises(ValueError, match='sigma_rel'):
        _settings(files, cli_run, export_std=['0.5'])


@pytest.mark.slow
def test_phema_cli(files, cli_run):
    out = files / 'phema'
    r = _cli('experiments.phema', f'--in={cli_run}', '--std=0.1,0.07', f'--out={out}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['network-0.070', 'network-0.100']
    # The same reconstruction as the training run's own export.
    a, b = checkpoint.load_variables(out / 'network-0.100')[0], checkpoint.load_variables(cli_run / 'network-0.100')[0]
    _assert_identical(jax.tree.leaves(a), jax.tree.leaves(b))
    net = checkpoint.load(out / 'network-0.070')
    assert net.config == TINY.network
    # σ_rel 0.07 lies between the tracked 0.05 and 0.10: its weights differ from both.
    c = checkpoint.load_variables(cli_run / 'network-0.050')[0]
    w = lambda v: np.asarray(v['params']['unet']['out_conv']['weight'])  # noqa: E731
    assert not np.array_equal(w(net.variables), w(b)) and not np.array_equal(w(net.variables), w(c))
    # In-process (saves interpreter start-ups): at an earlier snapshot time; clear errors before any write.
    from experiments import phema

    def settings(run=cli_run, std=('0.1',), time=None, dst=out):
        return phema.resolve_settings(types.SimpleNamespace(**{'in': str(run), 'std': list(std), 'time': time,
                                                                'out': str(dst), 'overwrite': False}))
    written = phema.reconstruct(settings(time=48))
    assert checkpoint.read_meta(written[0.1])['source']['images_seen'] == 48
    assert written[0.1].name == 'network-000000000048-0.100'
    for kwargs, msg in (({}, 'exist'), ({'std': ('0.9',), 'dst': out / 'x'}, 'sigma_rel'),
                        ({'std': ('0.1', '0.100')}, 'twice')):
        with pytest.raises(ValueError, match=msg):
            settings(**kwargs)
    with pytest.raises(ValueError, match='snapshot time'):
        phema.reconstruct(settings(time=50, dst=out / 'y'))
    with pytest.raises(ValueError, match='no EMA snapshots'):
        phema.reconstruct(settings(run=files, dst=out / 'z'))
    assert sorted(p.name for p in out.iterdir()) == ['network-0.070', 'network-0.100', 'network-000000000048-0.100']


# ---------------------------------------------------------------------------------------------------
# Presets.

# edm2-spec §2.1, typed from the table: channels, dropout, lr, decay (batches), duration (Mi images).
SPEC_21 = {
    'img512-xxs': (64, 0.00, 0.0170, 70000, 2048), 'img512-xs': (128, 0.00, 0.0120, 70000, 2048),
    'img512-s': (192, 0.00, 0.0100, 70000, 2048), 'img512-m': (256, 0.10, 0.0090, 70000, 2048),
    'img512-l': (320, 0.10, 0.0080, 70000, 1792), 'img512-xl': (384, 0.10, 0.0070, 70000, 1280),
    'img512-xxl': (448, 0.10, 0.0065, 70000, 896), 'img64-xs': (128, 0.00, 0.0120, 35000, 1024),
    'img64-s': (192, 0.00, 0.0100, 35000, 1024), 'img64-m': (256, 0.10, 0.0090, 35000, 2048),
    'img64-l': (320, 0.10, 0.0080, 35000, 1024), 'img64-xl': (384, 0.10, 0.0070, 35000, 640),
}


def test_imagenet_presets_match_spec():
    from edm2_jax.train_presets import TRAIN_PRESETS
    for name, (channels, dropout, lr, decay, mi) in SPEC_21.items():
        for variant in (name, name + '-uncond'):
            if variant not in TRAIN_PRESETS:
                assert variant.endswith('-uncond') and variant.startswith('img64'), variant
                continue
            c = TRAIN_PRESETS[variant]
            assert (c.network.model_channels, c.dropout, c.network.dropout, c.lr_ref) == (channels, dropout, dropout, lr), variant
            assert (c.batch_size, c.lr_decay_images, c.duration, c.lr_warmup_images) == (2048, decay * 2048, mi << 20, 10_000_000)
            pixel = name.startswith('img64')
            assert (c.p_mean, c.p_std) == ((-0.8, 1.6) if pixel else (-0.4, 1.0))
            assert (c.network.img_resolution, c.network.img_channels) == (64, 3 if pixel else 4)
            assert c.network.label_dim == (0 if variant.endswith('-uncond') else 1000)
            assert c.network.channel_mult == (1, 2, 3, 4) and c.network.num_blocks == 3
            assert c.snapshot_every == 8 << 20 and c.ema_sigma_rels == (0.05, 0.10)


def test_fmnist_presets():
    from edm2_jax.config import block_specs
    from edm2_jax.train_presets import EXPORT_SIGMA_RELS, PRESET_DATA, TRAIN_PRESETS
    main = TRAIN_PRESETS['fmnist-main']
    drop, guide, uncond = (TRAIN_PRESETS[f'fmnist-{n}'] for n in ('main-drop', 'guide', 'uncond'))
    assert main.network.label_dim == drop.network.label_dim == guide.network.label_dim == 10
    assert uncond.network.label_dim == 0
    assert main.dropout == 0 and drop.dropout == 0.1 and drop.trained_network.dropout == 0.1
    assert drop.replace(dropout=0.0, network=drop.network.replace(dropout=0.0)) == main
    assert uncond.replace(network=uncond.network.replace(label_dim=10)) == main
    assert guide.network.model_channels < main.network.model_channels and guide.duration < main.duration
    for name in ('fmnist-main', 'fmnist-main-drop', 'fmnist-guide', 'fmnist-uncond'):
        c = TRAIN_PRESETS[name]
        assert c.network.img_channels == 1 and c.network.img_resolution in (16, 32)
        assert PRESET_DATA[name] == 'fashion-mnist' and EXPORT_SIGMA_RELS[name]
        assert (c.p_mean, c.p_std, c.network.sigma_data) == (-0.8, 1.6, 0.5)
        assert c.snapshot_every <= c.duration // 8 and c.checkpoint_every <= c.duration // 4
        assert block_specs(c.network)

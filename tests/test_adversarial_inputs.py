"""Every bad input gets one clear error naming the file, field or flag — before expensive work, with
nothing half-written. Each case crafts its own damaged input (checkpoints, reference statistics, image
folders, training data and configs, diverged states)."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from edm2_jax import checkpoint, io, train_state, training
from edm2_jax import data as D
from edm2_jax.config import EDM2Config
from edm2_jax.errors import UserError
from edm2_jax.metrics.frechet import load_refs
from experiments import evaluate

ROOT = Path(__file__).resolve().parents[1]
NET = EDM2Config(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(), channels_per_head=8, logvar_channels=8)
TINY = training.TrainConfig(network=NET, batch_size=4, duration=16, lr_warmup_images=0, snapshot_every=8,
                            checkpoint_every=8)


def _one_line(error) -> str:
    text = str(error.value)
    assert '\n' not in text
    return text


# ---------------------------------------------------------------------------------------------------
# Converted checkpoints.

@pytest.fixture(scope='module')
def stored(tmp_path_factory):
    """A generic checkpoint with two arrays (large enough that each has its own data file)."""
    path = tmp_path_factory.mktemp('ckpt') / 'good'
    tree = {'a': np.arange(600.0).reshape(20, 30), 'b': {'c': np.ones(4000, np.float32)}}
    checkpoint.save_variables(path, tree, {'format': 'generic'})
    return path


def _copy(stored, tmp_path) -> Path:
    dst = tmp_path / 'ckpt'
    shutil.copytree(stored, dst)
    return dst


def _largest_data_file(path: Path) -> Path:
    return max((p for p in (path / 'variables').rglob('*') if p.is_file() and p.parent.name == 'd'
                and 'ocdbt.process' in str(p)), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage, message', [
    (lambda p: _largest_data_file(p).unlink(), r'variables: an array cannot be read'),
    (lambda p: _largest_data_file(p).write_bytes(_largest_data_file(p).read_bytes()[:7]),
     r'variables: an array cannot be read'),
    (lambda p: (p / 'variables' / '_METADATA').unlink(), r'variables/_METADATA: is missing'),
    (lambda p: (p / 'variables' / '_METADATA').write_text('{"tree_metadata": {"a'),
     r'variables/_METADATA: is not valid JSON'),
    (lambda p: [shutil.rmtree(p / 'variables'), (p / 'variables').mkdir()], r'variables/_METADATA: is missing'),
    (lambda p: (p / 'variables' / 'manifest.ocdbt').unlink(), r'variables: orbax cannot read the stored tree'),
    (lambda p: (p / 'config.json').write_text('{"format": '), r'config.json: is not valid JSON'),
    (lambda p: (p / 'config.json').write_text('[1, 2]'), r'config.json: holds a list'),
    (lambda p: (p / 'config.json').unlink(), r'not a checkpoint directory'),
])
def test_damaged_checkpoint_names_the_file(stored, tmp_path, damage, message):
    path = _copy(stored, tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message) as e:
        checkpoint.load_variables(path)
    assert str(path) in _one_line(e) and 'convert or save the checkpoint again' in str(e.value) or \
        'not a checkpoint directory' in message


@pytest.mark.parametrize('edit, message', [
    (lambda m: m['config'].update(img_resolution='8'), r"config.img_resolution: must be int, got '8'"),
    (lambda m: m['config'].update(channel_mult=[1, 'x']), r'config.channel_mult: must be a list of int'),
    (lambda m: m['config'].update(nonsense=1), r"unknown EDM2Config fields: \['nonsense'\]"),
    (lambda m: m['config'].pop('img_channels'), r"missing required fields \['img_channels'\]"),
    (lambda m: m.pop('config'), r'"config" must be an object'),
    (lambda m: m.update(decoder='rgb'), r'decoder must be null or an object'),
    (lambda m: m.update(format='other'), r"format is 'other'"),
])
def test_bad_network_config_names_the_field(stored, tmp_path, edit, message):
    path = _copy(stored, tmp_path)
    meta = {'format': checkpoint.FORMAT, 'config': NET.to_dict(), 'decoder': {'type': 'rgb'}}
    edit(meta)
    (path / 'config.json').write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message) as e:
        checkpoint.load(path)
    assert f'{path / "config.json"}:' in _one_line(e)


# ---------------------------------------------------------------------------------------------------
# Reference statistics.

def _refs(mu, sigma):
    return {'num_images': 10, 'fid': {'mu': mu, 'sigma': sigma}}


@pytest.mark.parametrize('refs, message', [
    (_refs([1.0, None], np.eye(2)), r"'fid': mu has dtype object"),
    (_refs(np.zeros(2), [[1.0, 'a'], [0.0, 1.0]]), r"'fid': sigma has dtype <U"),
    (_refs(np.zeros(3), np.eye(2)), r"'fid': mu \(3,\) and sigma \(2, 2\)"),
    (_refs(np.zeros((2, 2)), np.eye(2)), r"'fid': mu \(2, 2\)"),
    (_refs(np.array([0.0, np.nan]), np.eye(2)), r"'fid': mu holds non-finite"),
    (_refs(np.zeros(2), np.full((2, 2), np.inf)), r"'fid': sigma holds non-finite"),
    ({'fid': {'mu': np.zeros(2)}}, r"'fid': must hold exactly mu and sigma"),
    ([1, 2], r'expected a dict of statistics, got list'),
])
def test_bad_reference_statistics(tmp_path, refs, message):
    path = tmp_path / 'refs.pkl'
    path.write_bytes(pickle.dumps(refs))
    with pytest.raises(UserError, match=message) as e:
        load_refs(path)
    assert str(path) in _one_line(e)


def test_unreadable_reference_files(tmp_path):
    good = pickle.dumps(_refs(np.zeros(2), np.eye(2)))
    (tmp_path / 'cut.pkl').write_bytes(good[:len(good) // 2])
    (tmp_path / 'text.npz').write_text('not a zip')
    for name in ('cut.pkl', 'text.npz'):
        with pytest.raises(UserError, match=f'{name}: not a valid reference-statistics file'):
            load_refs(tmp_path / name)
    with pytest.raises(UserError, match='missing.pkl: does not exist'):
        load_refs(tmp_path / 'missing.pkl')


# ---------------------------------------------------------------------------------------------------
# Image folders of the evaluator.

def _png(path: Path, size: int, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _folder(tmp_path, n=6, size=32) -> Path:
    root = tmp_path / 'images'
    for i in range(n):
        _png(root / f'{i:06d}.png', size, 10 * i)
    return root


@pytest.mark.parametrize('damage, message', [
    (lambda root: (root / '000003.png').write_text('this is text, not an image'), r'000003.png: not a readable image'),
    (lambda root: (root / '000002.png').write_bytes(b''), r'000002.png: is empty \(0 bytes\)'),
    (lambda root: (root / '000004.png').write_bytes(os.urandom(300)), r'000004.png: not a readable image'),
    # Different sizes in different batches: FD of mixed features must never be returned.
    (lambda root: _png(root / 'sub' / '999999.png', 64), r'999999.png: is 64x64 but 000000.png is 32x32'),
])
def test_bad_image_folder_is_refused_up_front(tmp_path, damage, message):
    root = _folder(tmp_path)
    damage(root)
    with pytest.raises(UserError, match=message) as e:
        evaluate.ImageSet(root)
    _one_line(e)
    # The whole folder is checked before any detector is loaded (these detectors do not exist).
    with pytest.raises(UserError, match=message):
        evaluate.run(root, tmp_path / 'refs.pkl', ['fid'], tmp_path / 'no-detectors', make_ref=True,
                     num_images=0, batch=2)


def test_truncated_png_names_itself(tmp_path):
    root = _folder(tmp_path)
    whole = (root / '000001.png').read_bytes()
    big = _png(tmp_path / 'big.png', 32)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(big)
    data = big.read_bytes()
    (root / '000001.png').write_bytes(data[:len(data) // 2])  # header intact, pixel data cut
    assert len(whole) > 0
    images = evaluate.ImageSet(root)  # headers are fine
    with pytest.raises(UserError, match=r'000001.png: cannot decode') as e:
        images.get(np.arange(len(images)))
    _one_line(e)


def test_missing_empty_and_too_small_image_sets(tmp_path):
    with pytest.raises(UserError, match=r'--images .*nowhere: does not exist'):
        evaluate.ImageSet(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match=r'empty: no .png files'):
        evaluate.ImageSet(tmp_path / 'empty')
    (tmp_path / 'bad.npz').write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(UserError, match=r'bad.npz: not a readable .npz'):
        evaluate.ImageSet(tmp_path / 'bad.npz')
    root = _folder(tmp_path, n=3)
    with pytest.raises(UserError, match=r'found 3 images, need 10'):
        evaluate.run(root, tmp_path / 'refs.pkl', ['fid'], tmp_path / 'no-detectors', make_ref=True,
                     num_images=10)


# ---------------------------------------------------------------------------------------------------
# Training inputs and states.

def test_corrupt_training_data(tmp_path):
    np.savez(tmp_path / 'good.npz', images=np.zeros((4, 8, 8, 1), np.uint8))
    whole = (tmp_path / 'good.npz').read_bytes()
    (tmp_path / 'cut.npz').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'text.npz').write_text('hello')
    for name in ('cut.npz', 'text.npz'):
        with pytest.raises(UserError, match=f'{name}: not a readable .npz') as e:
            D.load_images(str(tmp_path / name))
        _one_line(e)
    np.savez(tmp_path / 'objects.npz', images=np.array([None, 1], object))
    with pytest.raises(UserError, match='objects.npz: not a readable .npz'):
        D.load_images(str(tmp_path / 'objects.npz'))


@pytest.mark.parametrize('edit, message', [
    (lambda d: d.update(lr_ref='0.01'), r"TrainConfig.lr_ref: must be float, got '0.01' \(str\)"),
    (lambda d: d.update(batch_size=4.5), r'TrainConfig.batch_size: must be int, got 4.5'),
    (lambda d: d.update(ema_sigma_rels=0.1), r'TrainConfig.ema_sigma_rels: must be a list of float'),
    (lambda d: d['network'].update(num_blocks='1'), r"TrainConfig.network.num_blocks: must be int, got '1'"),
    (lambda d: d.update(network=[8]), r'TrainConfig.network: expected an object of fields, got list'),
    (lambda d: d.pop('network'), r"TrainConfig: missing required fields \['network'\]"),
])
def test_config_type_errors_name_the_field(edit, message):
    d = json.loads(json.dumps(TINY.to_dict()))
    edit(d)
    with pytest.raises(UserError, match=message):
        training.TrainConfig.from_dict(d)


@pytest.fixture(scope='module')
def diverged():
    """A real state after steps with a huge learning rate (Adam steps of ~lr: values up to ~1e38 → inf)."""
    cfg = TINY.replace(lr_ref=1e38)
    state = training.init_train_state(cfg, jax.random.key(0))
    step = training.make_train_step(cfg)
    rng = np.random.default_rng(0)
    for i in range(10):
        x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
        state, _ = step(state, x, None, np.arange(4 * i, 4 * i + 4))
        if train_state.nonfinite_leaves(state):
            return state
    pytest.fail('a learning rate of 1e38 did not make the state non-finite in 10 steps')


def test_nonfinite_state_is_never_saved_nor_resumed(tmp_path, diverged, monkeypatch):
    with pytest.raises(FloatingPointError, match='non-finite values in .*lower --lr'):
        train_state.save_state(tmp_path, diverged)
    with pytest.raises(FloatingPointError, match='non-finite'):
        train_state.save_snapshot(tmp_path, diverged)
    assert sorted(p.name for p in tmp_path.rglob('*')) == []  # nothing written, not even a temporary
    # A non-finite state on disk (written by an older version) is refused on resume, naming the directory.
    monkeypatch.setattr(train_state, 'check_finite', lambda state: None)
    saved = train_state.save_state(tmp_path, diverged)
    monkeypatch.undo()
    template = training.abstract_train_state(diverged.config)
    with pytest.raises(UserError, match=f'{saved.name}: holds non-finite values .*lower --lr') as e:
        train_state.latest_state(tmp_path, template)
    _one_line(e)


def test_temporaries_of_killed_saves_are_removed(tmp_path):
    run = tmp_path / 'run'
    (run / '.tmp-state-000000004.0123abcd' / 'variables').mkdir(parents=True)  # killed mid-save
    (run / '.old-state-000000008.89abcdef').mkdir()  # killed between the two renames: the only copy
    (run / '.old-state-000000008.89abcdef' / 'config.json').write_text('{}')
    (run / 'snapshots').mkdir()
    (run / 'snapshots' / '.tmp-phema-000000000008-0.050.npz.x1y2').write_bytes(b'partial')
    (run / '.tmp-run.json.abc').write_text('{')
    (run / 'state-000000004').mkdir()  # real entries stay
    assert io.remove_temporaries(run, recursive=True) == 4
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob('*')) == [
        'snapshots', 'state-000000004', 'state-000000008', 'state-000000008/config.json']


# ---------------------------------------------------------------------------------------------------
# The command lines: one line on stderr, exit status 2, no traceback.

def _cli(module, *args):
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
    env.pop('EDM2_JAX_TRACEBACK', None)
    return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_one_line_error(result, program, *words):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(f'{program}: error: '), lines
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    root = _folder(tmp_path, n=2)
    _png(root / 'z' / 'odd.png', 64)
    _assert_one_line_error(_cli('experiments.evaluate', f'--images={root}', f'--ref={tmp_path / "r.pkl"}',
                                '--make_ref', '--num_images=0'), 'evaluate', 'odd.png', '64x64')
    config = json.loads(json.dumps(TINY.to_dict()))
    config['lr_ref'] = 'fast'
    (tmp_path / 'config.json').write_text(json.dumps(config))
    _assert_one_line_error(_cli('experiments.train', f'--config={tmp_path / "config.json"}',
                                f'--run_dir={tmp_path / "run"}', f'--data={tmp_path / "none.npz"}'),
                           'train', 'TrainConfig.lr_ref')
    assert not (tmp_path / 'run').exists()
    (tmp_path / 'empty_run').mkdir()
    _assert_one_line_error(_cli('experiments.phema', f'--in={tmp_path / "empty_run"}', '--std=0.1',
                                f'--out={tmp_path / "nets"}'), 'phema', 'no EMA snapshots')

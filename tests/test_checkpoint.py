"""edm2_jax.checkpoint: atomic orbax + config.json directories, generic and for Networks."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import torch_params
from convert.torch_names import torch_to_network
from edm2_jax import checkpoint
from edm2_jax.errors import UserError


@pytest.fixture(scope='module')
def net(tiny_cond):
    return torch_to_network(torch_params(tiny_cond))


def _tree():
    return {'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                       'gain': np.array(0.25, np.float32),
                       'half': np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16)},
            'buffers': {'freqs': np.array([1.5, -2.0], np.float32)}}


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_variables_round_trip(tmp_path):
    meta = {'format': 'something', 'n': 3, 'nested': {'a': [1, 2]}}
    out = checkpoint.save_variables(tmp_path / 'ck', _tree(), meta)
    assert sorted(os.listdir(tmp_path)) == ['ck']  # no temporary left beside it
    variables, meta2 = checkpoint.load_variables(out)
    _assert_same_tree(variables, _tree())
    assert meta2 == meta


def test_load_variables_onto_a_sharding(tmp_path):
    checkpoint.save_variables(tmp_path / 'ck', _tree(), {})
    mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables, _ = checkpoint.load_variables(tmp_path / 'ck', sharding=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(variables))
    _assert_same_tree(variables, _tree())


def test_existing_destination_is_refused_unless_overwrite(tmp_path):
    dst = tmp_path / 'ck'
    checkpoint.save_variables(dst, _tree(), {'version': 1})
    (dst / 'stray.txt').write_text('old')
    with pytest.raises(FileExistsError, match='already exists'):
        checkpoint.save_variables(dst, _tree(), {'version': 2})
    assert checkpoint.read_meta(dst) == {'version': 1}
    checkpoint.save_variables(dst, _tree(), {'version': 2}, overwrite=True)
    assert checkpoint.read_meta(dst) == {'version': 2}
    assert not (dst / 'stray.txt').exists()
    assert sorted(os.listdir(tmp_path)) == ['ck']


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(TypeError):  # meta not JSON-able: refused before anything is written
        checkpoint.save_variables(tmp_path / 'a', _tree(), {'x': np.float32(1)})
    assert os.listdir(tmp_path) == []

    real_save = ocp.Checkpointer.save

    def save_then_crash(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        assert os.listdir(path)  # the arrays were written (into the temporary directory)
        raise KeyboardInterrupt('simulated interruption')

    monkeypatch.setattr(ocp.Checkpointer, 'save', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_variables(tmp_path / 'b', _tree(), {})
    assert os.listdir(tmp_path) == []


def test_network_round_trip_and_mesh(tmp_path, net):
    source = {'file': 'x.pkl', 'sha256': '0' * 64}
    decoder = {'type': 'rgb'}
    checkpoint.save(tmp_path / 'net', net, source=source, decoder=decoder)
    meta = json.loads((tmp_path / 'net' / 'config.json').read_text())
    assert meta['format'] == 'edm2-jax' and meta['dtype'] == 'float32'
    assert meta['source'] == source and meta['decoder'] == decoder
    assert meta['config']['channel_mult'] == [1, 2, 2]

    loaded = checkpoint.load(tmp_path / 'net')
    assert loaded.config == net.config and loaded.dtype == net.dtype
    _assert_same_tree(loaded.variables, net.variables)

    mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    on_mesh = checkpoint.load(tmp_path / 'net', mesh=mesh)
    for leaf in jax.tree.leaves(on_mesh.variables):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
        assert leaf.sharding.mesh == mesh and leaf.sharding.is_fully_replicated
    _assert_same_tree(on_mesh.variables, net.variables)


def test_load_rejects_bad_directories(tmp_path, net):
    with pytest.raises(UserError, match='not a checkpoint directory'):
        checkpoint.load(tmp_path)
    checkpoint.save_variables(tmp_path / 'generic', _tree(), {'format': 'other'})
    with pytest.raises(ValueError, match="format is 'other'"):
        checkpoint.load(tmp_path / 'generic')
    checkpoint.save(tmp_path / 'net', net)
    config_file = tmp_path / 'net' / 'config.json'
    meta = json.loads(config_file.read_text())
    meta['config']['num_blocks'] = 2  # config.json no longer describes the stored arrays
    config_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='do not match the architecture'):
        checkpoint.load(tmp_path / 'net')

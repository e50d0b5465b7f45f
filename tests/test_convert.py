"""convert.edm2 / convert.pickle_reader: NVIDIA pickles, .pt, .npz and .safetensors → edm2-jax.

The pickles are written by tests/edm2_pickle_fixture.py with real torch in NVIDIA's snapshot format
(spec §4.1–4.3) from the official reference weights in tests/reference/tiny_cond.npz.
"""
import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from helpers import nchw_to_nhwc, nhwc_to_nchw, torch_params
from convert import pickle_reader
from convert.edm2 import convert_checkpoint
from convert.torch_names import network_to_torch, precond_kwargs
from edm2_jax import EDM2Config, checkpoint
from edm2_jax.errors import UserError as ConversionError
from edm2_pickle_fixture import (VAE_BIAS, VAE_SCALE, state_dict_shapes,
                                 write_edm2_pickle)

REPO = Path(__file__).resolve().parents[1]
# Spec §3.3: EDM2's SD-VAE latent scale/bias.
SPEC_SCALE = [0.11990407, 0.10822511, 0.13477089, 0.15243903]
SPEC_BIAS = [-0.69664264, -0.3517316, -0.01617251, 0.32774392]


@pytest.fixture(scope='module')
def ref(tiny_cond):
    config = EDM2Config(**json.loads(str(tiny_cond['config_json']))['precond_kwargs'])
    return dict(sd=torch_params(tiny_cond), config=config)


@pytest.fixture(scope='module')
def files(tmp_path_factory, ref):
    """The reference weights, cast to float16, in every input format."""
    d = tmp_path_factory.mktemp('inputs')
    sd16 = {k: v.astype(np.float16) for k, v in ref['sd'].items()}
    sentinel = d / 'MODULE_SRC_WAS_EXECUTED'
    out = dict(dir=d, sentinel=sentinel, sd16=sd16)
    out['pkl'] = write_edm2_pickle(d / 'net.pkl', ref['sd'], precond_kwargs(ref['config']),
                                   sentinel=sentinel)
    torch.save({k: torch.from_numpy(v) for k, v in sd16.items()}, d / 'net.pt')
    out['pt'] = d / 'net.pt'
    torch.save({k: torch.from_numpy(v) for k, v in sd16.items()}, d / 'legacy.pt',
               _use_new_zipfile_serialization=False)
    out['pt_legacy'] = d / 'legacy.pt'
    np.savez(d / 'net16.npz', **sd16)
    out['npz'] = d / 'net16.npz'
    save_file(sd16, str(d / 'net.safetensors'))
    out['safetensors'] = d / 'net.safetensors'
    return out


def _torch_sd(path):
    return network_to_torch(checkpoint.load(path))


# ------------------------------------------------------------------------------------------------
# The fixture really has NVIDIA's format.

def test_fixture_pickle_has_the_measured_opcode_structure(files):
    data = files['pkl'].read_bytes()
    ops = collections.Counter()
    strings, globals_ = [], []
    for op, arg, _ in pickletools.genops(data):
        ops[op.name] += 1
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE'):
            strings.append(arg)
        if op.name == 'STACK_GLOBAL':
            globals_.append(tuple(strings[-2:]))
    # Spec §4.3 (a snapshot of this very configuration written by the official code).
    assert data[:2] == b'\x80\x04' and ops['FRAME'] == 27
    assert (ops['REDUCE'], ops['NEWOBJ'], ops['BUILD'], ops['STACK_GLOBAL']) == (1452, 4, 5, 10)
    assert ops['BINBYTES'] + ops['SHORT_BINBYTES'] == 88 and ops['BINUNICODE'] == 3
    assert ops['EMPTY_SET'] == 86
    assert globals_[:4] == [('dnnlib.util', 'EasyDict'),
                            ('torch_utils.persistence', '_reconstruct_persistent_obj'),
                            ('numpy._core.multiarray', '_reconstruct'), ('numpy', 'ndarray')]
    assert globals_[-2:] == [('torch.storage', '_load_from_bytes'),
                             ('torch.nn.modules.container', 'ModuleDict')]
    assert abs(len(data) - 2.49e6) < 0.01e6


def test_fixture_shapes_follow_the_spec_key_grammar(ref):
    shapes = state_dict_shapes(ref['config'])
    assert list(shapes) == list(ref['sd'])
    assert all(shapes[k] == ref['sd'][k].shape for k in shapes)


# ------------------------------------------------------------------------------------------------
# The restricted reader.

def test_reader_recovers_every_float16_tensor_bit_exactly(files):
    with open(files['pkl'], 'rb') as f:
        data = pickle_reader.load(f)
    assert list(data) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert data['ema'].class_name == 'Precond' and data['loss_fn'].state['P_mean'] == -0.4
    sd = pickle_reader.module_state_dict(data['ema'])
    assert list(sd) == list(files['sd16'])
    for k, v in files['sd16'].items():
        assert sd[k].dtype == np.float16 and sd[k].shape == v.shape, k
        np.testing.assert_array_equal(sd[k].view(np.uint16), v.view(np.uint16), err_msg=k)
    np.testing.assert_array_equal(data['encoder'].state['scale'], VAE_SCALE)
    assert not files['sentinel'].exists()


def test_reader_handles_strided_and_other_dtype_storages(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {'t': base.t(), 'slice': base[1:3, 2:5], 'bf16': base.to(torch.bfloat16),
               'long': torch.arange(5), 'scalar': torch.tensor(2.5, dtype=torch.float64)}
    path = tmp_path / 'x.pkl'
    path.write_bytes(pickle.dumps(tensors, protocol=4))
    with open(path, 'rb') as f:
        got = pickle_reader.load(f)
    for k, t in tensors.items():
        want = t.float().numpy() if k == 'bf16' else t.numpy()
        np.testing.assert_array_equal(np.asarray(got[k], dtype=want.dtype), want, err_msg=k)
    assert got['bf16'].dtype == ml_dtypes.bfloat16 and got['long'].dtype == np.int64
    # Pickles written with numpy 1.x name the module numpy.core.multiarray.
    new = pickle.dumps({'scale': VAE_SCALE}, protocol=4)
    old_name = b'\x8c\x16numpy._core.multiarray'  # SHORT_BINUNICODE, 22 characters
    assert new[2:3] == b'\x95' and new.count(old_name) == 1  # one FRAME holds everything
    frame = int.from_bytes(new[3:11], 'little') - 1
    legacy = new[:3] + frame.to_bytes(8, 'little') + new[11:].replace(
        old_name, b'\x8c\x15numpy.core.multiarray')
    np.testing.assert_array_equal(pickle_reader.load(io.BytesIO(legacy))['scale'], VAE_SCALE)


class _Evil:
    """A payload that creates a file when unpickled by an unrestricted loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, ref):
    marker = tmp_path / 'PWNED'
    evil = pickle.dumps({'ema': _Evil(marker)}, protocol=4)
    with pytest.raises(pickle_reader.UnsafePickleError, match=r'posix\.system'):
        pickle_reader.load(io.BytesIO(evil))
    # Hidden after a complete, valid snapshot: still refused, still nothing run.
    path = write_edm2_pickle(tmp_path / 'evil.pkl', ref['sd'], precond_kwargs(ref['config']),
                             extra={'payload': _Evil(marker)})
    with pytest.raises(ConversionError, match=r'forbidden global posix\.system'):
        convert_checkpoint(path, tmp_path / 'out')
    assert not marker.exists() and not (tmp_path / 'out').exists()
    pickle.loads(evil)  # the payload is live: an ordinary unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize('extra, message', [
    ({'x': torch.zeros(2, dtype=torch.complex64)}, r'forbidden global torch\.ComplexFloatStorage'),
    ({'x': np.array([1, 'a'], dtype=object)}, r"numpy dtype 'O8' is not allowed"),
    ({'x': collections.Counter()}, r'forbidden global collections\.Counter'),
])
def test_non_whitelisted_content_is_refused(tmp_path, extra, message):
    path = tmp_path / 'x.pkl'
    path.write_bytes(pickle.dumps(extra, protocol=4))
    with open(path, 'rb') as f, pytest.raises(pickle_reader.UnsafePickleError, match=message):
        pickle_reader.load(f)


# ------------------------------------------------------------------------------------------------
# Conversion.

def test_all_formats_give_identical_params(tmp_path, files, ref):
    outputs = {fmt: convert_checkpoint(files[fmt], tmp_path / fmt)
               for fmt in ('pkl', 'pt', 'pt_legacy', 'npz', 'safetensors')}
    rounded = {k: v.astype(np.float32) for k, v in files['sd16'].items()}
    for fmt, out in outputs.items():
        got = _torch_sd(out)
        assert set(got) == set(rounded), fmt
        for k, v in rounded.items():
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k].view(np.uint32), v.view(np.uint32),
                                          err_msg=f'{fmt}: {k}')
        meta = checkpoint.read_meta(out)
        assert EDM2Config.from_dict(meta['config']) == ref['config']
        assert meta['source']['file'] == files[fmt].name and meta['dtype'] == 'float32'
        assert meta['source']['sha256'] == hashlib.sha256(files[fmt].read_bytes()).hexdigest()
    pkl_meta = checkpoint.read_meta(outputs['pkl'])
    assert pkl_meta['source']['format'] == 'pickle' and pkl_meta['source']['network'] == 'ema'
    assert pkl_meta['decoder'] == {'type': 'sd-vae', 'name': 'stabilityai/sd-vae-ft-mse',
                                   'scale': VAE_SCALE.tolist(), 'bias': VAE_BIAS.tolist()}
    npz_decoder = checkpoint.read_meta(outputs['npz'])['decoder']  # 4 channels → EDM2's SD-VAE
    np.testing.assert_allclose(npz_decoder['scale'], SPEC_SCALE, rtol=1e-7)
    np.testing.assert_allclose(npz_decoder['bias'], SPEC_BIAS, rtol=1e-6)
    assert not files['sentinel'].exists()


def test_float32_npz_network_reproduces_reference_D(tmp_path, reference_dir, tiny_cond):
    # The official reference file itself, its weights stored under 'param/'.
    out = convert_checkpoint(reference_dir / 'tiny_cond.npz', tmp_path / 'ref', prefix='param/')
    net = checkpoint.load(out)
    D = net(nchw_to_nhwc(tiny_cond['x']), tiny_cond['sigma'], tiny_cond['class_labels'])
    assert np.abs(nhwc_to_nchw(np.asarray(D)) - tiny_cond['D']).max() <= 1e-4


def test_bfloat16_output_and_pixel_decoder(tmp_path, files, ref):
    pkl = write_edm2_pickle(tmp_path / 'rgb.pkl', ref['sd'], precond_kwargs(ref['config']),
                            encoder='rgb')
    out = convert_checkpoint(pkl, tmp_path / 'bf16', dtype='bfloat16')
    meta = checkpoint.read_meta(out)
    assert meta['decoder'] == {'type': 'rgb'} and meta['dtype'] == 'bfloat16'
    got = _torch_sd(out)
    for k, v in files['sd16'].items():
        want = v.astype(np.float32).astype(ml_dtypes.bfloat16)
        assert got[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[k].view(np.uint16), want.view(np.uint16), err_msg=k)


def test_torch_training_state_takes_the_ema_state_dict(tmp_path, files):
    sd16 = {k: torch.from_numpy(v) for k, v in files['sd16'].items()}
    zeros = {k: torch.zeros_like(v) for k, v in sd16.items()}
    torch.save({'net': zeros, 'ema': sd16, 'optimizer': {'step': 3}, 'cur_nimg': 1000},
               tmp_path / 'state.pt')
    out = convert_checkpoint(tmp_path / 'state.pt', tmp_path / 'out')
    assert checkpoint.read_meta(out)['source']['network'] == 'ema'
    np.testing.assert_array_equal(_torch_sd(out)['unet.out_conv.weight'],
                                  files['sd16']['unet.out_conv.weight'].astype(np.float32))
    torch.save({'a': sd16, 'b': zeros}, tmp_path / 'two.pt')
    with pytest.raises(ConversionError, match=r"state_dicts at \['a', 'b'\]"):
        convert_checkpoint(tmp_path / 'two.pt', tmp_path / 'out2')
    convert_checkpoint(tmp_path / 'two.pt', tmp_path / 'out2', network='b')
    assert not _torch_sd(tmp_path / 'out2')['unet.out_conv.weight'].any()


@pytest.mark.slow
def test_cli_converts_a_pickle_without_torch_and_fails_cleanly(tmp_path, files):
    # torch and NVIDIA's packages are made unimportable in the child process.
    run = ("import runpy, sys\n"
           "for m in ('torch', 'torch_utils', 'dnnlib'): sys.modules[m] = None\n"
           "sys.argv[0] = 'convert.edm2'\n"
           "runpy.run_module('convert.edm2', run_name='__main__', alter_sys=True)\n")
    cli = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, '-c', run, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    done = cli(f'--src={files["pkl"]}', f'--dst={tmp_path / "out"}')
    assert done.returncode == 0, done.stderr
    assert 'wrote' in done.stdout
    assert checkpoint.read_meta(tmp_path / 'out')['source']['format'] == 'pickle'
    marker = tmp_path / 'PWNED'
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'ema': _Evil(marker)}, protocol=4))
    refused = cli(f'--src={tmp_path / "evil.pkl"}', f'--dst={tmp_path / "out2"}')
    assert refused.returncode != 0 and 'forbidden global posix.system' in refused.stderr
    assert not marker.exists() and not (tmp_path / 'out2').exists()
    assert not files['sentinel'].exists()


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written.

def _truncate(src: Path, dst: Path, fraction=0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize('fmt, message', [
    ('pkl', 'corrupt or truncated pickle'), ('pt', 'corrupt or truncated zip'),
    ('npz', 'corrupt or truncated zip'), ('safetensors', 'cannot read the .safetensors'),
])
def test_truncated_files(tmp_path, files, fmt, message):
    bad = _truncate(files[fmt], tmp_path / files[fmt].name)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(bad, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_corrupt_and_unknown_files(tmp_path, files):
    data = bytearray(files['pkl'].read_bytes())
    i = data.index(b'HalfStorage')
    data[i:i + 11] = b'HalfStorXge'  # a storage type name no whitelist knows
    (tmp_path / 'a.pkl').write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r'forbidden global torch\.HalfStorXge'):
        convert_checkpoint(tmp_path / 'a.pkl', tmp_path / 'out')
    data = bytearray(files['pkl'].read_bytes())
    data[200_000:200_400] = b'\xff' * 400  # garbage inside the opcode stream / a storage blob
    (tmp_path / 'b.pkl').write_bytes(bytes(data))
    with pytest.raises(ConversionError):
        convert_checkpoint(tmp_path / 'b.pkl', tmp_path / 'out')
    for name, content in (('c.txt', b'hello, not a checkpoint'), ('d.bin', b'')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConversionError, match='unknown file format'):
            convert_checkpoint(tmp_path / name, tmp_path / 'out')
    with pytest.raises(ConversionError, match='no such file'):
        convert_checkpoint(tmp_path / 'missing.pkl', tmp_path / 'out')
    marker = tmp_path / 'PWNED'
    torch.save({'x': _Evil(marker)}, tmp_path / 'e.pt')  # weights_only refuses arbitrary objects
    with pytest.raises(ConversionError, match='cannot load as a torch.save file'):
        convert_checkpoint(tmp_path / 'e.pt', tmp_path / 'out')
    assert not marker.exists()
    assert not (tmp_path / 'out').exists()


def test_missing_unexpected_and_misshaped_tensors(tmp_path, files):
    sd = dict(files['sd16'])
    cases = {
        'missing': {k: v for k, v in sd.items() if k != 'unet.dec.8x8_block0.attn_proj.weight'},
        'unexpected': {**sd, 'unet.extra.weight': np.zeros(3, np.float16)},
        'mis-shaped': {**sd, 'unet.enc.16x16_block0.conv_res1.weight': np.zeros((32, 32, 1, 1),
                                                                               np.float16)},
    }
    for kind, tensors in cases.items():
        np.savez(tmp_path / f'{kind}.npz', **tensors)
        with pytest.raises(ConversionError, match=kind):
            convert_checkpoint(tmp_path / f'{kind}.npz', tmp_path / 'out')
    np.savez(tmp_path / 'int.npz', **{**sd, 'unet.out_gain': np.array(1, np.int64)})
    with pytest.raises(ConversionError, match='non-floating-point tensors: unet.out_gain'):
        convert_checkpoint(tmp_path / 'int.npz', tmp_path / 'out')
    nan = sd['unet.emb_noise.weight'].copy()
    nan[0, 0] = np.nan
    np.savez(tmp_path / 'nan.npz', **{**sd, 'unet.emb_noise.weight': nan})
    with pytest.raises(ConversionError, match='NaN/Inf values .*unet.emb_noise.weight'):
        convert_checkpoint(tmp_path / 'nan.npz', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_architecture_that_contradicts_the_tensors(tmp_path, files, ref):
    kwargs = {**precond_kwargs(ref['config']), 'model_channels': 64}
    pkl = write_edm2_pickle(tmp_path / 'lies.pkl', ref['sd'], kwargs)
    with pytest.raises(ConversionError, match='contradicts the tensors'):
        convert_checkpoint(pkl, tmp_path / 'out')
    with pytest.raises(ConversionError, match='contradicts the tensors'):
        convert_checkpoint(files['npz'], tmp_path / 'out', num_blocks=2)
    with pytest.raises(ConversionError, match='contradicts the tensors'):
        convert_checkpoint(files['npz'], tmp_path / 'out', preset='img512-xs')
    with pytest.raises(ConversionError, match="entry 'net' is not an EDM2 Precond"):
        convert_checkpoint(files['pkl'], tmp_path / 'out', network='net')
    with pytest.raises(ConversionError, match='unknown preset'):
        convert_checkpoint(files['npz'], tmp_path / 'out', preset='img512-huge')
    assert not (tmp_path / 'out').exists()
    # Overrides that agree with the tensors complete the inference (here the training dropout).
    out = convert_checkpoint(files['npz'], tmp_path / 'out', dropout=0.1)
    assert checkpoint.read_meta(out)['config']['dropout'] == 0.1


def test_existing_destination_needs_overwrite(tmp_path, files):
    dst = tmp_path / 'out'
    dst.mkdir()
    (dst / 'keep.txt').write_text('mine')
    with pytest.raises(ConversionError, match='already exists'):
        convert_checkpoint(files['npz'], dst)
    assert (dst / 'keep.txt').read_text() == 'mine'
    convert_checkpoint(files['npz'], dst, overwrite=True)
    assert not (dst / 'keep.txt').exists() and checkpoint.read_meta(dst)['format'] == 'edm2-jax'
    assert sorted(os.listdir(tmp_path)) == ['out']

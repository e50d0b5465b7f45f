"""Malicious and malformed inputs to the converters: each is refused with one line naming the file
and the problem, runs no code, allocates no more than the file can legitimately hold, writes nothing.

Every input is crafted here (hand-written pickle opcodes, or a pickler whose `reducer_override` emits
chosen globals). Each case runs in-process through the library function and once through the
command line in a subprocess whose address space is capped (RLIMIT_AS) and whose peak RSS is measured.
"""
import collections
import errno
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert import pickle_reader, readers
from convert import vae as convert_vae
from convert.edm2 import convert_checkpoint
from edm2_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# ------------------------------------------------------------------------------------------------
# Crafting pickles.

def _str(s: str) -> bytes:
    b = s.encode()
    return b'\x8c' + bytes([len(b)]) + b if len(b) < 256 else b'X' + struct.pack('<I', len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b'c' + f'{module}\n{name}\n'.encode()


PROTO, STOP, MARK, EMPTY_DICT, EMPTY_LIST = b'\x80\x04', b'.', b'(', b'}', b']'
SETITEM, SETITEMS, APPEND, TUPLE1, REDUCE, BUILD, MEMOIZE, POP = (
    b's', b'u', b'a', b'\x85', b'R', b'b', b'\x94', b'0')


def _binget(i: int) -> bytes:
    return b'h' + bytes([i])


def _record_open(class_name: str, modules_memo: bool = False) -> bytes:
    """_reconstruct_persistent_obj({type, version, class_name, state={_parameters, _buffers,
    _modules={ ... (children follow, closed by _record_close)"""
    return (_global('torch_utils.persistence', '_reconstruct_persistent_obj') + EMPTY_DICT + MARK
            + _str('type') + _str('class') + _str('version') + b'K\x06' + _str('class_name')
            + _str(class_name) + _str('state') + EMPTY_DICT + MARK + _str('_parameters') + EMPTY_DICT
            + _str('_buffers') + EMPTY_DICT + _str('_modules') + EMPTY_DICT
            + (MEMOIZE if modules_memo else b'') + MARK)


_RECORD_CLOSE = SETITEMS + SETITEMS + SETITEMS + TUPLE1 + REDUCE


def _top(entries: bytes) -> bytes:
    """A pickle of {key: value, ...} with `entries` the opcodes of the keys and values."""
    return PROTO + EMPTY_DICT + MARK + entries + SETITEMS + STOP


class _Call:
    """Pickles as func(*args) (func must be importable by its module and name)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        return (obj.func, obj.args) if isinstance(obj, _Call) else NotImplemented


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def _storage(n: int) -> _Call:
    """One legacy storage blob of n float16 zeros, as `torch.storage._load_from_bytes(blob)`."""
    blob = torch.zeros(n, dtype=torch.float16)._typed_storage().__reduce__()[1][0]
    return _Call(torch.storage._load_from_bytes, blob)


def _tensor(storage, size, stride, offset=0) -> _Call:
    return _Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False,
                 collections.OrderedDict())


class _Evil:
    """Creates `marker` when unpickled by an unrestricted loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


# ------------------------------------------------------------------------------------------------
# The malicious files: name → (write(dir) -> (path, marker or None), message regex).

def shared_storage_strided(d):
    """64 strided tensors over one 8 MiB storage (memoised: ~8 MB file, 64 copies when read)."""
    storage = _storage(4 * MiB)
    tensors = {f'w{i}': _tensor(storage, (2 * MiB,), (2,), i % 2) for i in range(64)}
    path = d / 'strided.pkl'
    path.write_bytes(_dumps({'ema': tensors}))
    return path


def shared_storage_views(d):
    """The same with contiguous views: nothing is copied while reading, everything when converting."""
    storage = _storage(4 * MiB)
    path = d / 'views.pkl'
    path.write_bytes(_dumps({'ema': {f'w{i}': _tensor(storage, (4 * MiB,), (1,)) for i in range(64)}}))
    return path


def shared_storage_pt(d):
    """torch.save of 64 views of one storage (the zip stores it once)."""
    base = torch.zeros(4 * MiB, dtype=torch.float16)
    path = d / 'views.pt'
    torch.save({f'w{i}': base[i:] for i in range(64)}, path)
    return path


def uninitialised_reconstruct(d):
    """numpy _reconstruct of 2**30 float16 without data: 2 GiB from a ~200-byte file."""
    path = d / 'empty.pkl'
    path.write_bytes(_dumps({'ema': _Call(np._core.multiarray._reconstruct, np.ndarray, (2 ** 30,),
                                          'f2')}))
    return path


def deep_list(d):
    n = 200_000
    path = d / 'deep.pkl'
    path.write_bytes(_top(_str('ema') + EMPTY_LIST * n + APPEND * (n - 1)))
    return path


def cyclic_modules(d):
    """A Precond whose _modules holds itself."""
    record = _record_open('Precond', modules_memo=True) + _RECORD_CLOSE + MEMOIZE  # memo 0, 1
    path = d / 'cyclic.pkl'
    path.write_bytes(PROTO + EMPTY_DICT + _str('ema') + record + SETITEM
                     + _binget(0) + _str('self') + _binget(1) + SETITEM + POP + STOP)
    return path


def deep_modules(d):
    n = 5000
    body = _record_open('Precond') + (_str('m') + _record_open('Block')) * n
    path = d / 'deep_modules.pkl'
    path.write_bytes(_top(_str('ema') + body + _RECORD_CLOSE * (n + 1)))
    return path


def _precond_with(d, name, init_kwargs=b'', encoder_state=b'', parameters=None):
    """An empty Precond (extra `_init_kwargs` opcodes) and an SD-VAE encoder (`encoder_state`)."""
    params = EMPTY_DICT if parameters is None else parameters
    precond = (_global('torch_utils.persistence', '_reconstruct_persistent_obj') + EMPTY_DICT + MARK
               + _str('type') + _str('class') + _str('version') + b'K\x06' + _str('class_name')
               + _str('Precond') + _str('state') + EMPTY_DICT + MARK + _str('_parameters') + params
               + _str('_buffers') + EMPTY_DICT + _str('_modules') + EMPTY_DICT
               + _str('_init_kwargs') + EMPTY_DICT + MARK + init_kwargs + SETITEMS
               + SETITEMS + SETITEMS + TUPLE1 + REDUCE)
    encoder = (_global('torch_utils.persistence', '_reconstruct_persistent_obj') + EMPTY_DICT + MARK
               + _str('type') + _str('class') + _str('version') + b'K\x06' + _str('class_name')
               + _str('StabilityVAEEncoder') + _str('state') + EMPTY_DICT + MARK + encoder_state
               + SETITEMS + SETITEMS + TUPLE1 + REDUCE)
    path = d / name
    path.write_bytes(_top(_str('ema') + precond + _str('encoder') + encoder))
    return path


def bad_init_kwargs(d):
    return _precond_with(d, 'kwargs.pkl', init_kwargs=_str('channel_mult') + EMPTY_DICT
                         + _str('resample_filter') + b'K\x05')


def bad_encoder_state(d):
    return _precond_with(d, 'encoder.pkl', encoder_state=_str('scale') + _str('abc')
                         + _str('bias') + EMPTY_LIST)


def bad_module_state(d):
    return _precond_with(d, 'state.pkl', parameters=EMPTY_LIST)


def build_on_function(d):
    path = d / 'build_function.pkl'
    path.write_bytes(_top(_str('ema') + _global('torch._utils', '_rebuild_parameter') + EMPTY_DICT
                          + _str('pwned') + b'K\x01' + SETITEM + BUILD))
    return path


def build_on_class(d):
    path = d / 'build_class.pkl'
    path.write_bytes(_top(_str('ema') + _global('torch.nn.modules.container', 'ModuleDict')
                          + EMPTY_DICT + _str('pwned') + b'K\x01' + SETITEM + BUILD))
    return path


def evil_pt(d):
    path = d / 'evil.pt'
    torch.save({'x': _Evil(d / 'PWNED')}, path)
    return path


def _safetensors(d, name, header):
    text = json.dumps(header).encode()
    path = d / name
    path.write_bytes(struct.pack('<Q', len(text)) + text + b'\0' * 8)
    return path


def header_list(d):
    return _safetensors(d, 'list.safetensors', [1, 2])


def header_no_dtype(d):
    return _safetensors(d, 'nodtype.safetensors', {'decoder.w': {'shape': [2], 'data_offsets': [0, 8]}})


def header_negative_shape(d):
    return _safetensors(d, 'negative.safetensors',
                        {'decoder.w': {'dtype': 'F32', 'shape': [-2], 'data_offsets': [0, 8]}})


# (write, converter module, message regex)
CASES = {
    'shared_storage_strided': (shared_storage_strided, 'convert.edm2', r'more than the file holds'),
    'shared_storage_views': (shared_storage_views, 'convert.edm2', r'more than the file holds'),
    'shared_storage_pt': (shared_storage_pt, 'convert.edm2', r'tensors hold .* bytes but the file'),
    'uninitialised_reconstruct': (uninitialised_reconstruct, 'convert.edm2',
                                  r'_reconstruct with shape \(1073741824,\)'),
    'deep_list': (deep_list, 'convert.edm2', r"entry 'ema' is not an EDM2 Precond"),
    'cyclic_modules': (cyclic_modules, 'convert.edm2', r'self: a module appears twice'),
    'deep_modules': (deep_modules, 'convert.edm2', r'modules nested deeper than 64'),
    'bad_init_kwargs': (bad_init_kwargs, 'convert.edm2',
                        r"channel_mult is a dict .*not a number or a list of numbers"),
    'bad_encoder_state': (bad_encoder_state, 'convert.edm2', r'SD-VAE encoder is invalid'),
    'bad_module_state': (bad_module_state, 'convert.edm2', r'\(Precond\): not a torch module'),
    'build_on_function': (build_on_function, 'convert.edm2',
                          r'BUILD on the global torch\._utils\._rebuild_parameter is not allowed'),
    'build_on_class': (build_on_class, 'convert.edm2', r'corrupt or truncated pickle'),
    'evil_pt': (evil_pt, 'convert.edm2', r'unsupported GLOBAL posix\.system'),
    'header_list': (header_list, 'convert.vae', r'cannot read the \.safetensors file.*sequence'),
    'header_no_dtype': (header_no_dtype, 'convert.vae', r'missing field `dtype`'),
    'header_negative_shape': (header_negative_shape, 'convert.vae', r'invalid value: integer `-2`'),
}


def _convert(module, src, dst):
    if module == 'convert.edm2':
        return convert_checkpoint(src, dst)
    return convert_vae.convert(src, dst)


@pytest.mark.parametrize('case', list(CASES))
def test_refused_in_process(tmp_path, case):
    write, module, message = CASES[case]
    src = write(tmp_path)
    functions = {name: dict(getattr(pickle_reader, name).__dict__)
                 for name in ('_rebuild_parameter', '_reconstruct_persistent_obj', 'load_storage_blob')}
    with pytest.raises(UserError, match=message) as e:
        _convert(module, src, tmp_path / 'out')
    assert str(e.value).startswith(f'{src}: ') and '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'PWNED').exists()
    # BUILD changed no function or class of this process.
    assert functions == {name: dict(getattr(pickle_reader, name).__dict__) for name in functions}
    assert not hasattr(pickle_reader._ModuleDictStub, 'pwned')


# The child: caps its address space, converts, reports its peak RSS over the imports' baseline.
_CHILD = r"""
import json, resource, runpy, sys
import jax, numpy, orbax.checkpoint, flax, safetensors
if {torch}:
    import torch
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, vm + {extra}))
base, code = rss(), 0
sys.argv = [{module!r}] + {args!r}
try:
    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)
except SystemExit as e:
    code = e.code
with open({report!r}, 'w') as f:
    json.dump({{'base': base, 'peak': rss()}}, f)
sys.exit(code)
"""


def run_cli(module, args, tmp_path, *, torch_needed=False, extra=2 << 30):
    report = tmp_path / 'rss.json'
    code = _CHILD.format(torch=torch_needed, extra=extra, module=module, args=list(args),
                         report=str(report))
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    rss = json.loads(report.read_text()) if report.exists() else None
    return done, rss


def _one_error_line(stderr, program):
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f'{program}: error: ')]
    assert len(errors) == 1 and 'Traceback' not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_refused_by_the_cli_with_bounded_memory(tmp_path, case):
    write, module, message = CASES[case]
    src = write(tmp_path)
    dst = tmp_path / 'out'
    done, rss = run_cli(module, [f'--src={src}', f'--dst={dst}'], tmp_path,
                        torch_needed=src.suffix == '.pt')
    assert done.returncode == 2, done.stderr[-3000:]
    line = _one_error_line(done.stderr, module)
    assert str(src) in line and re.search(message, line), line
    assert not dst.exists() and not (tmp_path / 'PWNED').exists()
    grown = rss['peak'] - rss['base']
    assert grown < 2 * src.stat().st_size + 100 * MiB, (grown, src.stat().st_size)


# ------------------------------------------------------------------------------------------------
# Writing onto a read-only directory or a full disk: one line, nothing half-written.

@pytest.fixture(scope='module')
def small_npz(tmp_path_factory, tiny_cond):
    from helpers import torch_params
    path = tmp_path_factory.mktemp('net') / 'net.npz'
    np.savez(path, **{k: v.astype(np.float16) for k, v in torch_params(tiny_cond).items()})
    return path


def _read_only_dir(tmp_path) -> Path:
    """A directory nobody may write into (as root, chmod does not stop writes: use /sys)."""
    if os.geteuid() == 0:
        return Path('/sys/edm2-jax-read-only')
    d = tmp_path / 'ro'
    d.mkdir()
    d.chmod(0o555)
    return d


def test_read_only_destination(tmp_path, small_npz):
    dst = _read_only_dir(tmp_path) / 'out'
    with pytest.raises(UserError, match=r'cannot write the checkpoint') as e:
        convert_checkpoint(small_npz, dst)
    assert str(e.value).startswith(f'{dst}: ') and not dst.exists()


def test_full_disk(tmp_path, small_npz, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, 'write_text', no_space)
    with pytest.raises(UserError, match=r'out: cannot write the checkpoint: No space left on device'):
        convert_checkpoint(small_npz, tmp_path / 'out')
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too


@pytest.mark.slow
def test_read_only_destination_cli(tmp_path, small_npz):
    dst = _read_only_dir(tmp_path) / 'out'
    done, _ = run_cli('convert.edm2', [f'--src={small_npz}', f'--dst={dst}'], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert 'cannot write the checkpoint' in _one_error_line(done.stderr, 'convert.edm2')
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------
# The readers directly.

def test_safetensors_errors_name_the_file(tmp_path):
    for write in (header_list, header_no_dtype, header_negative_shape):
        src = write(tmp_path)
        with pytest.raises(UserError, match=re.escape(str(src))):
            readers.read_safetensors(src)


def test_memo_shared_storage_is_one_blob(tmp_path):
    """The crafted file really holds one 8 MiB storage (so the refusal is about references)."""
    path = shared_storage_strided(tmp_path)
    assert 8 * MiB < path.stat().st_size < 9 * MiB

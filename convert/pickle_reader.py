"""Restricted reader for NVIDIA's EDM2 network pickles (spec §4) that needs no torch and runs no code.

The official loader executes the module source stored in every persistent object. Here the pickle is
read by an unpickler that resolves only the globals of spec §4.4 and maps each to an inert builder:

* `torch_utils.persistence._reconstruct_persistent_obj(meta)` → `ObjectRecord(class_name, state)`;
  `meta['module_src']` is never executed (nor kept).
* `torch.nn.modules.container.ModuleDict` → `ObjectRecord('ModuleDict', state)` (NEWOBJ + BUILD).
* `dnnlib.util.EasyDict` → `dict`; `collections.OrderedDict` → `OrderedDict`.
* `torch.storage._load_from_bytes(blob)` → a 1-D numpy view of the legacy `torch.save` blob
  (five small protocol-2 pickles, then per storage an int64 element count and the raw data).
* `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter[_with_state]` → numpy arrays.
* numpy's own array pickling (`_reconstruct`, `ndarray`, `dtype`; both `numpy.core` and `numpy._core`)
  for the encoder's `scale`/`bias`; object dtypes are refused.

Anything else raises `UnsafePickleError` naming the global, before it is resolved.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage → numpy dtype (spec §4.4, inner whitelist).
STORAGE_DTYPES = {
    'HalfStorage': np.dtype(np.float16),
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
}

# numpy dtype codes an encoder attribute may use (plain numbers only).
_NUMPY_DTYPE_CODES = {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8'}


class PickleFormatError(ValueError):
    """The file is not a well-formed EDM2 network pickle (truncated, corrupt, unexpected layout)."""


class UnsafePickleError(PickleFormatError):
    """The pickle references a global outside the whitelist; nothing of it was executed."""


class ObjectRecord:
    """Inert stand-in for a pickled Python object: its class name and its attribute dict."""
    class_name = 'object'

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):  # BUILD on a ModuleDict stub
        if not isinstance(state, dict):
            raise PickleFormatError(f'{self.class_name}: state must be a dict, got {type(state)}')
        self.state = state

    def __repr__(self):
        return f'ObjectRecord({self.class_name!r}, keys={sorted(self.state)})'


class _DtypeMarker(NamedTuple):
    """What a whitelisted `torch.<Name>Storage` global resolves to: a numpy dtype, nothing callable."""
    name: str
    dtype: np.dtype


# ------------------------------------------------------------------------------------------------
# Legacy storage blobs (torch.storage._load_from_bytes).

class _StorageHeaderUnpickler(pickle.Unpickler):
    """Reads the protocol-2 header pickles of one legacy blob; resolves only `torch.*Storage`."""

    def find_class(self, module, name):
        if module == 'torch' and name in STORAGE_DTYPES:
            return _DtypeMarker(name, STORAGE_DTYPES[name])
        raise UnsafePickleError(f'storage blob references forbidden global {module}.{name}')

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
              and isinstance(pid[1], _DtypeMarker) and isinstance(pid[2], str)
              and isinstance(pid[4], int) and pid[4] >= 0 and pid[5] is None)
        if not ok:
            raise PickleFormatError(f'unsupported storage persistent id {pid!r}')
        return pid


def load_storage_blob(blob: bytes) -> np.ndarray:
    """Parses one legacy `torch.save` blob holding a single storage; returns a read-only 1-D view."""
    if not isinstance(blob, (bytes, bytearray)):
        raise PickleFormatError(f'storage blob must be bytes, got {type(blob).__name__}')
    f = io.BytesIO(blob)
    try:
        reader = lambda: _StorageHeaderUnpickler(f).load()  # noqa: E731 - one reader per pickle
        magic, protocol, sys_info, pid, keys = (reader() for _ in range(5))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        if isinstance(e, PickleFormatError):
            raise
        raise PickleFormatError(f'corrupt storage blob: {e}') from e
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise PickleFormatError(f'storage blob has magic {magic!r} / protocol {protocol!r}, '
                                f'expected legacy torch.save ({_LEGACY_MAGIC:#x} / {_LEGACY_PROTOCOL})')
    if not isinstance(sys_info, dict) or sys_info.get('little_endian') is not True:
        raise PickleFormatError(f'storage blob is not little-endian: {sys_info!r}')
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise PickleFormatError(f'storage blob must hold exactly one storage, got keys {keys!r}')
    dtype, numel = pid[1].dtype, pid[4]
    start = f.tell()
    if len(blob) < start + 8:
        raise PickleFormatError('storage blob truncated before its element count')
    (count,) = struct.unpack_from('<q', blob, start)
    end = start + 8 + count * dtype.itemsize
    if count != numel or end != len(blob):
        raise PickleFormatError(f'storage blob size mismatch: header says {numel} elements, record '
                                f'says {count}, {len(blob) - start - 8} data bytes for {dtype}')
    return np.frombuffer(blob, dtype=dtype, count=count, offset=start + 8)


# ------------------------------------------------------------------------------------------------
# Tensor builders (torch._utils).

def _check_hooks(hooks):
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise PickleFormatError('tensor carries backward hooks; refusing')


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Tensor = storage viewed with (offset, size, stride), all in elements."""
    del requires_grad, metadata
    _check_hooks(backward_hooks)
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise PickleFormatError('tensor storage is not a storage blob')
    ints = lambda v: isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)  # noqa: E731
    if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride)
            and len(size) == len(stride)):
        raise PickleFormatError(f'bad tensor geometry offset={offset!r} size={size!r} stride={stride!r}')
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
        return np.zeros(size, storage.dtype)
    if numel > storage.size:  # expanded/overlapping views never occur in checkpoints
        raise PickleFormatError(f'tensor of size {size} has more elements than its storage '
                                f'({storage.size})')
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise PickleFormatError(f'tensor of size {size} at offset {offset} overruns its storage of '
                                f'{storage.size} elements')
    contiguous = tuple(int(s) for s in np.cumprod((1,) + size[:0:-1])[::-1]) if size else ()
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
        return storage[offset:offset + numel].reshape(size)
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    del requires_grad, state
    _check_hooks(backward_hooks)
    if not isinstance(data, np.ndarray):
        raise PickleFormatError('parameter data is not a tensor')
    return data


# ------------------------------------------------------------------------------------------------
# Outer objects.

def _reconstruct_persistent_obj(meta):
    """Inert replacement for NVIDIA's persistence hook: keep class name and state, drop the source."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        raise PickleFormatError('persistent object meta must be a dict with type="class", version=6; '
                                f'got {_describe(meta)}')
    class_name, state = meta.get('class_name'), meta.get('state')
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise PickleFormatError(f'persistent object meta lacks class_name/state: {_describe(meta)}')
    return ObjectRecord(class_name, state)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return '{' + ', '.join(f'{k!r}: {type(v).__name__}' for k, v in obj.items()) + '}'
    return type(obj).__name__


class _ModuleDictStub(ObjectRecord):
    """NEWOBJ target for `torch.nn.ModuleDict`; BUILD fills `state`."""
    class_name = 'ModuleDict'

    def __new__(cls, *args):
        if args:
            raise PickleFormatError('ModuleDict NEWOBJ with arguments')
        return object.__new__(cls)

    def __init__(self):
        self.state = {}


_NDARRAY = object()  # what the global numpy.ndarray resolves to: only a tag for _reconstruct


def _numpy_dtype(code, align=False, copy=True):
    del align, copy
    if code not in _NUMPY_DTYPE_CODES:
        raise UnsafePickleError(f'numpy dtype {code!r} is not allowed (plain numeric dtypes only)')
    return np.dtype(code)


def _numpy_reconstruct(subtype, shape, dtype_code):
    if subtype is not _NDARRAY:
        raise UnsafePickleError('numpy _reconstruct of anything but numpy.ndarray is not allowed')
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


_OUTER_GLOBALS = {
    ('dnnlib.util', 'EasyDict'): dict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictStub,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): load_storage_blob,
    ('numpy', 'ndarray'): _NDARRAY,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
}


class _RestrictedUnpickler(pickle.Unpickler):

    def find_class(self, module, name):
        try:
            return _OUTER_GLOBALS[module, name]
        except KeyError:
            raise UnsafePickleError(f'pickle references forbidden global {module}.{name}; refusing '
                                    'to load it (nothing was executed)') from None

    def persistent_load(self, pid):
        raise PickleFormatError(f'unexpected persistent id {pid!r} in a network pickle')


def _check_arrays(obj, seen=None):
    """Refuses object-dtype arrays anywhere in the loaded tree (numpy BUILD could sneak one in)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError('pickle contains an object-dtype numpy array')
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_arrays(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_arrays(v, seen)
    elif isinstance(obj, ObjectRecord):
        _check_arrays(obj.state, seen)


def load(file: BinaryIO) -> Any:
    """Unpickles an EDM2 network pickle from a binary file object, without torch or code execution."""
    try:
        obj = _RestrictedUnpickler(file).load()
    except PickleFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError) as e:
        raise PickleFormatError(f'corrupt or truncated pickle: {type(e).__name__}: {e}') from e
    if file.read(1):
        raise PickleFormatError('trailing data after the end of the pickle')
    _check_arrays(obj)
    return obj


# ------------------------------------------------------------------------------------------------
# Walking torch module records.

def module_state_dict(module: ObjectRecord, prefix: str = '') -> dict[str, np.ndarray]:
    """Torch-style `state_dict` of a module record: parameters and persistent buffers, recursively."""
    if not isinstance(module, ObjectRecord):
        raise PickleFormatError(f'{prefix or "module"} is not a module record')
    state = module.state
    try:
        params, buffers, modules = state['_parameters'], state['_buffers'], state['_modules']
    except KeyError as e:
        raise PickleFormatError(f'{prefix or module.class_name}: not a torch module (no {e})') from None
    non_persistent = state.get('_non_persistent_buffers_set', set())
    out = {}
    for name, value in list(params.items()) + [
            (n, b) for n, b in buffers.items() if n not in non_persistent]:
        if value is None:
            continue
        if not isinstance(value, np.ndarray):
            raise PickleFormatError(f'{prefix}{name} is not a tensor')
        out[prefix + name] = value
    for name, child in modules.items():
        if child is not None:
            out.update(module_state_dict(child, f'{prefix}{name}.'))
    return out


def find_submodule(module: ObjectRecord, path: str) -> ObjectRecord:
    """The child record at a dotted path (e.g. 'unet'), via `_modules`."""
    for part in filter(None, path.split('.')):
        child = module.state.get('_modules', {}).get(part)
        if not isinstance(child, ObjectRecord):
            raise PickleFormatError(f'module {module.class_name} has no submodule {part!r}')
        module = child
    return module

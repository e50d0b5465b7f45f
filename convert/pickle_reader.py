"""Restricted reader for NVIDIA's EDM2 network pickles (edm2-spec §4) that needs no torch and runs no code.

The official loader executes the module source stored in every persistent object. Here the pickle is
read by an unpickler that resolves only the globals of edm2-spec §4.4 and maps each to an inert builder:

* `torch_utils.persistence._reconstruct_persistent_obj(meta)` → `ObjectRecord(class_name, state)`;
  `meta['module_src']` is never executed (nor kept).
* `torch.nn.modules.container.ModuleDict` → `ObjectRecord('ModuleDict', state)` (NEWOBJ + BUILD).
* `dnnlib.util.EasyDict` → `dict`; `collections.OrderedDict` → `OrderedDict`.
* `torch.storage._load_from_bytes(blob)` → a 1-D numpy view of the legacy `torch.save` blob
  (five small protocol-2 pickles, then per storage an int64 element count and the raw data).
* `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter[_with_state]` → numpy arrays.
* numpy's own array pickling (`_reconstruct`, `ndarray`, `dtype`; both `numpy.core` and `numpy._core`)
  for the encoder's `scale`/`bias`; object dtypes are refused.

Anything else raises `UnsafePickleError` naming the global, before it is resolved. BUILD is honoured
only on `ModuleDict` stubs and numpy arrays (the whitelisted globals themselves refuse it), numpy's
`_reconstruct` only in the empty form numpy writes, and the tensors' total size may not exceed
`max_bytes` (default: the file's size; a legitimate checkpoint stores every tensor's data), so
neither repeated references to one storage nor empty allocations can amplify memory. Nesting is
walked without recursion; module trees deeper than `MAX_DEPTH` or cyclic are refused.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
import struct
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage → numpy dtype (edm2-spec §4.4, inner whitelist).
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
MAX_DEPTH = 64  # torch module nesting; EDM2's Precond is 4 deep

def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 2, 60, 60
    return r


short_repr = _bounded_repr().repr  # for messages: bounded size, no recursion into deep structures
_short = short_repr


class PickleFormatError(ValueError):
    """The file is not a well-formed EDM2 network pickle (truncated, corrupt, unexpected layout)."""


class UnsafePickleError(PickleFormatError):
    """The pickle references a global outside the whitelist; nothing of it was executed."""


class ObjectRecord:
    """Inert stand-in for a pickled Python object: its class name and its attribute dict."""
    class_name = 'object'

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):
        raise UnsafePickleError(f'BUILD on a {self.class_name} record is not allowed')

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
            raise PickleFormatError(f'unsupported storage persistent id {_short(pid)}')
        return pid


def load_storage_blob(blob: bytes) -> np.ndarray:
    """Parses one legacy `torch.save` blob holding a single storage; returns a read-only 1-D view."""
    if not isinstance(blob, (bytes, bytearray)):
        raise PickleFormatError(f'storage blob must be bytes, got {type(blob).__name__}')
    f = io.BytesIO(blob)
    try:
        reader = lambda: _StorageHeaderUnpickler(f).load()  # noqa: E731 - one reader per pickle
        magic, protocol, sys_info, pid, keys = (reader() for _ in range(5))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            RecursionError) as e:
        if isinstance(e, PickleFormatError):
            raise
        raise PickleFormatError(f'corrupt storage blob: {e}') from e
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise PickleFormatError(f'storage blob has magic {_short(magic)} / protocol {_short(protocol)}, '
                                f'expected legacy torch.save ({_LEGACY_MAGIC:#x} / {_LEGACY_PROTOCOL})')
    if not isinstance(sys_info, dict) or sys_info.get('little_endian') is not True:
        raise PickleFormatError(f'storage blob is not little-endian: {_short(sys_info)}')
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise PickleFormatError(f'storage blob must hold exactly one storage, got keys {_short(keys)}')
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
        raise PickleFormatError(f'bad tensor geometry offset={_short(offset)} size={_short(size)} '
                                f'stride={_short(stride)}')
    numel = math.prod(size)
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
        return '{' + ', '.join(f'{_short(k)}: {type(v).__name__}' for k, v in list(obj.items())[:10]) + '}'
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

    def __setstate__(self, state):  # BUILD fills the stub (the one record BUILD applies to)
        if not isinstance(state, dict):
            raise PickleFormatError(f'{self.class_name}: state must be a dict, got {type(state).__name__}')
        self.state = state


def _numpy_dtype(code, align=False, copy=True):
    del align, copy
    if code not in _NUMPY_DTYPE_CODES:
        raise UnsafePickleError(f'numpy dtype {_short(code)} is not allowed (plain numeric dtypes only)')
    return np.dtype(code)


def _numpy_reconstruct(subtype, shape, dtype_code):
    """numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + BUILD(state); only that empty
    form is accepted (BUILD then sets the data, which the file holds), nothing is allocated here."""
    if not (isinstance(subtype, _Global) and subtype.name == 'numpy.ndarray'):
        raise UnsafePickleError('numpy _reconstruct of anything but numpy.ndarray is not allowed')
    if shape != (0,) or dtype_code not in (b'b', 'b'):
        raise PickleFormatError(f'numpy _reconstruct with shape {_short(shape)}: only the empty '
                                "array numpy's own pickling writes is allowed")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


class _Global:
    """A whitelisted global as the unpickler hands it out: callable (unless a tag), but inert
    otherwise: BUILD on it is refused, so no function of this process can be modified."""
    __slots__ = ('name', 'function')

    def __init__(self, name, function=None):
        self.name, self.function = name, function

    def __call__(self, *args):
        if self.function is None:
            raise UnsafePickleError(f'{self.name} may not be called')
        return self.function(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f'BUILD on the global {self.name} is not allowed')


# Globals that NEWOBJ/REDUCE may instantiate (types; BUILD on the type objects themselves fails).
_OUTER_TYPES = {
    ('dnnlib.util', 'EasyDict'): dict,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictStub,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}
# Globals resolved to functions (per-load ones are bound in _RestrictedUnpickler).
_OUTER_FUNCTIONS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): 'tensor',
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): 'storage',
    ('numpy', 'ndarray'): None,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the whitelist; counts the bytes of every tensor built against `max_bytes`."""

    def __init__(self, file, max_bytes: int):
        super().__init__(file)
        self.max_bytes, self.tensor_bytes = max_bytes, 0
        self.storages = {}  # id → storage array, for the blobs this load parsed (kept alive)

    def find_class(self, module, name):
        if (module, name) in _OUTER_TYPES:
            return _OUTER_TYPES[module, name]
        if (module, name) not in _OUTER_FUNCTIONS:
            raise UnsafePickleError(f'pickle references forbidden global {module}.{name}; refusing '
                                    'to load it (nothing was executed)')
        function = _OUTER_FUNCTIONS[module, name]
        function = {'tensor': self._tensor, 'storage': self._storage}.get(function, function)
        return _Global(f'{module}.{name}', function)

    def persistent_load(self, pid):
        raise PickleFormatError(f'unexpected persistent id {_short(pid)} in a network pickle')

    def _storage(self, blob):
        storage = load_storage_blob(blob)
        self.storages[id(storage)] = storage
        return storage

    def _tensor(self, storage, offset, size, *args):
        if id(storage) not in self.storages:
            raise PickleFormatError('tensor storage is not a storage blob')
        if isinstance(size, tuple) and all(isinstance(n, int) and n >= 0 for n in size):
            self.tensor_bytes += math.prod(size) * storage.itemsize
            if self.tensor_bytes > self.max_bytes:
                raise PickleFormatError(
                    f'the tensors hold more than {self.max_bytes:,} bytes, more than the file '
                    'holds (storages referenced by several tensors?); refusing to allocate them')
        return _rebuild_tensor_v2(storage, offset, size, *args)


def _walk(obj):
    """Every object reachable from `obj` through containers and records, each once (iterative)."""
    seen, stack = set(), [obj]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, ObjectRecord):
            stack.append(obj.state)


def _check_arrays(obj):
    """Refuses object-dtype arrays anywhere in the loaded tree (numpy BUILD could sneak one in)."""
    for item in _walk(obj):
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise UnsafePickleError('pickle contains an object-dtype numpy array')


def _remaining_size(file) -> int:
    try:
        return os.fstat(file.fileno()).st_size - file.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        position = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(position)
        return end - position


def load(file: BinaryIO, max_bytes: int | None = None) -> Any:
    """Unpickles an EDM2 network pickle from a binary file object, without torch or code execution.
    The tensors may hold at most `max_bytes` (default: the bytes left in the file)."""
    max_bytes = _remaining_size(file) if max_bytes is None else max_bytes
    try:
        obj = _RestrictedUnpickler(file, max_bytes).load()
    except PickleFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError, RecursionError) as e:
        raise PickleFormatError(f'corrupt or truncated pickle: {type(e).__name__}: '
                                f'{_short(str(e))}') from None
    if file.read(1):
        raise PickleFormatError('trailing data after the end of the pickle')
    _check_arrays(obj)
    return obj


# ------------------------------------------------------------------------------------------------
# Walking torch module records.

def module_state_dict(module: ObjectRecord) -> dict[str, np.ndarray]:
    """Torch-style `state_dict` of a module record: parameters and persistent buffers, children in
    order (walked without recursion; shared or cyclic modules and nesting deeper than MAX_DEPTH are
    refused)."""
    out, stack, seen = {}, [(module, '', 0)], set()
    while stack:
        module, prefix, depth = stack.pop()
        where = prefix.rstrip('.') or 'the network'
        if not isinstance(module, ObjectRecord):
            raise PickleFormatError(f'{where} is not a module record')
        if id(module) in seen:
            raise PickleFormatError(f'{where}: a module appears twice in the tree (shared or cyclic)')
        if depth > MAX_DEPTH:
            raise PickleFormatError(f'{where}: modules nested deeper than {MAX_DEPTH}')
        seen.add(id(module))
        state = module.state
        params, buffers, modules = (state.get(k) for k in ('_parameters', '_buffers', '_modules'))
        non_persistent = state.get('_non_persistent_buffers_set', set())
        if not all(isinstance(p, dict) for p in (params, buffers, modules)) or \
                not isinstance(non_persistent, (set, frozenset)):
            raise PickleFormatError(f'{where} ({module.class_name}): not a torch module (needs '
                                    'dicts _parameters, _buffers, _modules)')
        for name, value in list(params.items()) + [
                (n, b) for n, b in buffers.items() if n not in non_persistent]:
            if value is None:
                continue
            if not isinstance(name, str) or not isinstance(value, np.ndarray):
                raise PickleFormatError(f'{prefix}{_short(name)} is not a tensor')
            out[prefix + name] = value
        for name, child in reversed(list(modules.items())):
            if not isinstance(name, str):
                raise PickleFormatError(f'{where}: module name {_short(name)} is not a string')
            if child is not None:
                stack.append((child, f'{prefix}{name}.', depth + 1))
    return out

"""Files: the one atomic writer, JSON, sha256, and the cleanup of temporaries a killed writer left.

Every file the project writes goes through `write_atomic` (every directory, e.g. a checkpoint,
through `write_atomic_dir`): the content is written to a temporary with a unique name in the
target's directory, then renamed over the target. A reader, a resumed run or a second writer of the
same path never sees a partial file, and two writers never share a temporary (the last rename wins,
whole). `remove_temporaries` cleans up after writers that were killed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX = '.tmp-'  # every temporary is '.tmp-<target name>.<random>'
OLD_PREFIX = '.old-'  # a directory being replaced, moved aside: '.old-<target name>.<random>'


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's temporaries are 0600


def write_atomic(path, write: Callable[[Path], Any]) -> Path:
    """write(temporary path), then rename onto `path` (parents created). On any failure the
    temporary is removed and the target is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'{TMP_PREFIX}{path.name}.', dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic_dir(path, write: Callable[[Path], Any], *, overwrite: bool = False) -> Path:
    """write(temporary directory), then rename onto `path`. An existing `path` is refused
    (FileExistsError) unless `overwrite`; then it is moved aside and removed only after the new one is
    in place. On any failure the temporary is removed and the target is left as it was."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f'{path} already exists (pass overwrite=True / --overwrite to replace it)')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'{TMP_PREFIX}{path.name}.', dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f'{OLD_PREFIX}{path.name}.', dir=path.parent))
            os.replace(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def jsonable(value):
    """The value as JSON stores and reads it back: JSON has no inf/nan and no tuples, so non-finite
    floats become strings, tuples lists, keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path, obj) -> Path:
    """Indented JSON (non-finite floats as strings, unknown objects via str), atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, default=str) + '\n')


def read_json(path):
    return json.loads(Path(path).read_text())


def save_npy(path, array) -> Path:
    import numpy as np

    def write(tmp):
        with open(tmp, 'wb') as fh:  # a file object: np.save would append .npy to a path
            np.save(fh, array)
    return write_atomic(path, write)


def save_npz(path, **arrays) -> Path:
    import numpy as np

    def write(tmp):
        with open(tmp, 'wb') as fh:  # a file object: np.savez would append .npz to a path
            np.savez(fh, **arrays)
    return write_atomic(path, write)


def save_png(path, image) -> Path:
    """uint8 [H, W, 3] (RGB) or [H, W] / [H, W, 1] (greyscale) as a PNG."""
    from PIL import Image
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    mode = 'RGB' if image.ndim == 3 else 'L'
    return write_atomic(path, lambda tmp: Image.fromarray(image, mode).save(tmp, format='PNG'))


def save_figure(path, figure, **kwargs) -> Path:
    """A matplotlib figure (format from the target's suffix)."""
    fmt = Path(path).suffix.lstrip('.') or 'png'
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format=fmt, **kwargs))


def sha256(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (memory bounded for multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_temporaries(directory, recursive: bool = False) -> int:
    """Cleans up after writers that were killed in `directory`: temporaries (files and directories)
    are deleted; a directory moved aside just before its replacement went in goes back to its name if
    that is free (it is the only copy), else is deleted. Returns how many were handled. Call it only
    where no other writer is running (e.g. at the start of a resumed run)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    glob = '**/' if recursive else ''
    count = 0
    for tmp in sorted(directory.glob(f'{glob}{TMP_PREFIX}*')):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        count += 1
    for old in sorted(directory.glob(f'{glob}{OLD_PREFIX}*')):
        original = old.parent / old.name[len(OLD_PREFIX):].rsplit('.', 1)[0]
        if old.is_dir() and not original.exists():
            os.rename(old, original)
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        count += 1
    return count

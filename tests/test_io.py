"""edm2_jax.io: concurrent writers of one path never fail and leave a whole file; a failing writer
leaves the target and its directory as they were; sha256 agrees with hashlib."""
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edm2_jax import io

ROOT = Path(__file__).resolve().parents[1]
WRITES = 3000

# One writer process: WRITES whole-file writes of the same path, each file its writer's tag repeated.
WRITER = """
import sys
from edm2_jax import io
path, tag = sys.argv[1], sys.argv[2]
for i in range({n}):
    io.write_text(path, tag * 4096)
"""


@pytest.mark.slow
def test_two_processes_write_one_path(tmp_path):
    target = tmp_path / 'shared.txt'
    procs = [subprocess.Popen([sys.executable, '-c', WRITER.format(n=WRITES), str(target), tag], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
             for tag in 'ab']
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    text = target.read_text()
    assert text in ('a' * 4096, 'b' * 4096)  # one writer's whole file, never a mix or a truncation
    assert os.listdir(tmp_path) == ['shared.txt']


def test_failing_writer_changes_nothing(tmp_path):
    target = tmp_path / 'x.json'
    target.write_text('old')

    def write(tmp):
        tmp.write_text('half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError, match='No space'):
        io.write_atomic(target, write)
    assert target.read_text() == 'old' and os.listdir(tmp_path) == ['x.json']
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of a write
        io.write_atomic(tmp_path / 'new.bin', lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert os.listdir(tmp_path) == ['x.json']


def test_files_get_the_mode_open_gives(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = io.write_bytes(tmp_path / 'a.bin', b'x')
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_remove_temporaries(tmp_path):
    (tmp_path / 'sub').mkdir()
    for p in (tmp_path / '.tmp-a.png.x1', tmp_path / '.tmp-b.json.x2', tmp_path / 'sub' / '.tmp-c.npz.x3'):
        p.write_bytes(b'partial')
    keep = [tmp_path / 'a.png', tmp_path / '.hidden', tmp_path / 'sub' / 'c.npz']
    for p in keep:
        p.write_bytes(b'whole')
    assert io.remove_temporaries(tmp_path) == 2
    assert (tmp_path / 'sub' / '.tmp-c.npz.x3').exists()
    assert io.remove_temporaries(tmp_path, recursive=True) == 1
    assert sorted(p for p in tmp_path.rglob('*') if p.is_file()) == sorted(keep)
    assert io.remove_temporaries(tmp_path / 'missing') == 0


def test_sha256_of_a_multi_chunk_file(tmp_path):
    data = os.urandom(3 * 1000 + 17)
    path = tmp_path / 'blob'
    path.write_bytes(data)
    assert io.sha256(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert io.sha256(path) == hashlib.sha256(data).hexdigest()


def test_json_round_trip_and_non_finite(tmp_path):
    path = io.write_json(tmp_path / 'd' / 'r.json', {'a': (1, 2), 'b': float('inf'), 'c': {3: 'x'}})
    assert io.read_json(path) == {'a': [1, 2], 'b': 'inf', 'c': {'3': 'x'}}


def test_write_atomic_dir_replaces_only_whole_directories(tmp_path):
    dst = tmp_path / 'ckpt'
    io.write_atomic_dir(dst, lambda d: (d / 'a').write_text('1'))
    with pytest.raises(FileExistsError):
        io.write_atomic_dir(dst, lambda d: (d / 'a').write_text('2'))

    def fails(d):
        (d / 'a').write_text('partial')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError):
        io.write_atomic_dir(dst, fails, overwrite=True)
    assert (dst / 'a').read_text() == '1' and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
    io.write_atomic_dir(dst, lambda d: (d / 'b').write_text('3'), overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ['b'] and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_a_directory_moved_aside_comes_back(tmp_path):
    """Killed between moving the old directory aside and renaming the new one in: the old one is the
    only copy, so cleaning up renames it back; beside an existing target it is deleted."""
    (tmp_path / f'{io.OLD_PREFIX}ckpt.x1y2').mkdir()
    (tmp_path / f'{io.OLD_PREFIX}ckpt.x1y2' / 'config.json').write_text('{}')
    (tmp_path / f'{io.TMP_PREFIX}ckpt.a1b2').mkdir()
    (tmp_path / 'other').mkdir()
    (tmp_path / f'{io.OLD_PREFIX}other.c3d4').mkdir()
    assert io.remove_temporaries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'other']
    assert (tmp_path / 'ckpt' / 'config.json').read_text() == '{}'

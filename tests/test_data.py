"""Data loading: IDX files (synthetic round trips, malformed headers, the real Fashion-MNIST), image
folders / zips / .npz, the resolution maps against brute-force references, value ranges and the
deterministic batch order."""
import gzip
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edm2_jax import data as D
from edm2_jax.errors import UserError

FMNIST = Path(D.FASHION_MNIST_ROOT)


def write_idx(path, array, magic=None, extra=b''):
    """Independent IDX writer: big-endian magic (0x0000 08 ndim), dims, raw uint8 bytes, gzipped."""
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    raw = struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes() + extra
    with gzip.open(path, 'wb') as f:
        f.write(raw)


def write_fake_fmnist(root, n_train=7, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / f'{prefix}-images-idx3-ubyte.gz', images)
        write_idx(root / f'{prefix}-labels-idx1-ubyte.gz', labels)
        out[split] = images, labels
    return out


# ------------------------------------------------------------------------------------------- IDX
def test_idx_round_trip(tmp_path, monkeypatch):
    ref = write_fake_fmnist(tmp_path)
    for split, (images, labels) in ref.items():
        x, y = D.load_fashion_mnist(split, root=tmp_path)
        assert x.dtype == np.uint8 and x.shape == (len(images), 28, 28, 1)
        assert y.dtype == np.int32
        np.testing.assert_array_equal(x[..., 0], images)
        np.testing.assert_array_equal(y, labels)
    monkeypatch.setenv('FASHION_MNIST_DIR', str(tmp_path))
    d = D.load_images('fashion-mnist:test')
    np.testing.assert_array_equal(d.labels, ref['test'][1])
    assert d.num_classes == 10
    assert D.load_images('fashion-mnist').images.shape == (7, 28, 28, 1)


def test_idx_dims_from_header(tmp_path):
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    write_idx(tmp_path / 'x.gz', a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / 'x.gz', D.IDX_IMAGES), a)


def test_missing_fashion_mnist_names_package(tmp_path, monkeypatch):
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        D.load_fashion_mnist('train', root=tmp_path)
    with pytest.raises(ValueError, match='split'):
        D.load_fashion_mnist('valid', root=tmp_path)


@pytest.mark.parametrize('corrupt, message', [
    ('wrong_magic', 'magic number 2049, expected 2051'),
    ('truncated_data', r'header says shape \(7, 28, 28\)'),
    ('trailing_bytes', 'file has'),
    ('truncated_header', 'truncated IDX header'),
    ('empty', 'file too short'),
    ('truncated_gzip', 'corrupt gzip'),
    ('count_mismatch', '7 images but 6 labels'),
])
def test_malformed_idx(tmp_path, corrupt, message):
    write_fake_fmnist(tmp_path)
    images_path = tmp_path / 'train-images-idx3-ubyte.gz'
    rng = np.random.default_rng(1)
    if corrupt == 'wrong_magic':
        write_idx(images_path, rng.integers(0, 256, (7, 28, 28)), magic=2049)
    elif corrupt == 'truncated_data':
        with gzip.open(images_path, 'wb') as f:
            f.write(struct.pack('>4I', 2051, 7, 28, 28) + bytes(7 * 28 * 28 - 1))
    elif corrupt == 'trailing_bytes':
        write_idx(images_path, rng.integers(0, 256, (7, 28, 28)), extra=b'\0')
    elif corrupt == 'truncated_header':
        with gzip.open(images_path, 'wb') as f:
            f.write(struct.pack('>3I', 2051, 7, 28))
    elif corrupt == 'empty':
        with gzip.open(images_path, 'wb') as f:
            f.write(b'')
    elif corrupt == 'truncated_gzip':
        images_path.write_bytes(images_path.read_bytes()[:200])
    elif corrupt == 'count_mismatch':
        write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros(6))
    with pytest.raises(ValueError, match=message):
        D.load_fashion_mnist('train', root=tmp_path)


@pytest.fixture(scope='module')
def fmnist():
    if not (FMNIST / 'train-images-idx3-ubyte.gz').is_file():
        pytest.skip(f'Fashion-MNIST not installed at {FMNIST} (apt-get install dataset-fashion-mnist)')
    return {s: D.load_fashion_mnist(s, root=FMNIST) for s in ('train', 'test')}


def test_real_fashion_mnist(fmnist):
    for split, n in (('train', 60000), ('test', 10000)):
        x, y = fmnist[split]
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.uint8 and y.shape == (n,)
        np.testing.assert_array_equal(np.bincount(y, minlength=10), [n // 10] * 10)
        assert y[0] == 9                                   # both splits start with an ankle boot
    # Widely published normalisation constant of the training images: mean 0.2860.
    assert abs(fmnist['train'][0].mean() / 255 - 0.2860) < 5e-4


# ---------------------------------------------------------------------------- generic sources
def make_image_set(root, rgb=False, seed=0):
    """Five 6×5 PNGs in nested folders; returns {relpath: (array, label)}."""
    rng = np.random.default_rng(seed)
    items = {}
    for i, name in enumerate(['b.png', 'a/z.png', 'a/b.png', 'c/0.png', '00.png']):
        a = rng.integers(0, 256, (6, 5, 3) if rgb else (6, 5), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / name)
        items[name] = a, (3 * i) % 7
    return items


def zip_dir(src, dst):
    with zipfile.ZipFile(dst, 'w') as z:
        for p in sorted(src.rglob('*')):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
    return dst


@pytest.mark.parametrize('rgb', [False, True])
def test_folder_and_zip(tmp_path, rgb):
    root = tmp_path / 'set'
    items = make_image_set(root, rgb)
    (root / 'dataset.json').write_text(json.dumps({'labels': [[k, v[1]] for k, v in items.items()]}))
    order = ['00.png', 'a/b.png', 'a/z.png', 'b.png', 'c/0.png']
    for source in (root, zip_dir(root, tmp_path / 'set.zip')):
        d = D.load_images(str(source))
        assert d.images.shape == (5, 6, 5, 3 if rgb else 1) and d.images.dtype == np.uint8
        np.testing.assert_array_equal(d.images.reshape(5, 6, 5, -1),
                                      np.stack([items[k][0].reshape(6, 5, -1) for k in order]))
        np.testing.assert_array_equal(d.labels, [items[k][1] for k in order])
        assert d.labels.dtype == np.int32 and d.num_classes == max(v[1] for v in items.values()) + 1


def test_folder_unlabeled_and_errors(tmp_path):
    root = tmp_path / 'set'
    items = make_image_set(root)
    d = D.load_images(str(root))
    assert d.labels is None and d.num_classes == 0
    (root / 'dataset.json').write_text(json.dumps({'labels': None}))
    assert D.load_images(str(root)).labels is None
    (root / 'dataset.json').write_text(json.dumps({'labels': [[k, 1] for k in list(items)[:-1]]}))
    with pytest.raises(ValueError, match='dataset.json: labels do not match'):
        D.load_images(str(root))
    (root / 'dataset.json').write_text(json.dumps({'labels': [[k, 1.5] for k in items]}))
    with pytest.raises(ValueError, match='labels must be integers'):
        D.load_images(str(root))
    (root / 'dataset.json').write_text('{"labels": [["b.png"')
    with pytest.raises(ValueError, match='dataset.json: expected'):
        D.load_images(str(root))
    (root / 'dataset.json').unlink()
    Image.fromarray(np.zeros((7, 5), np.uint8)).save(root / 'a' / 'odd.png')
    with pytest.raises(ValueError, match=r'a/odd.png: shape \(7, 5, 1\)'):
        D.load_images(str(root))
    with pytest.raises(UserError, match='nothing: data source not found'):
        D.load_images(str(tmp_path / 'nothing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no .png'):
        D.load_images(str(tmp_path / 'empty'))


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), np.array([0, 5, 2, 2])
    np.savez(tmp_path / 'a.npz', images=images, labels=labels)
    d = D.load_images(str(tmp_path / 'a.npz'))
    np.testing.assert_array_equal(d.images, images[..., None])
    np.testing.assert_array_equal(d.labels, labels)
    assert d.num_classes == 6 and d.labels.dtype == np.int32
    np.savez(tmp_path / 'b.npz', images=np.repeat(images[..., None], 3, -1))
    d = D.load_images(str(tmp_path / 'b.npz'))
    assert d.images.shape == (4, 8, 8, 3) and d.labels is None and d.num_classes == 0
    bad = {'float': dict(images=images.astype(np.float32)),
           'length': dict(images=images, labels=labels[:3]),
           'negative': dict(images=images, labels=labels - 1),
           'float_labels': dict(images=images, labels=labels.astype(np.float32)),
           'no_images': dict(x=images)}
    for name, arrays in bad.items():
        np.savez(tmp_path / f'{name}.npz', **arrays)
        with pytest.raises(ValueError, match=f'{name}.npz'):
            D.load_images(str(tmp_path / f'{name}.npz'))


# ---------------------------------------------------------------------------------- resolution
def brute_area_downsample(img, n_out):
    """Each output pixel: Σ input · (overlap area of the two squares) / (output cell area)."""
    n_in = img.shape[0]
    s = n_in / n_out
    out = np.zeros((n_out, n_out))
    for a in range(n_out):
        for b in range(n_out):
            for h in range(n_in):
                for w in range(n_in):
                    oy = max(0.0, min((a + 1) * s, h + 1) - max(a * s, h))
                    ox = max(0.0, min((b + 1) * s, w + 1) - max(b * s, w))
                    out[a, b] += img[h, w] * oy * ox
    return out / s ** 2


def test_area_downsample_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    w = D.area_weights(28, 16)
    assert w.shape == (16, 28)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 16 / 28, atol=1e-12)   # every input pixel counted fully
    y = D.resize(x, 16)
    assert y.shape == (2, 16, 16, 1) and y.dtype == np.uint8
    for i in range(2):
        ref = brute_area_downsample(x[i, :, :, 0].astype(np.float64), 16)
        np.testing.assert_allclose(w @ x[i, :, :, 0] @ w.T, ref, atol=1e-9)
        assert abs(ref.mean() - x[i].mean()) < 1e-9                   # area averaging keeps the mean
        assert np.abs(y[i, :, :, 0].astype(float) - ref).max() <= 0.5 + 1e-9
    assert abs(y.mean() - x.mean()) < 0.1
    np.testing.assert_array_equal(D.resize(np.full((1, 28, 28, 1), 77, np.uint8), 16), 77)


def test_padding_and_inverses():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    ref = np.zeros((3, 32, 32, 1), np.uint8)
    ref[:, 2:30, 2:30] = x
    np.testing.assert_array_equal(D.resize(x, 32), ref)
    np.testing.assert_array_equal(D.crop_padding(ref, to=28), x)
    np.testing.assert_array_equal(D.restore_resolution(ref), x)
    assert D.resize(x, None) is x and D.resize(x, 28) is x
    for size, res in ((28, 20), (28, 64), (32, 16), (16, 32)):
        with pytest.raises(ValueError, match='unsupported resolution'):
            D.resize(np.zeros((1, size, size, 1), np.uint8), res)
    with pytest.raises(ValueError, match='crop'):
        D.crop_padding(np.zeros((1, 31, 31, 1), np.uint8), to=28)


def test_upsample_is_bilinear():
    import jax
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    ref = np.asarray(jax.image.resize(x, (2, 28, 28, 3), 'bilinear'))   # half-pixel centres
    np.testing.assert_allclose(D.upsample(x, 28), ref, atol=1e-3)
    xu = x.astype(np.uint8)
    np.testing.assert_array_equal(D.restore_resolution(xu), D.upsample(xu))
    assert D.upsample(xu).dtype == np.uint8
    np.testing.assert_array_equal(D.upsample(np.full((1, 16, 16, 1), 200, np.uint8)), 200)
    np.testing.assert_allclose(D.bilinear_weights(16, 28).sum(1), 1, atol=1e-12)
    with pytest.raises(ValueError, match='larger'):
        D.upsample(np.zeros((1, 32, 32, 1), np.uint8), 28)


# ------------------------------------------------------------------------------ values, batches
def test_value_ranges():
    v = np.arange(256, dtype=np.uint8)
    f = D.to_model_range(v)
    assert f.dtype == np.float32 and f[0] == -1 and f[255] == 1
    np.testing.assert_allclose(f, v / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(D.to_uint8(f), v)
    np.testing.assert_array_equal(D.to_uint8(np.array([-3.0, 5.0, 0.0, 0.003])), [0, 255, 128, 128])


def reference_stream(n, seed, epochs):
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])


@pytest.mark.parametrize('n, b', [(10, 4), (3, 7), (12, 12)])
def test_batch_indices_stream(n, b):
    steps = 6
    batches = [D.batch_indices(n, b, 5, s) for s in range(steps)]
    assert all(x.dtype == np.int64 and x.shape == (b,) for x in batches)
    flat = np.concatenate(batches)
    np.testing.assert_array_equal(flat, reference_stream(n, 5, -(-steps * b // n))[:steps * b])
    for e in range(steps * b // n):                                  # every full epoch is a permutation
        np.testing.assert_array_equal(np.sort(flat[e * n:(e + 1) * n]), np.arange(n))


def test_batch_indices_pure_and_seeded():
    a = D.batch_indices(1000, 64, 0, 20)                             # spans epochs 1 and 2
    for s in range(30):                                              # evict any cached permutations
        D.batch_indices(1000, 64, s + 1, s)
    np.testing.assert_array_equal(D.batch_indices(1000, 64, 0, 20), a)
    assert not np.array_equal(D.batch_indices(1000, 64, 1, 20), a)
    # step 2 of (N=10, B=4) = epoch 0 positions 8, 9 then epoch 1 positions 0, 1
    p0, p1 = np.random.default_rng([3, 0]).permutation(10), np.random.default_rng([3, 1]).permutation(10)
    np.testing.assert_array_equal(D.batch_indices(10, 4, 3, 2), [p0[8], p0[9], p1[0], p1[1]])
    for bad in ((0, 4, 0, 0), (10, 0, 0, 0), (10, 4, -1, 0), (10, 4, 0, -1)):
        with pytest.raises(ValueError, match='batch_indices'):
            D.batch_indices(*bad)

"""Fashion-MNIST evaluator: a briefly trained classifier in a temporary cache, checked against
numbers computed independently here (numpy counts, exact crops, closed-form FD of equal statistics)."""
import dataclasses

import numpy as np
import pytest

from edm2_jax import data
from edm2_jax.metrics import fmnist
from edm2_jax.metrics.frechet import load_refs

# 80 Adam steps of 64 images (~1/12 epoch). Measured on this architecture: 30 such steps reach 70.9 %
# test accuracy, 100 steps of 128 reach 76-82 %. So > 60 % (6× chance) has a wide margin, yet fails
# for a broken loss, shuffled labels or a dead optimiser (which stay near 10 %).
QUICK = fmnist.TrainSettings(steps=80, batch_size=64)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('fmnist_eval')


@pytest.fixture(scope='module')
def evaluator(cache):
    return fmnist.load_or_train_evaluator(cache, QUICK, log=None)


@pytest.fixture(scope='module')
def test_split():
    return data.load_fashion_mnist('test')


@pytest.fixture(scope='module')
def refs28(evaluator, cache):
    return fmnist.reference_stats(evaluator, cache, 28)


def test_training_far_above_chance(evaluator, test_split):
    images, labels = test_split
    assert evaluator.meta['settings'] == dataclasses.asdict(QUICK)
    correct = sum(int(p == y) for p, y in zip(np.argmax(evaluator.logits(images), 1), labels))
    assert evaluator.test_accuracy == correct / len(labels)
    assert evaluator.test_accuracy > 0.6


def test_cache_reload_is_bit_identical(evaluator, cache, refs28, test_split):
    images = test_split[0][:600]     # more than one batch of 500: also checks batch padding
    again = fmnist.load_or_train_evaluator(
        cache, QUICK, log=lambda msg: pytest.fail(f'retrained instead of loading: {msg}'))
    assert again.fingerprint == evaluator.fingerprint
    f1, l1 = evaluator.features_and_logits(images)
    f2, l2 = again.features_and_logits(images)
    assert f1.shape == (600, fmnist.FEATURE_DIM) and f1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(evaluator.features(images[550:560]), f1[550:560])  # position-independent
    cached = fmnist.reference_stats(again, cache, 28)
    np.testing.assert_array_equal(cached.features, refs28.features)
    np.testing.assert_array_equal(cached.features[:600], f1)
    # The EDM2-format file holds the same statistics, computed here with numpy.
    pkl = load_refs(cache / 'fmnist-test-28.pkl')
    f = refs28.features.astype(np.float64)
    assert pkl['num_images'] == 10000
    np.testing.assert_allclose(pkl['fd_fmnist']['mu'], f.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pkl['fd_fmnist']['sigma'], np.cov(f, rowvar=False), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match='trained with'):
        fmnist.load_or_train_evaluator(cache, dataclasses.replace(QUICK, steps=81), log=None)


def test_a_set_against_its_own_statistics(evaluator, refs28, test_split):
    """2,000 test images against statistics of their own features (NumPy mean and covariance; the
    reference features are the test split's, in order): FD 0, precision = recall = 1, and KID at its
    expectation for two subsets of one set of n rows, −(2/n)·(mean k(x, x) − mean over distinct pairs
    of k(x, y)) (a shared row enters the cross term; kernel (x·y/d + 1)³ on the features standardized by
    the reference mean and standard deviations, written here)."""
    n = 2000
    images, labels = test_split[0][:n], test_split[1][:n]
    f = refs28.features[:n].astype(np.float64)
    own = refs28._replace(features=refs28.features[:n], labels=refs28.labels[:n], mu=f.mean(0),
                          sigma=np.cov(f, rowvar=False))
    r = fmnist.evaluate_images(evaluator, images, labels, own)
    assert abs(r['fd_fmnist']) < 1e-6 * np.trace(own.sigma)
    assert r['precision'] == 1.0 and r['recall'] == 1.0
    z = (f - own.mu) / np.sqrt(np.diag(own.sigma))          # KID's standardized features
    gram = (z @ z.T / z.shape[1] + 1) ** 3
    diagonal, off = np.diag(gram).mean(), (gram.sum() - np.trace(gram)) / (n * (n - 1))
    assert abs(r['kid'] + 2 / n * (diagonal - off)) < 4 * r['kid_std'] / np.sqrt(100)
    assert r['class_accuracy'] == np.mean(np.argmax(evaluator.logits(images), 1) == labels)
    assert r['num_images'] == n


def test_exact_images_beat_noised_ones(evaluator, refs28, test_split):
    images, labels = test_split[0][:1000], test_split[1][:1000]
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 60, images.shape), 0, 255).astype(np.uint8)
    exact = fmnist.evaluate_images(evaluator, images, labels, refs28)
    noised = fmnist.evaluate_images(evaluator, noisy, labels, refs28)
    assert exact['fd_fmnist'] < 0.5 * noised['fd_fmnist']
    assert exact['precision'] > noised['precision'] + 0.1
    assert exact['kid'] < 0.5 * noised['kid'] and noised['kid'] > 5 * noised['kid_std'] / 10
    assert exact['class_accuracy'] > noised['class_accuracy']


def test_class_accuracy_is_the_fraction_of_requested_labels_hit(evaluator, refs28, test_split):
    images = test_split[0][:200]
    predicted = np.argmax(evaluator.logits(images), 1)
    requested = predicted.copy()
    requested[::4] = (predicted[::4] + 1) % 10          # exactly 50 of 200 requests missed
    few = refs28._replace(features=refs28.features[:500])     # precision/recall are not under test here
    assert fmnist.evaluate_images(evaluator, images, requested, few)['class_accuracy'] == 0.75
    assert fmnist.evaluate_images(evaluator, images, None, few)['class_accuracy'] is None


def test_resolution_round_trips(evaluator, cache, refs28, test_split):
    images, labels = test_split
    np.testing.assert_array_equal(fmnist.round_trip(images[:50], 32), images[:50])   # pad, crop: exact
    refs32 = fmnist.reference_stats(evaluator, cache, 32)
    np.testing.assert_array_equal(refs32.features, refs28.features)
    padded = np.zeros((100, 32, 32, 1), np.uint8)
    padded[:, 2:30, 2:30] = images[:100]                 # padding written out independently
    few = lambda refs: refs._replace(features=refs.features[:500])  # noqa: E731  (k-NN cost)
    r32 = fmnist.evaluate_images(evaluator, padded, labels[:100], few(refs32))
    r28 = fmnist.evaluate_images(evaluator, images[:100], labels[:100], few(refs28))
    assert r32 == r28
    # 16×16: the references are the test features after the same round trip (here with data.upsample
    # directly), so the test set is again at distance 0; against the 28×28 statistics the round trip shows.
    small = data.resize(images, 16)
    assert small.shape == (10000, 16, 16, 1)
    back = fmnist.round_trip(images[:1000], 16)
    assert back.shape == (1000, 28, 28, 1) and back.dtype == np.uint8
    assert 0 < np.abs(back.astype(int) - images[:1000]).mean() < 25
    refs16 = fmnist.reference_stats(evaluator, cache, 16)
    np.testing.assert_array_equal(refs16.features[:500], evaluator.features(data.upsample(small[:500])))
    assert not np.array_equal(refs16.mu, refs28.mu)
    exact = fmnist.evaluate_images(evaluator, images[:1000], labels[:1000], few(refs28))
    unfair = fmnist.evaluate_images(evaluator, back, labels[:1000], few(refs28))
    assert unfair['fd_fmnist'] > 2 * exact['fd_fmnist']
    assert (cache / 'fmnist-test-16.pkl').exists() and (cache / 'fmnist-test-16-features.npz').exists()


def test_bad_input_is_a_clear_error(evaluator, refs28, test_split):
    images, labels = test_split[0][:10], test_split[1][:10]
    with pytest.raises(ValueError, match='uint8'):
        fmnist.evaluate_images(evaluator, images.astype(np.float32), labels, refs28)
    with pytest.raises(ValueError, match=r'\[N, r, r, 1\]'):
        fmnist.evaluate_images(evaluator, images[..., 0], labels, refs28)
    with pytest.raises(ValueError, match=r'\[N, r, r, 1\]'):
        fmnist.evaluate_images(evaluator, np.zeros((10, 24, 24, 1), np.uint8), labels, refs28)
    with pytest.raises(ValueError, match=r'\[N, r, r, 1\]'):
        evaluator.features(np.zeros((10, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match='resolution 28'):
        fmnist.evaluate_images(evaluator, data.resize(images, 16), labels, refs28)
    with pytest.raises(ValueError, match='lie in'):
        fmnist.evaluate_images(evaluator, images, labels + 10, refs28)
    with pytest.raises(ValueError, match='shape'):
        fmnist.evaluate_images(evaluator, images, labels[:5], refs28)
    with pytest.raises(ValueError, match='more than k'):
        fmnist.evaluate_images(evaluator, images[:3], labels[:3], refs28)
    with pytest.raises(ValueError, match='resolution must be'):
        fmnist.reference_stats(evaluator, '/nonexistent', 20)
    with pytest.raises(ValueError, match='invalid'):
        fmnist.TrainSettings(steps=0)

"""Image sample metrics: the feature classifier, each metric against a closed form or an
extreme case, and the real-vs-real floor against noise."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.linalg

from genjax.data import images
from genjax.metrics import images as metrics


@pytest.fixture(scope="module")
def digits():
    return images.load("digits")


@pytest.fixture(scope="module")
def classifier(digits):
    return metrics.train_classifier(digits)


def test_classifier_is_accurate_cached_and_deterministic(digits, classifier):
    assert classifier.test_accuracy >= 0.95
    assert metrics.train_classifier(digits) is classifier
    x_unit = images.to_unit(digits.test[:7], 17)
    assert classifier.features(x_unit).shape == (7, 128)
    np.testing.assert_allclose(classifier.probs(x_unit).sum(axis=1), 1, rtol=1e-5)
    # A renamed copy is another cache entry, so this trains twice from seed 0.
    short = metrics.train_classifier(digits, steps=20)
    again = metrics.train_classifier(dataclasses.replace(digits, name="copy"), steps=20)
    assert again is not short
    np.testing.assert_array_equal(short.params["out"]["w"], again.params["out"]["w"])
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None)
    with pytest.raises(ValueError, match="need labelled images"):
        metrics.train_classifier(unlabelled)


def _with_moments(rng, n: int, mean_F: np.ndarray, cov_FF: np.ndarray) -> np.ndarray:
    """n points whose sample mean and covariance are exactly ``mean_F`` and ``cov_FF``."""
    z = rng.standard_normal((n, len(mean_F)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov_FF).T + mean_F


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    F = 6
    a = _with_moments(rng, 500, np.zeros(F), np.eye(F))
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    delta = np.arange(F) / 2
    b = _with_moments(rng, 300, delta, np.eye(F))
    assert metrics.frechet_distance(a, b) == pytest.approx(np.sum(delta**2), rel=1e-9)
    # Diagonal covariances: tr(Σa + Σb − 2(ΣaΣb)^½) = Σ (σa − σb)².
    std_a, std_b = np.linspace(0.5, 2, F), np.linspace(3, 1, F)
    c = _with_moments(rng, 400, np.zeros(F), np.diag(std_a**2))
    d = _with_moments(rng, 400, delta, np.diag(std_b**2))
    want = np.sum(delta**2) + np.sum((std_a - std_b) ** 2)
    assert metrics.frechet_distance(c, d) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_equals_the_sqrtm_formula():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((150, 5)) @ rng.standard_normal((5, 5)) + 1
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    mean_term = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    want = mean_term + np.trace(cov_a + cov_b - 2 * root)
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-8)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 400, 16))
    same = metrics.kid(a, b, subsets=20, subset_size=200)
    shifted = metrics.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 0.01 < shifted
    # Unbiased: the mean over pairs of independent sets sits at zero.
    pairs = [metrics.kid(*rng.standard_normal((2, 100, 4)), subsets=1) for _ in range(50)]
    assert abs(np.mean(pairs)) < 3 * np.std(pairs) / math.sqrt(50)


def test_precision_recall_extremes():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 8))
    assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    far = metrics.precision_recall(real, real + 100)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Samples of one of two far-apart clusters: precise, but recall a half.
    two = np.concatenate([real, real + 100])
    assert metrics.precision_recall(two, real) == {"precision": 1.0, "recall": 0.5}


def test_density_and_coverage_of_one_distribution():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((2, 1000, 8))
    scores = metrics.density_coverage(real, fake)
    assert abs(scores["density"] - 1) < 0.15 and scores["coverage"] > 0.9
    far = metrics.density_coverage(real, fake + 100)
    assert far == {"density": 0.0, "coverage": 0.0}


def test_class_histogram_and_conditional_accuracy():
    one_class = np.eye(10)[np.full(50, 3)]
    scores = metrics.class_histogram_metrics(one_class, 10)
    assert scores["class_coverage"] == pytest.approx(0.1)
    assert scores["class_kl"] == pytest.approx(math.log(10))
    balanced = metrics.class_histogram_metrics(np.eye(10)[np.arange(50) % 10], 10)
    assert balanced == {"class_coverage": 1.0, "class_kl": 0.0}
    probs = np.eye(10)[[1, 2, 3, 4]]
    assert metrics.conditional_accuracy(probs, np.array([1, 2, 0, 0])) == 0.5


def test_real_floor_is_far_better_than_noise(digits, classifier):
    floor = metrics.real_floor(digits, classifier, 360)
    noise_unit = np.random.default_rng(0).uniform(-1, 1, (360, 8, 8, 1))
    noise = metrics.image_metrics(noise_unit, digits, classifier)
    spread = {"frechet_distance_min", "frechet_distance_max"}
    assert set(floor) == {*noise, "conditional_accuracy", *spread}
    assert floor["frechet_distance"] < noise["frechet_distance"] / 50
    assert floor["kid"] < noise["kid"] / 50
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8 and floor["coverage"] > 0.9
    assert noise["precision"] < 0.1 and noise["coverage"] < 0.1
    assert floor["class_coverage"] == 1.0 and floor["class_kl"] < 0.05
    # Class-conditional scoring: real test images drawn "for" their own labels.
    test_unit = images.to_unit(digits.test, 17)
    scored = metrics.image_metrics(test_unit, digits, classifier, labels=digits.test_labels)
    assert scored["conditional_accuracy"] == pytest.approx(classifier.test_accuracy)


def test_real_floor_is_the_mean_of_its_draws(digits, classifier):
    """Each draw is one seed's set of train images: the floor of 3 draws at seed 4 is the
    mean of the one-draw floors at seeds 4, 5 and 6, their FDs its spread."""
    one_draw = [metrics.real_floor(digits, classifier, 200, seed=s, draws=1) for s in (4, 5, 6)]
    floor = metrics.real_floor(digits, classifier, 200, seed=4, draws=3)
    fds = [f["frechet_distance"] for f in one_draw]
    assert len(set(fds)) == 3  # the draws differ
    for key in ("frechet_distance", "kid", "precision", "recall", "coverage"):
        assert floor[key] == pytest.approx(np.mean([f[key] for f in one_draw]), rel=1e-6)
    assert (floor["frechet_distance_min"], floor["frechet_distance_max"]) == (min(fds), max(fds))
    with pytest.raises(ValueError, match="draws=0; the floor needs at least one set"):
        metrics.real_floor(digits, classifier, 200, draws=0)


def test_bad_counts_and_shapes(digits, classifier):
    with pytest.raises(ValueError, match=r"needs 2\.\.1437 train images"):
        metrics.real_floor(digits, classifier, 1438)
    with pytest.raises(ValueError, match=r"expected \[N ≥ 2, \*\(8, 8, 1\)\]"):
        metrics.image_metrics(np.zeros((10, 8, 8)), digits, classifier)

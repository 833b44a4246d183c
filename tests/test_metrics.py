"""Sample-quality metrics on known cases."""

import math

import numpy as np
import pytest

from fastguide import metrics


def test_fid_of_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert metrics.fid(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_analytic_value_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = metrics.frechet_distance(
        metrics.GaussianStats(mu1, np.diag(s1)), metrics.GaussianStats(mu2, np.diag(s2))
    )
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_of_sampled_gaussians_approaches_the_analytic_value():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 4))
    b = rng.normal(0.5, 2.0, size=(20000, 4))
    expected = 4 * 0.5**2 + 4 * (1 + 4 - 2 * 2)  # ‖Δμ‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½)
    assert metrics.fid(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_with_singular_covariances_stays_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 10)), rng.normal(size=(3, 10))  # 3 samples in 10 dims: rank-2 covariances
    with pytest.warns(UserWarning, match="singular .* adding 1e-06 to both diagonals"):
        value = metrics.fid(a, b)
    assert math.isfinite(value) and value >= 0


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 2 samples to estimate a covariance, got 1"):
        metrics.fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid(np.full((4, 2), np.nan), np.zeros((4, 2)))


def test_inception_score_known_cases():
    k = 10
    assert metrics.inception_score(np.full((50, k), 1 / k)) == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(100) % k]
    assert metrics.inception_score(one_hot) == pytest.approx(k)
    assert metrics.inception_score(one_hot, splits=5) == pytest.approx(k)
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(np.ones((4, 3)))


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 5))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)


def test_precision_recall_detects_mode_collapse():
    rng = np.random.default_rng(4)
    real = np.concatenate([rng.normal(-5, 1, size=(200, 2)), rng.normal(5, 1, size=(200, 2))])
    collapsed = rng.normal(-5, 1, size=(400, 2))  # one of two modes
    p, r = metrics.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.6


def test_class_accuracy():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert metrics.class_accuracy(probs, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_inception_score_over_chunks_of_a_split_size_as_adms_evaluator():
    from fastguide.metrics import inception_score

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=12)
    want = np.mean([inception_score(probs[:5]), inception_score(probs[5:10]), inception_score(probs[10:])])
    assert inception_score(probs, split_size=5) == pytest.approx(want, rel=1e-12)
    assert inception_score(probs, split_size=100) == inception_score(probs)
    with pytest.raises(ValueError, match="split_size must be positive"):
        inception_score(probs, split_size=0)

"""Sample-quality metrics on feature vectors and class probabilities: FID, IS, improved precision and
recall, class accuracy. Pure functions over arrays; which network makes the features is the caller's.

* FID (Heusel et al., 2017): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), with ``scipy.linalg.sqrtm``.
* IS (Salimans et al., 2016): exp E_x KL(p(y|x) ‖ p(y)), averaged over splits.
* Improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of balls
  reaching every feature's k-th nearest neighbour (k = 3); precision is the share of generated
  features inside the real manifold, recall the share of real features inside the generated one.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

# added to both covariance diagonals when their product has no finite square root (singular covariances)
FID_EPSILON = 1e-6
# imaginary parts of sqrtm below this (relative to the trace term) are rounding noise and dropped
SQRTM_IMAG_TOLERANCE = 1e-3
# neighbours of the improved precision/recall manifolds (the paper's k)
PR_K = 3


class GaussianStats(NamedTuple):
    mu: np.ndarray  # (D,) mean
    sigma: np.ndarray  # (D, D) covariance


def feature_stats(features: np.ndarray) -> GaussianStats:
    """Mean and covariance of (N, D) features (float64).

    Raises:
        ValueError: fewer than 2 samples, or not a 2-D array, or non-finite values.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf")
    return GaussianStats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = FID_EPSILON) -> float:
    """Fréchet distance between two Gaussians (FID when the statistics are of network features).

    When Σ₁Σ₂ is singular (e.g. fewer samples than dimensions: sqrtm warns or gives a non-finite
    result), ``eps`` is added to both diagonals, with a one-line warning. A complex square root whose
    imaginary part is more than ``SQRTM_IMAG_TOLERANCE`` of the trace term is an error.
    """
    from scipy import linalg

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    singular = singular or _singular(a.sigma) or _singular(b.sigma)
    if singular or not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: the covariance product is singular (e.g. fewer samples than the {a.mu.shape[0]} feature "
            f"dimensions); adding {eps} to both diagonals",
            stacklevel=2,
        )
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        scale = max(1.0, np.abs(np.trace(covmean.real)))
        if imag > SQRTM_IMAG_TOLERANCE * scale:
            raise ValueError(f"the matrix square root in FID is complex (max imaginary part {imag:.3g})")
        covmean = covmean.real
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    return float(max(value, 0.0))


def _singular(sigma: np.ndarray) -> bool:
    """Whether a covariance is (numerically) rank-deficient, as with no more samples than dimensions."""
    eig = np.linalg.eigvalsh(sigma)
    return bool(eig.min() <= 1e-10 * max(float(eig.max()), 1e-300))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(feature_stats(features_a), feature_stats(features_b))


def inception_score(probs: np.ndarray, splits: int = 1, split_size: int | None = None) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) from (N, K) class probabilities, averaged over ``splits`` equal chunks, or
    over consecutive chunks of ``split_size`` rows (the last one shorter), as ADM's evaluator (5000)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, K) probabilities with N >= splits >= 1, got shape {p.shape} and {splits} splits")
    if split_size is not None and split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1, atol=1e-4):
        raise ValueError("probs must be finite, non-negative rows that sum to 1")
    parts = np.array_split(p, splits) if split_size is None else [p[i : i + split_size] for i in range(0, len(p), split_size)]
    scores = []
    for part in parts:
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise_distances(features, features)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


class PrecisionRecall(NamedTuple):
    precision: float  # share of generated samples inside the real manifold
    recall: float  # share of real samples inside the generated manifold


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = PR_K) -> PrecisionRecall:
    """Improved precision and recall with k-nearest-neighbour manifolds (k = 3 as in the paper).

    Raises:
        ValueError: a set has k samples or fewer, or the feature dimensions differ.
    """
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    for name, f in (("real", real), ("generated", generated)):
        if f.ndim != 2 or f.shape[0] <= k:
            raise ValueError(f"{name} features must be (N, D) with N > k = {k}, got shape {f.shape}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {generated.shape[1]}")
    real_radii, gen_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(generated, k)
    d = _pairwise_distances(generated, real)  # (N_gen, N_real)
    precision = (d <= real_radii[None, :]).any(axis=1).mean()
    recall = (d.T <= gen_radii[None, :]).any(axis=1).mean()
    return PrecisionRecall(float(precision), float(recall))


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose most probable class is their label."""
    p, y = np.asarray(probs), np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"expected probs (N, K) and labels (N,), got {p.shape} and {y.shape}")
    return float((p.argmax(axis=1) == y).mean())

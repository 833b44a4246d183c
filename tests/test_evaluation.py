"""The evaluator in the embedded evaluation network's feature space, on known cases."""

import numpy as np
import pytest

from fastguide.evaluation import Evaluator, EvalNetFeatures, reference_images
from fastguide.train.data import mnist5k


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator()


def test_the_reference_set_scored_against_itself(evaluator):
    ref = reference_images()
    labels = mnist5k("heldout").labels.numpy()
    s = evaluator(ref, labels)
    assert s.fid == pytest.approx(0.0, abs=1e-6)
    assert s.precision == 1.0 and s.recall == 1.0
    assert s.class_accuracy >= 0.98  # the shipped evaluation network's held-out accuracy
    assert s.inception_score > 8.5  # confident, and the 10 classes are balanced (50 each)


def test_features_are_the_pooled_last_feature_map():
    import torch

    feats = EvalNetFeatures()
    images = reference_images()[:7]
    seen = []
    feats.net.out[1].register_forward_hook(lambda m, i, o: seen.append(o.mean(dim=(2, 3)).double().numpy()))
    f, p = feats(images)
    assert f.shape == (7, 64) and p.shape == (7, 10)
    np.testing.assert_allclose(f, seen[0], rtol=1e-6)  # GroupNorm + SiLU of the last feature map, averaged
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        logits = feats.net(x, torch.zeros(7, dtype=torch.long)).double()
    np.testing.assert_allclose(p, torch.softmax(logits, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    f2, _ = feats(images[::-1].copy())
    np.testing.assert_allclose(f2[::-1], f, rtol=1e-5, atol=1e-6)  # per-image, not per-batch


def test_one_class_collapse_is_caught(evaluator):
    ref, labels = reference_images(), mnist5k("heldout").labels.numpy()
    ones = ref[labels == 1]
    s = evaluator(ones, np.ones(len(ones), dtype=np.int64))
    full = evaluator(ref[::2], labels[::2])
    assert s.fid > 100 * full.fid and s.inception_score < 1.5 and full.inception_score > 9


def test_wrong_labels_lower_class_accuracy(evaluator):
    ref, labels = reference_images(), mnist5k("heldout").labels.numpy()
    assert evaluator(ref, (labels + 1) % 10).class_accuracy < 0.05

"""The evaluation network (a ResNet of another family than the guidance classifiers), its augmentation, the image
statistics of evaluate, and the choice of evaluation network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastguide.evaluation import (
    EVAL_NETS,
    Evaluator,
    EvalNetFeatures,
    ResNetFeatures,
    mean_intensity,
    nonblack_background,
    reference_images,
)
from fastguide.evalnet import ResNetJudge, augment
from fastguide.pretrained import embedded_dir, load_embedded
from fastguide.train.data import mnist5k


def test_the_shipped_evaluation_network_has_its_recorded_held_out_accuracy():
    net = load_embedded("eval_resnet")
    assert isinstance(net, ResNetJudge) and not net.training
    config = json.loads((embedded_dir("eval_resnet") / "config.json").read_text())
    held = mnist5k("heldout")
    with torch.no_grad():
        pred = net(held.pixels.float() / 127.5 - 1).argmax(1)
    accuracy = (pred == held.labels).float().mean().item()
    assert accuracy == pytest.approx(config["heldout_accuracy"], abs=0.004)  # 2 of 500: other CPUs round differently
    assert accuracy >= 0.97
    views = augment(held.pixels.float() / 127.5 - 1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        robust = (net(views).argmax(1) == held.labels).float().mean().item()
    assert robust >= 0.9  # shifted, rotated, dimmed, noisy digits are still read


def test_augment_is_seeded_in_range_and_moves_digits():
    x = mnist5k("heldout").pixels[:16].float() / 127.5 - 1
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().mean() > 0.05
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))


def test_resnet_features_and_spatial_maps():
    feats = ResNetFeatures()
    images = reference_images()[:6]
    f, p = feats(images)
    assert f.shape == (6, 128) and p.shape == (6, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        pooled, half = feats.net.trunk(x)
    np.testing.assert_allclose(f, pooled.double().numpy(), rtol=1e-6)
    assert half.shape[-1] == 16
    want = torch.nn.functional.adaptive_avg_pool2d(half[:, :7], 4).flatten(1).double().numpy()
    np.testing.assert_allclose(feats.spatial(images), want, rtol=1e-6)


def test_the_resnet_is_the_default_judge_and_the_earlier_network_stays_selectable():
    images, labels = reference_images()[:50], mnist5k("heldout").labels.numpy()[:50]
    default = Evaluator()
    assert isinstance(default.classifier, ResNetFeatures) and default(images, labels).feature_space == "resnet"
    earlier = Evaluator(eval_net="eval-unet")
    assert isinstance(earlier.classifier, EvalNetFeatures) and earlier(images, labels).feature_space == "eval-net"
    assert sorted(EVAL_NETS) == ["eval-unet", "resnet"]
    with pytest.raises(ValueError, match="unknown evaluation network 'lenet'"):
        Evaluator(eval_net="lenet")


def test_image_statistics():
    black = np.zeros((10, 32, 32, 1), np.uint8)
    black[:, 8:24, 12:20] = 255  # a stroke in the middle
    grey = black.copy()
    grey[:3, :6] = 120  # 3 samples with a grey top: 144 of the frame's 448 pixels at 120/255, a mean of 0.15
    assert nonblack_background(black) == 0.0
    assert nonblack_background(grey) == pytest.approx(0.3)
    assert mean_intensity(black) == pytest.approx(16 * 8 / 1024)
    scores = Evaluator()(reference_images()[:50])
    assert scores.nonblack_background == 0.0  # MNIST's frame is black
    assert scores.reference_mean_intensity == pytest.approx(mean_intensity(reference_images()))

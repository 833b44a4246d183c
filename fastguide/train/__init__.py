"""Training: noise-aware classifiers (ECT) and diffusion models, on one process or torchrun DDP.

``train_classifier`` and ``train_diffusion`` are the entry points (``fastguide train-classifier`` and
``fastguide train-diffusion`` on the command line).
"""

from .data import ImageDataset, image_folder, mnist5k
from .loop import TrainConfig, TrainResult
from .tasks import ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion

__all__ = [
    "ClassifierTrainConfig",
    "DiffusionTrainConfig",
    "ImageDataset",
    "TrainConfig",
    "TrainResult",
    "image_folder",
    "mnist5k",
    "train_classifier",
    "train_diffusion",
]

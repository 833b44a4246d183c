"""What the trainer's tests share (test_train.py, test_pretrained.py): the tiny classifier and UNet flags
they train, and a Subset that keeps the dataset attributes the trainer reads."""

from __future__ import annotations

import dataclasses

import torch

from fastguide.adm import ClassifierFlags
from fastguide.train.tasks import DEFAULT_UNET

TINY_CLF = ClassifierFlags(
    image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
    channel_mult="1,2", in_channels=1, num_classes=10, num_head_channels=32,
)  # fmt: skip
TINY_UNET = dataclasses.replace(
    DEFAULT_UNET, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16"
)


class _Sized(torch.utils.data.Dataset):
    """A Subset that keeps the dataset attributes the trainer reads (channels, num_classes)."""

    def __init__(self, subset):
        self.subset = subset
        base = subset.dataset
        self.channels, self.num_classes, self.image_size = base.channels, base.num_classes, base.image_size

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, i):
        return self.subset[i]

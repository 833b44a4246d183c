"""The evaluation network: a small ResNet trained on clean, augmented digits, to judge samples.

It is deliberately of another family than the guidance classifiers (ADM's EncoderUNet, noise-aware,
timestep-conditioned): guidance optimises those classifiers' features, and a judge that shares their
architecture and training would be fooled by the same adversarial directions. This one is a plain
ResNet (3 stages of 2 basic blocks, BatchNorm, global average pooling), trained with shifts, small
rotations, intensity and contrast jitter and pixel noise (:func:`augment`).

Inputs are images in [-1, 1] (B, C, H, W); ``forward`` gives logits, :meth:`ResNetJudge.features` the
pooled last feature map and :meth:`ResNetJudge.spatial_map` the half-resolution map (for sFID).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """A basic residual block: two 3×3 convolutions with BatchNorm, a projected shortcut where shapes change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetJudge(nn.Module):
    """A ResNet for small images: stem, stages at full, half and quarter resolution, pooled features, logits.

    Args:
        in_channels: image channels.  image_size: side of the square input.  num_classes: outputs.
        width: channels of the first stage (doubled at each of the next two).  blocks: blocks per stage.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, num_classes: int = 10, width: int = 32,
                 blocks: int = 2):  # fmt: skip
        super().__init__()
        self.in_channels, self.image_size, self.out_channels = in_channels, image_size, num_classes
        self.width, self.blocks = width, blocks
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i in range(3):
            cout = width * 2**i
            stages.append(nn.Sequential(*[_Block(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(blocks)]))  # fmt: skip
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.width * 4

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (B, 4·width), the half-resolution map (B, 2·width, H/2, W/2))."""
        h = self.stages[0](self.stem(x))
        half = self.stages[1](h)
        return self.stages[2](half).mean(dim=(2, 3)), half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)[0])

    def config(self) -> dict:
        return dict(in_channels=self.in_channels, image_size=self.image_size, num_classes=self.out_channels,
                    width=self.width, blocks=self.blocks)  # fmt: skip


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random training views of images in [-1, 1] (B, C, H, W), all drawn from ``generator``:

    * a rotation of up to ±15° and a shift of up to ±3 pixels (one affine warp, bilinear, background −1);
    * contrast × U(0.6, 1.2) and brightness + U(−0.15, 0.15) of full scale on [0, 1];
    * pixel noise N(0, σ²) with σ ~ U(0, 0.1) per image; then clamped to [−1, 1].
    """
    b, _, h, w = x.shape

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-15, 15) * (math.pi / 180)
    shift = torch.stack([uniform(-3, 3) * 2 / w, uniform(-3, 3) * 2 / h], dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    u = (warped + 1) / 2
    u = u * uniform(0.6, 1.2).view(-1, 1, 1, 1) + uniform(-0.15, 0.15).view(-1, 1, 1, 1)
    u = u + uniform(0, 0.1).view(-1, 1, 1, 1) * torch.randn(u.shape, generator=generator)
    return (u.clamp(0, 1) * 2 - 1).to(x.dtype)

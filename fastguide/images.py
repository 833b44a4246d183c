"""Turning samples into image bytes; a NaN never becomes a pixel."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) samples in [-1, 1] → (B, H, W, C) uint8, as ADM's sample scripts (NHWC for .npz).

    Raises:
        FloatingPointError: a sample holds NaN or inf (names the first such sample).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise FloatingPointError(f"sample {int((~finite).nonzero()[0, 0])} holds NaN or inf; refusing to quantise it")
    pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()

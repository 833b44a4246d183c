"""Where the randomness of a sampling run comes from: one generator per sample, or given tensors.

A noise source gives the starting noise x_T and the standard-normal noise of each step.
:class:`PerSampleNoise` draws sample i from its own seeded generator, so sample i is the same
whatever the batch size or its place in the batch (NVlabs/edm's stacked generators).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch


def _seed(seed, position: int) -> int:
    """``seed`` as a Python int in [0, 2**63) (numpy and torch integers accepted), else ValueError."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not 0 <= value < 2**63:
        raise ValueError(f"seed {seed!r} at position {position} is not an integer in [0, 2**63)")
    return value


class PerSampleNoise:
    """Gaussian noise from one ``torch.Generator`` per sample, seeded with ``seeds[i]``."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        seeds = [_seed(s, i) for i, s in enumerate(seeds)]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        )

    def initial(self) -> torch.Tensor:
        """x_T, (B, *shape). Call once, before any :meth:`step`."""
        return self._draw()

    def step(self, k: int) -> torch.Tensor:
        """The noise of the k-th step (drawn in order from each sample's generator)."""
        return self._draw()


class FixedNoise:
    """Noise given as tensors: ``x_T`` (B,C,H,W) and optionally ``steps`` (S,B,C,H,W), one slice per step."""

    def __init__(self, x_T: torch.Tensor, steps: torch.Tensor | None = None):
        if x_T.dim() != 4:
            raise ValueError(f"x_T must be (B, C, H, W), got shape {tuple(x_T.shape)}")
        if steps is not None and (steps.dim() != 5 or steps.shape[1:] != x_T.shape):
            raise ValueError(
                f"step noise must be (steps, {', '.join(map(str, x_T.shape))}), got shape {tuple(steps.shape)}"
            )
        for name, value in (("x_T", x_T), ("step noise", steps)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or inf")
        self.x_T, self.steps = x_T, steps
        self.shape = tuple(x_T.shape[1:])

    def __len__(self) -> int:
        return self.x_T.shape[0]

    def initial(self) -> torch.Tensor:
        return self.x_T.float()

    def step(self, k: int) -> torch.Tensor:
        if self.steps is None:
            raise ValueError("this sampler needs per-step noise, but FixedNoise was given only x_T")
        if k >= self.steps.shape[0]:
            raise ValueError(f"step noise has {self.steps.shape[0]} steps; step {k} was asked for")
        return self.steps[k].float()


class GlobalNoise:
    """Noise from torch's global generator, drawn as ADM's loops draw it: x_T with ``torch.randn(shape)``
    (unless given), then one ``torch.randn_like(x)`` per step. Same seed, same draws as ADM's
    ``p_sample_loop`` / ``ddim_sample_loop`` (a batch's samples then depend on the batch: use
    :class:`PerSampleNoise` where they should not)."""

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu", x_T: torch.Tensor | None = None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must be (B, C, H, W), got {shape!r}")
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"noise has shape {tuple(x_T.shape)}; the shape asked for is {shape}")
        self.batch_shape, self.device, self.x_T = shape, torch.device(device), x_T
        self.shape = shape[1:]

    def __len__(self) -> int:
        return self.batch_shape[0]

    def initial(self) -> torch.Tensor:
        if self.x_T is not None:
            return self.x_T.to(self.device, torch.float32)
        return torch.randn(*self.batch_shape, device=self.device)

    def step(self, k: int) -> torch.Tensor:
        return torch.randn(*self.batch_shape, device=self.device)

"""One guided step (eps-model + classifier forward/backward + EDS + update) on ADM networks.

Run with ``pytest benchmarks/ --benchmark-only``. The fused kernels are measured against this
eager path as they land. Quick mode (benchmarks/conftest.py): each timed once.
"""

import pytest
import torch

import fastguide as fg
from fastguide.adm import EncoderUNetModel, UNetModel


def _nets(size: int):
    torch.manual_seed(0)
    unet = UNetModel(size, 3, 64, 6, 1, (4,), channel_mult=(1, 2, 2), num_head_channels=32,
                     use_scale_shift_norm=True, resblock_updown=True).eval()  # fmt: skip
    clf = EncoderUNetModel(size, 3, 32, 1000, 1, (4,), channel_mult=(1, 2, 2), num_head_channels=32,
                           use_scale_shift_norm=True, resblock_updown=True, pool="attention").eval()  # fmt: skip
    return unet, clf


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_guided_step_eds_32px_batch4(tagged_benchmark, method):
    unet, clf = _nets(32)
    sampler = fg.GuidedSampler(
        unet, clf, fg.Schedule.create("linear", 1000, "ddim25"), fg.EntropyDriven(4.0), fg.SamplerConfig(method=method)
    )
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 2, 3, 4])
    index = torch.full((4,), 12)
    noise = torch.randn_like(x)
    out, _ = tagged_benchmark(sampler.step, x, index, y, noise)
    assert torch.isfinite(out.x_prev).all()


def test_update_only_ddpm_64px_batch8(tagged_benchmark):
    """The pure-torch guided DDPM update alone (the part the fused kernels replace)."""
    from fastguide.kernels.reference import VARIANCE_CODES, guided_ddpm_update_ref

    coefs = fg.Schedule.create("linear", 1000, "250").coefficients(torch.full((8,), 100))
    x, eps, v, g, z = (torch.randn(8, 3, 64, 64) for _ in range(5))
    scale, nonzero = torch.ones(8), torch.ones(8)
    code = VARIANCE_CODES["learned_range"]
    out = tagged_benchmark(guided_ddpm_update_ref, x, eps, v.tanh(), g, scale, z, coefs, nonzero, code, True)
    assert torch.isfinite(out[0]).all()

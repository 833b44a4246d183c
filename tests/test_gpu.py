"""The fast path on a CUDA device: the compiled step replayed as a CUDA graph, bf16 networks, and the golden
ADM trajectories computed on the GPU under the float64 rule. Skipped without CUDA (scripts/gpu_check.sh
runs them on an H100/H200)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastguide as fg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 would round the networks' float32 products to 10 bits: the float64 rule is for float32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _tiny():
    from nets import tiny_nets

    unet, clf = tiny_nets()
    return unet.cuda(), clf.cuda()


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_compiled_step_replays_as_a_cuda_graph_and_matches_eager(method):
    unet, clf = _tiny()
    sched = fg.Schedule.create("linear", 1000, "ddim5")
    fast = fg.GuidedSampler(unet, clf, sched, fg.EntropyDriven(2.0),
                            fg.SamplerConfig(method=method, compile=True, cuda_graphs=True, precision="float32"))  # fmt: skip
    eager = fg.GuidedSampler(unet, clf, sched, fg.EntropyDriven(2.0),
                             fg.SamplerConfig(method=method, compile=False, precision="float32"))  # fmt: skip
    with warnings.catch_warnings(), torch._dynamo.config.patch(error_on_recompile=True):
        warnings.simplefilter("error", UserWarning)  # no eager fallback
        fast.sample([1, 2, 3], seeds=[0, 1, 2])
        got = fast.sample([3, 0, 1], seeds=[5, 6, 7])
    want = eager.sample([3, 0, 1], seeds=[5, 6, 7])
    torch.testing.assert_close(got.images, want.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.trace.scale, want.trace.scale, rtol=1e-4, atol=1e-4)


def test_automatic_fast_path_on_cuda_is_compiled_graphs_and_bfloat16():
    assert fg.SamplerConfig().fast_path(torch.device("cuda")) == (True, True, torch.bfloat16, True)


def test_bfloat16_on_the_gpu_stays_within_the_documented_tolerance():
    from fastguide.pretrained import load_embedded

    unet, clf = load_embedded("cadm").cuda(), load_embedded("classifier_ect").cuda()
    sched = fg.Schedule.create("linear", 1000, "ddim10")
    images = {}
    for precision in ("float32", "bfloat16"):
        s = fg.GuidedSampler(unet, clf, sched, fg.EntropyDriven(3.0), fg.SamplerConfig(precision=precision, compile=False))
        images[precision] = s.sample(list(range(8)), seeds=list(range(8))).images
    diff = (images["bfloat16"] - images["float32"]).abs()
    assert diff.mean() < 0.01 and diff.flatten().quantile(0.99) < 0.05


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_golden_trajectories_on_the_gpu_meet_the_float64_rule(compile):
    import dataclasses

    import golden_cases as P

    g = P.golden(str(P.GOLDEN_ROOT / "adm_tiny"))
    for prefix in ("ddim_cond_eds", "ddpm_uncond_constant"):
        method, model, guidance = prefix.split("_")
        base = g.sampler(method, model, guidance)
        config = dataclasses.replace(base.config, compile=compile, cuda_graphs=compile, precision="float32",
                                     channels_last=False)  # fmt: skip
        model, clf = copy.deepcopy(base.model).cuda(), copy.deepcopy(base.classifier).cuda()  # the cache stays on CPU
        sampler = fg.GuidedSampler(model, clf, base.schedule, base.policy, config)
        steps = []
        noise = fg.FixedNoise(g.x_T.cuda(), None if method == "ddim" else g.ref[f"{prefix}_noise"].cuda())
        result = sampler.sample(g.y.cuda(), noise=noise, callback=lambda k, o, r: steps.append(o.x_prev.cpu()))
        result = result._replace(images=result.images.cpu(), trace=result.trace)
        P.check_trajectory_against_float64(g, prefix, steps, result)

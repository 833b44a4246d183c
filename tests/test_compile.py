"""The fast path on CPU: the whole guided step in one torch.compile graph, mixed precision, and what
stays the same (errors, results).

Tracing uses the ``aot_eager`` backend (FASTGUIDE_COMPILE_BACKEND): the same fullgraph trace as inductor,
including the classifier's backward, without inductor's code generation, so these tests are fast. The
inductor-compiled step is held to the float64 rule in test_adm_parity.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastguide as fg
from nets import K, tiny_nets


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def sampler(policy=None, clf="tiny", compile=True, unet=None, **cfg):
    net, classifier = tiny_nets()
    classifier = classifier if clf == "tiny" else clf
    policy = fg.EntropyDriven(2.0) if policy is None else policy
    return fg.GuidedSampler(unet or net, classifier, fg.Schedule.create("linear", 1000, "ddim5"), policy,
                            fg.SamplerConfig(compile=compile, **cfg))  # fmt: skip


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# one graph per step for every solver, compiled equal to eager: tests/solver_contract.py


@pytest.mark.parametrize("method", ["ddim", "unipc"])
def test_reusing_the_gradient_adds_one_graph_and_equals_eager(method):
    """guidance_every=2: steps that call the classifier and steps that reuse its gradient are two graphs."""
    cfg = dict(method=method, guidance_every=2, guidance_interval=(0, 700))
    fast, eager = sampler(**cfg), sampler(compile=False, **cfg)
    assert fast.guidance_plan() == ["off", "call", "reuse", "call", "reuse"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fast.sample([1, 2, 3], seeds=[0, 1, 2])
        fast.sample([1, 2, 3], seeds=[3, 4, 5])
    assert graphs() == 3  # off, call, reuse
    want = eager.sample([1, 2, 3], seeds=[0, 1, 2])
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)
    torch.testing.assert_close(got.trace.scale, want.trace.scale, rtol=0, atol=0)


def _policies():
    def tensor_code(state):  # a user's policy, written as tensor code
        return 1.0 + state.entropy / math.log(state.num_classes) * (state.t > 300)

    return [fg.Constant(2.0), fg.EntropyDriven(3.0, max_scale=50.0), fg.ConstantRange(4.0, t_max=500),
            fg.TimestepAware(0.01), fg.GradientNorm(5.0, threshold=0.5), tensor_code]  # fmt: skip


@pytest.mark.parametrize("policy", _policies(), ids=lambda p: getattr(p, "__name__", type(p).__name__))
def test_every_policy_compiles(policy):
    s = sampler(policy=policy, method="ddpm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = s.sample([1, 2], seeds=[0, 1])
    assert graphs() == 1
    want = sampler(policy=policy, compile=False, method="ddpm").sample([1, 2], seeds=[0, 1])
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)


def test_a_policy_that_cannot_be_traced_runs_eagerly_and_says_why_once():
    """The step cannot be one graph: the eps-model is compiled alone, the rest runs eagerly, said once."""

    def host_sync(state):  # .item() ends the graph: fullgraph cannot hold it
        return torch.full_like(state.entropy, 2.0 if state.entropy.mean().item() > 0 else 1.0)

    s = sampler(policy=host_sync)
    with pytest.warns(UserWarning, match="cannot be one compiled graph, so it runs with the eps-model compiled and "
                      "the rest of the step eagerly: .*data-dependent") as caught:  # fmt: skip
        got = s.sample([1, 2], seeds=[0, 1])
        s.sample([1, 2], seeds=[0, 1])
    assert sum("compiled" in str(w.message) for w in caught) == 1
    assert graphs() == 1  # the eps-model's
    want = sampler(policy=host_sync, compile=False).sample([1, 2], seeds=[0, 1])
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)


class NanFrom(torch.nn.Module):
    """The tiny UNet, with a NaN in sample 1 from original timestep ``t`` down (ddim5: t = 400 is step 2)."""

    def __init__(self, t: int):
        super().__init__()
        self.net, self.t = tiny_nets()[0], t
        self.num_classes, self.in_channels, self.image_size = K, 3, 8

    def forward(self, x, t, y=None):
        out = self.net(x, t, y)
        poison = torch.zeros_like(out)
        poison[1, 0, 2, 3] = math.nan
        return out + torch.where((t <= self.t)[:, None, None, None], poison, 0)


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_a_nan_at_step_k_is_named_at_step_k(compile):
    s = sampler(unet=NanFrom(400), compile=compile)
    with pytest.raises(FloatingPointError, match=r"^eps-model output is nan for sample 1 at step 2 \(t=400\)$"):
        s.sample([1, 2], seeds=[0, 1])


def test_classifier_parameters_get_no_gradient():
    s = sampler(method="ddpm")
    s.sample([1, 2], seeds=[0, 1])
    assert all(p.grad is None for p in s.classifier.parameters())
    assert all(p.requires_grad for p in s.classifier.parameters())  # left as the user made them


def test_bfloat16_networks_stay_within_the_documented_tolerance_of_float32():
    """The networks under bfloat16 autocast, the rest float32 (README: mean |Δ| about 0.003, 99% of pixels
    within 0.015 on the embedded models, DDIM-25): here 8 samples of DDIM-10, bounds with a 3x margin."""
    from fastguide.pretrained import load_embedded

    unet, clf = load_embedded("cadm"), load_embedded("classifier_ect")
    sched = fg.Schedule.create("linear", 1000, "ddim10")
    images = {}
    for precision in ("float32", "bfloat16"):
        s = fg.GuidedSampler(unet, clf, sched, fg.EntropyDriven(3.0), fg.SamplerConfig(precision=precision))
        images[precision] = s.sample(list(range(8)), seeds=list(range(8))).images
    diff = (images["bfloat16"] - images["float32"]).abs()
    assert 0 < diff.mean() < 0.01 and diff.flatten().quantile(0.99) < 0.05


def test_fast_path_defaults_on_cpu_and_bad_settings():
    assert fg.SamplerConfig().fast_path(torch.device("cpu")) == (False, False, None, False)
    fast = fg.SamplerConfig(compile=True, precision="bfloat16", channels_last=True).fast_path(torch.device("cpu"))
    assert fast == (True, False, torch.bfloat16, True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        fg.SamplerConfig(cuda_graphs=True).fast_path(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        fg.SamplerConfig(precision="fp8")
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        fg.SamplerConfig(compile="yes")


def test_channels_last_gives_the_same_samples():
    a = sampler(compile=False, channels_last=True).sample([1, 2], seeds=[0, 1])
    b = sampler(compile=False).sample([1, 2], seeds=[0, 1])
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-4)



def test_cuda_graphs_that_cannot_be_captured_are_said_once_and_the_step_stays_compiled(monkeypatch):
    # inductor says why it captures no graph (an input mutation, a CPU tensor in a CUDA graph, ...) on its
    # "cudagraphs" logger, and only for graphs on CUDA; here a compiled step says it as inductor would
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    compile_ = torch.compile

    def compile_refusing_graphs(fn, mode=None, **kw):
        assert mode == "reduce-overhead"  # what asks inductor for CUDA graphs
        compiled = compile_(fn, **kw)

        def step(*args):
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
            return compiled(*args)

        return step

    monkeypatch.setattr(torch, "compile", compile_refusing_graphs)
    on_cuda = fg.sampler.FastPath(compile=True, cuda_graphs=True, autocast=None, channels_last=False)
    eager = fg.SamplerConfig().fast_path(torch.device("cpu"))
    monkeypatch.setattr(fg.SamplerConfig, "fast_path", lambda self, device: on_cuda if self.compile else eager)
    s = sampler()
    with pytest.warns(UserWarning, match="runs compiled without CUDA graphs: skipping cudagraphs due to mut") as caught:
        got = s.sample([1, 2], seeds=[0, 1])
        s.sample([1, 2], seeds=[0, 1])
    assert sum("without CUDA graphs" in str(w.message) for w in caught) == 1
    assert not any("runs eagerly" in str(w.message) for w in caught)
    assert graphs() == 1
    want = sampler(compile=False).sample([1, 2], seeds=[0, 1])
    torch.testing.assert_close(got.images, want.images, rtol=1e-5, atol=1e-5)


class MarksCompiled(torch.nn.Module):
    """The tiny UNet, whose output shows whether it ran inside a compiled graph (+1e-3 there)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_nets()[0]
        self.num_classes, self.in_channels, self.image_size = K, 3, 8

    def forward(self, x, t, y=None):
        return self.net(x, t, y) + (1e-3 if torch.compiler.is_compiling() else 0.0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_sample_does_not_depend_on_the_calls_before_it(compile, precision):
    """The first call of a compiled sampler (which checks shapes and labels eagerly) and a call with a new
    largest label give what every later call gives: each result comes from one path, the compiled one."""
    s = sampler(unet=MarksCompiled(), compile=compile, precision=precision)
    runs = [s.sample([1, 2], seeds=[0, 1]), s.sample([1, 2], seeds=[0, 1]), s.sample([3, 2], seeds=[0, 1]),
            s.sample([1, 2], seeds=[0, 1])]  # fmt: skip
    for got in runs[1:]:
        assert torch.equal(got.images[1], runs[0].images[1])
    assert torch.equal(runs[3].images, runs[0].images)
    assert graphs() == (1 if compile else 0)

"""fastguide on networks that checkpoint as openai/guided-diffusion's own code does (tests/adm_original.py):
every attention block, and every ResBlock with ``use_checkpoint=True``, through an autograd.Function that
differentiates the parameters it is handed. Built from ADM's flags with guided-diffusion-sdk's script_util,
then given the original's checkpointing, and fastguide's own ADM networks likewise."""

from __future__ import annotations

import warnings

import pytest
import torch
from adm_original import RecomputingCheckpoint, WeightGradients, original_checkpointing
from adm_reference import MISSING

import fastguide as fg
from fastguide import ops

needs_sdk = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _adm(use_checkpoint=False, classifier_use_fp16=False, respacing="ddim3"):
    """A small class-conditional UNet, its diffusion and a classifier from ADM's flags (script_util)."""
    from guided_diffusion import script_util as su

    torch.manual_seed(0)
    flags = su.model_and_diffusion_defaults()
    flags.update(image_size=64, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="32",
                 num_head_channels=16, learn_sigma=True, class_cond=True, use_checkpoint=use_checkpoint,
                 timestep_respacing=respacing)  # fmt: skip
    model, diffusion = su.create_model_and_diffusion(**flags)
    cflags = su.classifier_defaults()
    cflags.update(image_size=64, classifier_width=64, classifier_depth=1, classifier_attention_resolutions="16,8",
                  classifier_use_fp16=classifier_use_fp16)  # fmt: skip
    classifier = su.create_classifier(**cflags)
    _randomize(model, classifier)
    if classifier_use_fp16:
        classifier.convert_to_fp16()  # as classifier_sample.py does
    if use_checkpoint:  # create_classifier has no such flag: every ResBlock of the classifier checkpoints too
        for m in classifier.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = True
    return model.eval(), diffusion, classifier.eval()


def _randomize(*nets):
    """ADM zero-initialises its output layers: random weights everywhere, so that guidance does something."""
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                if not p.any():
                    p.normal_(0, 0.05)


def _adm_cond_fn(classifier, scale=1.0):
    """scripts/classifier_sample.py's cond_fn."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


Y = torch.tensor([1, 7])
SHAPE = (2, 3, 64, 64)


def _ddim(diffusion, model, cond_fn):
    torch.manual_seed(1)
    return diffusion.ddim_sample_loop(model, SHAPE, cond_fn=cond_fn, model_kwargs={"y": Y})


@needs_sdk
def test_the_double_fails_as_the_original_does_on_parameters_without_grad():
    """The double is faithful where it matters: ADM's own cond_fn on a frozen classifier fails inside the
    checkpoint's backward, as it does with the original repository, and so did fastguide's classifier pass
    before it stood in for the parameters (a call with detached parameters)."""
    _, _, classifier = _adm()
    x, t = torch.randn(SHAPE), torch.full((2,), 500)
    with original_checkpointing():
        detached = {n: p.detach() for n, p in classifier.named_parameters()}
        x_in = x.requires_grad_(True)
        logits = torch.func.functional_call(classifier, detached, (x_in, t))
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(logits.sum(), x_in)
        classifier.requires_grad_(False)
        with pytest.raises(RuntimeError, match="does not require grad"):
            _adm_cond_fn(classifier)(x, t, Y)


VARIANTS = {
    "attention": {},  # the original's attention blocks always checkpoint
    "use_checkpoint": dict(use_checkpoint=True),  # every ResBlock too
    "fp16 torso": dict(classifier_use_fp16=True),  # classifier_use_fp16: convert_to_fp16()
}


@needs_sdk
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_eds_cond_fn_in_adms_loop_on_the_originals_networks(variant, frozen):
    """fastguide's cond_fn in ADM's own DDIM loop: the same samples with the original's checkpointing as
    with the sdk's (bit for bit), no parameter gets .grad, and no weight gradient is computed (ADM's own
    cond_fn computes them in every checkpointed block). A frozen classifier works too."""
    model, diffusion, classifier = _adm(**VARIANTS[variant])
    classifier.requires_grad_(not frozen)
    cond_fn = fg.adm.eds_cond_fn(classifier, 2.0, diffusion)
    want = _ddim(diffusion, model, cond_fn)
    with original_checkpointing(), WeightGradients() as counted:
        got = _ddim(diffusion, model, cond_fn)
    assert torch.equal(got, want)
    assert counted.input > 0 and counted.weight == 0
    assert all(p.grad is None for p in classifier.parameters())
    if not frozen:  # what the count would show if the pass differentiated the parameters
        with original_checkpointing(), WeightGradients() as adm:
            _ddim(diffusion, model, _adm_cond_fn(classifier))
        assert adm.weight > 0


@needs_sdk
def test_accelerate_with_a_fastguide_policy_on_the_originals_networks_is_adms_loop():
    """accelerate(diffusion) with eds_cond_fn: the same samples as ADM's loop with eds_cond_fn, both on
    networks that checkpoint as the original's (torch backend: the same arithmetic)."""
    model, diffusion, classifier = _adm(use_checkpoint=True)
    cond_fn = fg.adm.eds_cond_fn(classifier, 2.0, diffusion)
    with original_checkpointing(), ops.use_backend("torch"):
        want = _ddim(diffusion, model, cond_fn)
        got = _ddim(fg.adm.accelerate(diffusion), model, cond_fn)
    assert torch.equal(got, want)
    assert all(p.grad is None for p in classifier.parameters())


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@needs_sdk
@pytest.mark.parametrize("variant", ["attention", "use_checkpoint"])
def test_bf16_networks_with_the_originals_checkpointing(variant):
    """precision="bfloat16" (what "auto" picks on CUDA and on a CPU with native bf16) on networks that
    checkpoint as the original's do: the checkpoint recomputes its block in the backward, where autocast
    is not on by itself (bf16 activations met float32 weights: "Input type (c10::BFloat16) and bias type
    (float) should be the same"), so the pass runs that backward under the forward's autocast. The samples
    are those of the sdk's checkpointing (which keeps the activations) within the bf16 networks' own error,
    measured as their distance from the float32 networks' samples; no weight gradient, no .grad; with a
    trainable and with a frozen classifier (whose samples are the same, so the yardsticks are made once:
    bf16 convolutions are slow on a CPU without native bf16). DDIM-2: every step calls the classifier."""
    model, diffusion, classifier = _adm(**VARIANTS[variant], respacing="ddim2")
    cond_fn = fg.adm.eds_cond_fn(classifier, 2.0, diffusion)
    fp32 = _ddim(fg.adm.accelerate(diffusion, fg.SamplerConfig(precision="float32")), model, cond_fn)
    want = _ddim(fg.adm.accelerate(diffusion, fg.SamplerConfig(precision="bfloat16")), model, cond_fn)
    assert 0 < _gap(want, fp32)
    for frozen in (False, True):
        classifier.requires_grad_(not frozen)
        with original_checkpointing(), WeightGradients() as counted:
            got = _ddim(fg.adm.accelerate(diffusion, fg.SamplerConfig(precision="bfloat16")), model, cond_fn)
        assert torch.isfinite(got).all(), f"frozen={frozen}"
        assert _gap(got, want) <= 2 * _gap(want, fp32), f"frozen={frozen}"
        assert counted.input > 0 and counted.weight == 0, f"frozen={frozen}"
        assert all(p.grad is None for p in classifier.parameters()), f"frozen={frozen}"


def test_bf16_guided_sampler_on_fastguides_networks_with_the_originals_checkpointing():
    """GuidedSampler with bf16 networks that checkpoint as the original's: it runs (the backward under the
    forward's autocast), within the bf16 error of the same networks without the double; without the double
    the backward stays outside autocast (bit for bit what it was)."""
    unet, clf = _fastguide_nets()
    schedule = fg.Schedule.create("linear", 1000, "ddim5")

    def sample(precision):
        sampler = fg.GuidedSampler(unet, clf, schedule, fg.EntropyDriven(2.0), fg.SamplerConfig(precision=precision))
        return sampler.sample([1, 2, 3], seeds=[0, 1, 2]).images

    fp32, want = sample("float32"), sample("bfloat16")
    with original_checkpointing():
        got = sample("bfloat16")
    assert torch.isfinite(got).all()
    assert 0 < _gap(want, fp32) and _gap(got, want) <= 2 * _gap(want, fp32)
    assert all(p.grad is None for p in clf.parameters())


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")  # the same trace as inductor, no codegen
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def _fastguide_nets():
    from fastguide.adm import EncoderUNetModel, UNetModel

    torch.manual_seed(0)
    unet = UNetModel(8, 3, 32, 6, 1, (2,), channel_mult=(1, 2), num_head_channels=16, num_classes=4,
                     use_checkpoint=True)  # fmt: skip
    clf = EncoderUNetModel(8, 3, 32, 4, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention",
                           use_checkpoint=True)  # fmt: skip
    _randomize(unet, clf)
    return unet.eval(), clf.eval()


def _sample(compile: bool, labels, seeds):
    unet, clf = _fastguide_nets()
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0),
                               fg.SamplerConfig(compile=compile))  # fmt: skip
    return sampler, sampler.sample(labels, seeds=seeds)


def test_compiled_step_on_original_checkpointing_falls_back_to_a_compiled_eps_model(aot_eager):
    """torch.compile cannot trace the original's checkpoint (its backward deletes context attributes), so
    the step cannot be one graph: it says why once, compiles the eps-model alone (one graph, no
    recompilation) and runs the classifier pass eagerly, with the eager step's results (aot_eager: the same
    arithmetic). Without the double the same sampler is one graph of the whole step."""
    with original_checkpointing():
        eager = _sample(False, [1, 2, 3], [0, 1, 2])[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler, first = _sample(True, [1, 2, 3], [0, 1, 2])
            second = sampler.sample([1, 2, 3], seeds=[0, 1, 2])
    messages = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(messages) == 1, messages
    assert "runs with the eps-model compiled and the rest of the step eagerly" in messages[0]
    assert "differentiates the parameters it hands to an autograd.Function" in messages[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the eps-model's
    for got in (first, second):
        assert torch.equal(got.images, eager.images)
        assert torch.equal(got.trace.scale, eager.trace.scale)
    assert all(p.grad is None for p in sampler.classifier.parameters())


@needs_sdk
@pytest.mark.parametrize("kind", ["eds_cond_fn", "ADM's cond_fn"])
def test_accelerate_compiled_on_the_originals_networks_falls_back_and_equals_eager(aot_eager, kind):
    """accelerate(diffusion, SamplerConfig(compile=True)) on ADM's networks with the original's checkpointing,
    with fastguide's cond_fn or ADM's own: the eps-model compiled, the guidance eager, said once, and the
    eager loop's samples."""
    model, diffusion, classifier = _adm()
    cond_fn = fg.adm.eds_cond_fn(classifier, 2.0, diffusion) if kind == "eds_cond_fn" else _adm_cond_fn(classifier)
    with original_checkpointing():
        want = _ddim(fg.adm.accelerate(diffusion), model, cond_fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = fg.adm.accelerate(diffusion, fg.SamplerConfig(compile=True))
            got = [_ddim(fast, model, cond_fn) for _ in range(2)]
    messages = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(messages) == 1 and "the eps-model compiled and the rest of the step eagerly" in messages[0], messages
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for sample in got:
        assert torch.equal(sample, want)


def test_the_same_networks_without_the_double_are_one_graph(aot_eager):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        sampler, got = _sample(True, [1, 2, 3], [0, 1, 2])
        sampler.sample([1, 2, 3], seeds=[0, 1, 2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got.images, _sample(False, [1, 2, 3], [0, 1, 2])[1].images)


def test_the_eager_pass_computes_no_weight_gradient_on_fastguides_networks():
    unet, clf = _fastguide_nets()
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0))
    for double in (False, True):
        with (original_checkpointing() if double else warnings.catch_warnings()), WeightGradients() as counted:
            sampler.sample([1, 2], seeds=[0, 1])
        assert counted.input > 0 and counted.weight == 0
    assert all(p.grad is None for p in clf.parameters())


def test_a_checkpoint_that_differentiates_its_parameters_gets_tensors_that_require_grad():
    """Any network whose own autograd.Function asks for its parameters' gradients works: a linear layer
    through RecomputingCheckpoint as the whole classifier."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, x, t):
            return RecomputingCheckpoint.apply(lambda h: self.lin(h.flatten(1)), 1, x, *self.parameters())

    unet, _ = _fastguide_nets()
    clf = Classifier().requires_grad_(False)
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.Constant(3.0),
                               image_shape=(3, 8, 8))  # fmt: skip
    got = sampler.sample([1, 2], seeds=[0, 1])
    assert torch.isfinite(got.images).all() and (got.trace.grad_norm > 0).all()
    assert clf.lin.weight.grad is None


def _super_res(class_cond: bool):
    """A small super-resolution UNet and its diffusion from ADM's flags (sr_create_model_and_diffusion:
    large_size, small_size), as scripts/super_res_sample.py builds them."""
    from guided_diffusion import script_util as su

    torch.manual_seed(0)
    flags = su.sr_model_and_diffusion_defaults()
    flags.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
                 num_head_channels=32, learn_sigma=True, class_cond=class_cond, timestep_respacing="6")  # fmt: skip
    model, diffusion = su.sr_create_model_and_diffusion(**flags)
    _randomize(model)
    return model.eval(), diffusion


@needs_sdk
@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
@pytest.mark.parametrize("class_cond", [False, True], ids=["uncond", "cond"])
def test_accelerate_passes_model_kwargs_as_adms_loops_do_super_resolution(loop, class_cond):
    """scripts/super_res_sample.py with ``diffusion = accelerate(diffusion)``: model_kwargs (low_res, and y
    for a class-conditional model) reach the model at every step; the samples are ADM's, bit for bit (torch
    backend), and the global generator is left where ADM leaves it. With the original's checkpointing."""
    model, diffusion = _super_res(class_cond)
    torch.manual_seed(3)
    kwargs = {"low_res": torch.rand(2, 3, 32, 32) * 2 - 1}
    if class_cond:
        kwargs["y"] = Y
    results = []
    for diff in (diffusion, fg.adm.accelerate(diffusion)):
        torch.manual_seed(4)
        with original_checkpointing(), ops.use_backend("torch"):
            sample = getattr(diff, loop)(model, SHAPE, clip_denoised=True, model_kwargs=kwargs)
        results.append((sample, torch.randn(2)))
    (want, want_next), (got, got_next) = results
    assert torch.equal(got, want)
    assert torch.equal(got_next, want_next)
    # low_res matters: another low-resolution image gives other samples
    torch.manual_seed(4)
    flipped = {**kwargs, "low_res": -kwargs["low_res"]}
    other = getattr(fg.adm.accelerate(diffusion), loop)(model, SHAPE, model_kwargs=flipped)
    assert not torch.equal(other, got)


def test_guided_sampler_takes_model_kwargs_per_sample():
    """GuidedSampler.sample(model_kwargs=): each sample's row goes with it, and a bad model_kwargs is one error
    naming it, before any network call."""

    class LowResUNet(torch.nn.Module):  # an eps-model that adds a per-sample image to its output
        def __init__(self):
            super().__init__()
            self.unet = _fastguide_nets()[0]

        def forward(self, x, t, y=None, low_res=None):
            return self.unet(x, t, y) + torch.cat([low_res, low_res], dim=1)

    unet, clf = LowResUNet().eval(), _fastguide_nets()[1]
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0),
                               image_shape=(3, 8, 8), class_cond=True)  # fmt: skip
    low = torch.randn(3, 3, 8, 8) * 0.1
    both = sampler.sample([1, 2, 3], seeds=[0, 1, 2], model_kwargs={"low_res": low})
    changed = low.clone()
    changed[2] = -changed[2]  # sample 2's row alone: only sample 2 changes
    other = sampler.sample([1, 2, 3], seeds=[0, 1, 2], model_kwargs={"low_res": changed})
    assert torch.equal(other.images[:2], both.images[:2])
    assert not torch.equal(other.images[2], both.images[2])
    rows = r"model_kwargs\['low_res'\] must be a tensor with one row per sample \(3\), got \(2, 3, 8, 8\)"
    for bad, match in (({"low_res": low[:2]}, rows),
                       ({"y": low}, "model_kwargs name 'y' is not a keyword argument name other than 'y'"),
                       ({"low_res": 1.0}, r"model_kwargs\['low_res'\] must be a tensor .* got float"),
                       ([low], "model_kwargs must be a dict of tensors, got list")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=match):
            sampler.sample([1, 2, 3], seeds=[0, 1, 2], model_kwargs=bad)

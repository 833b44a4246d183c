"""The CPU's automatic choices: bf16 where the CPU computes it natively, denormals flushed while sampling."""

import json

import pytest
import torch

import fastguide as fg
from fastguide import cpu
from fastguide.cli import main

TINY = ["--count", "1", "--respacing", "ddim2", "--batch_size", "10", "--quiet"]


@pytest.mark.parametrize("kind, autocast", [("amx-bf16", torch.bfloat16), ("AVX512-BF16", torch.bfloat16), ("none", None)])
def test_automatic_precision_follows_the_cpus_bf16(monkeypatch, kind, autocast):
    monkeypatch.setenv(cpu.KIND_ENV, kind)
    assert fg.SamplerConfig().fast_path(torch.device("cpu")) == (False, False, autocast, False)
    assert fg.SamplerConfig(precision="float32").fast_path(torch.device("cpu")).autocast is None  # as asked
    assert fg.SamplerConfig(precision="bfloat16").fast_path(torch.device("cpu")).autocast is torch.bfloat16


def test_cpu_kind_is_detected_without_the_override(monkeypatch):
    monkeypatch.delenv(cpu.KIND_ENV)
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    expected = cpu.AMX_BF16 if "amx_bf16" in flags else cpu.AVX512_BF16 if "avx512_bf16" in flags else cpu.NO_NATIVE_BF16
    assert cpu.bf16_kind() == expected
    assert cpu.native_bf16() == (expected != cpu.NO_NATIVE_BF16)


def test_a_bad_cpu_kind_is_refused_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cpu.KIND_ENV, "sapphire")
    with pytest.raises(ValueError, match="FASTGUIDE_CPU_BF16='sapphire'"):
        fg.SamplerConfig().fast_path(torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--out", str(tmp_path / "o"), *TINY])
    assert exit_.value.code == 2
    assert "FASTGUIDE_CPU_BF16='sapphire'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work
    monkeypatch.setenv(cpu.KIND_ENV, "none")
    assert main(["sample", "--out", str(tmp_path / "p"), *TINY, "--precision", "float32"]) == 0


def test_cli_sample_takes_bf16_on_a_cpu_with_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.KIND_ENV, "amx-bf16")
    assert main(["sample", "--out", str(tmp_path / "o"), *TINY]) == 0
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["fast_path"]["autocast"] == "torch.bfloat16" and run["precision"] == "auto"


class _Recorder(torch.nn.Module):
    """An eps-model that records, at each call, whether denormals are flushed."""

    in_channels, image_size = 1, 4

    def __init__(self):
        super().__init__()
        self.flushed = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, **kwargs):
        self.flushed.append(cpu.denormals_flushed())
        return x * self.w * 0.1


def _sampler(model, flush=True):
    return fg.GuidedSampler(model, None, fg.Schedule.create("linear", 1000, "ddim3"),
                            config=fg.SamplerConfig(flush_denormals=flush), num_classes=2, class_cond=False)  # fmt: skip


@pytest.mark.parametrize("before", [False, True])
def test_sampling_flushes_denormals_and_restores_the_callers_mode(before):
    model = _Recorder()
    torch.set_flush_denormal(before)
    try:
        seen = []
        _sampler(model).sample([0, 1], seeds=[0, 1], callback=lambda *a: seen.append(cpu.denormals_flushed()))
        assert model.flushed == [True] * 3  # every step
        assert seen == [before] * 3  # the caller's code between steps runs in its own mode
        assert cpu.denormals_flushed() is before
        model.flushed.clear()
        _sampler(model, flush=False).sample([0, 1], seeds=[0, 1])
        assert model.flushed == [before] * 3
    finally:
        torch.set_flush_denormal(False)


def test_flush_denormals_restores_the_mode_it_found():
    assert not cpu.denormals_flushed()
    with cpu.flush_denormals():
        assert cpu.denormals_flushed()
        assert (torch.tensor([1e-39]) * 2).item() == 0  # what flushing means
        with cpu.flush_denormals():
            pass
        assert cpu.denormals_flushed()  # an inner block leaves the outer one's mode
        with cpu.flush_denormals(False):
            assert cpu.denormals_flushed()  # disabled: nothing changes
    assert not cpu.denormals_flushed()
    assert (torch.tensor([1e-39]) * 2).item() == pytest.approx(2e-39, rel=1e-6)


def test_flush_denormals_must_be_a_bool():
    with pytest.raises(ValueError, match="flush_denormals must be True or False, got 'no'"):
        fg.SamplerConfig(flush_denormals="no")


# ---- compile=None on the CPU: compiled where the run repays a cold compile (fastguide.cost) ----


def _embedded_sampler(**config):
    from fastguide.generate import load_networks, make_sampler

    nets = load_networks("cond", "ect", torch.device("cpu"))
    return make_sampler(nets, fg.EntropyDriven(), "ddim", "ddim5", **config)


def _break_even(sampler) -> float:
    """Samples from which the rule compiles: the cold compile over what one sample's steps save."""
    one = sampler.compile_estimate("cpu", samples=1)
    return one.compile_s / one.saved_s


def test_the_step_is_counted_as_it_runs_on_real_or_fake_tensors():
    """The rule's FLOPs are those of the sampler's real run, counted at batch 1 on real tensors (networks in
    eval mode) or on fake ones (a network in training mode: a step more would change its state), alike."""
    sampler = _embedded_sampler(compile=False, precision="float32")
    real = sampler.compile_estimate("cpu", samples=3)
    before = [t.clone() for t in sampler.model.state_dict().values()]
    sampler.model.train()  # (the embedded UNet has no dropout: training mode computes the same)
    fake = sampler.compile_estimate("cpu", samples=3)
    assert all(torch.equal(a, b) for a, b in zip(before, sampler.model.state_dict().values()))
    sampler.model.eval()
    assert fake == real and real.compile_s > 0
    run = fg.cost.count(lambda: sampler.sample([0, 1, 2], seeds=[0, 1, 2]))  # the whole run, batch 3
    assert run.flops * fg.cost.SAVED_S_PER_FLOP == pytest.approx(real.saved_s, rel=1e-9)


@pytest.mark.parametrize("kind", ["amx-bf16", "avx512-bf16"])
def test_compile_none_compiles_where_the_run_repays_it(monkeypatch, kind):
    monkeypatch.setenv(cpu.KIND_ENV, kind)
    cpu_ = torch.device("cpu")
    n = _break_even(_embedded_sampler())
    assert 100 < n < 1e6  # the embedded models: thousands of samples, not the default command's 80
    for samples, compiled in ((int(n / 2), False), (int(2 * n), True)):
        sampler = _embedded_sampler(planned_samples=samples)
        assert sampler.fast_path(cpu_) == (compiled, False, torch.bfloat16, False)
        assert sampler.config.fast_path(cpu_).compile is False  # the config alone does not know the run
    long = int(2 * n)
    assert _embedded_sampler(planned_samples=long, compile=False).fast_path(cpu_).compile is False  # as asked
    # the constants were measured for bf16 networks: float32 ones stay eager
    assert _embedded_sampler(planned_samples=long, precision="float32").fast_path(cpu_).compile is False
    # every 2nd step reuses the gradient: less to save, and a second graph (the reusing step) to compile
    assert _break_even(_embedded_sampler(guidance_every=2)) > n
    monkeypatch.setenv(cpu.KIND_ENV, "none")  # emulated bf16: eager float32, however long the run
    assert _embedded_sampler(planned_samples=long).fast_path(cpu_) == (False, False, None, False)


def test_compile_none_is_weighed_once_from_the_first_call(monkeypatch):
    """Without planned_samples the first call's samples are the run; later calls of any batch run as it did,
    so a sample does not depend on the batching."""
    monkeypatch.setenv(cpu.KIND_ENV, "avx512-bf16")
    monkeypatch.setattr(fg.cost, "COLD_COMPILE_S_PER_OP", 1e9)  # nothing repays
    sampler = _embedded_sampler()
    assert sampler.fast_path("cpu").compile is False  # not weighed yet: a run of unknown length
    sampler.sample([0], seeds=[0])
    monkeypatch.setattr(fg.cost, "COLD_COMPILE_S_PER_OP", 0.0)  # now anything would
    assert sampler.fast_path("cpu", samples=10**9).compile is False
    assert _embedded_sampler().fast_path("cpu", samples=1).compile is True


def test_a_step_that_cannot_run_on_fake_tensors_stays_eager(monkeypatch):
    monkeypatch.setenv(cpu.KIND_ENV, "avx512-bf16")

    class Host(torch.nn.Module):  # reads a value on the host, which a fake tensor does not have
        in_channels, image_size = 1, 4

        def forward(self, x, t):
            return x * float(x.abs().max() + 1)

    sampler = fg.GuidedSampler(Host(), None, fg.Schedule.create("linear", 1000, "ddim2"),
                               config=fg.SamplerConfig(planned_samples=10**9))  # fmt: skip
    assert sampler.compile_estimate("cpu") is None
    assert sampler.fast_path("cpu").compile is False
    assert sampler.sample([0], seeds=[0]).images.shape == (1, 1, 4, 4)


def test_planned_samples_is_checked():
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(ValueError, match=f"planned_samples must be a positive integer or None, got {bad!r}"):
            fg.SamplerConfig(planned_samples=bad)


def test_cli_sample_weighs_its_whole_run(monkeypatch, tmp_path):
    """`fastguide sample` hands the sampler its number of samples: the default command stays eager on a CPU
    with native bf16; a run past the break-even compiles (here with the compile's cost set to 0)."""
    monkeypatch.setenv(cpu.KIND_ENV, "avx512-bf16")
    assert main(["sample", "--out", str(tmp_path / "o"), *TINY]) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["fast_path"]["compile"] is False
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(fg.cost, "COLD_COMPILE_S_PER_OP", 0.0)
    assert main(["sample", "--out", str(tmp_path / "p"), *TINY]) == 0
    assert json.loads((tmp_path / "p" / "run.json").read_text())["fast_path"]["compile"] is True

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

"""Parity with the reference ADM implementation (golden tensors made by openai/guided-diffusion).

Runs over every folder in tests/golden/ plus the folders listed in FASTGUIDE_EXTRA_GOLDEN
(os.pathsep-separated). Everything about a folder (sizes, heads, schedule, respacings, classes,
gamma) is read from its meta.json; the format is described in tests/golden/adm_tiny/README.md.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastguide as fg
from fastguide import ops
from fastguide.adm import EncoderUNetModel, UNetModel, load_checkpoint

GOLDEN_ROOT = Path(__file__).parent / "golden"
NET_RTOL = 1e-5  # network outputs, gradients, entropies, scales (golden README)
TRAJ_RTOL = 1e-4  # whole sampling trajectories (golden README)


def golden_folders() -> list[Path]:
    folders = sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "meta.json").is_file())
    extra = os.environ.get("FASTGUIDE_EXTRA_GOLDEN", "")
    folders += [Path(p) for p in extra.split(os.pathsep) if p]
    return folders


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e| (shapes must match)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


class Golden:
    """One golden folder: its meta, reference tensors and the networks rebuilt from meta.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.ref = load_file(str(folder / "reference.safetensors"))
        self.x_T, self.y = self.ref["x_T"], self.ref["y"]
        self.channels = self.x_T.shape[1]
        self.num_classes = self.meta["num_classes"]

    def _unet_kwargs(self, cfg: dict) -> dict:
        return dict(
            image_size=self.meta["image_size"],
            in_channels=self.channels,
            model_channels=cfg["model_channels"],
            num_res_blocks=cfg["num_res_blocks"],
            attention_resolutions=tuple(cfg["attention_ds"]),
            dropout=cfg.get("dropout", 0.0),
            channel_mult=tuple(cfg["channel_mult"]),
            num_heads=cfg.get("num_heads", 1),
            num_head_channels=cfg.get("num_head_channels", -1),
            use_scale_shift_norm=cfg.get("use_scale_shift_norm", False),
            resblock_updown=cfg.get("resblock_updown", False),
            use_new_attention_order=cfg.get("use_new_attention_order", False),
        )

    @functools.cached_property
    def unets(self) -> dict[str, UNetModel]:
        out_channels = self.channels * (2 if self.meta.get("learn_sigma", False) else 1)
        nets = {}
        for name, cond in (("uncond", False), ("cond", True)):
            cfg = self.meta[f"unet_{name}"]
            net = UNetModel(
                out_channels=out_channels,
                num_classes=self.num_classes if cond else None,
                num_heads_upsample=cfg.get("num_heads_upsample", -1),
                **self._unet_kwargs(cfg),
            )
            nets[name] = load_checkpoint(net, self.folder / f"unet_{name}.safetensors").eval()
        return nets

    @functools.cached_property
    def classifier(self) -> EncoderUNetModel:
        cfg = self.meta["classifier"]
        net = EncoderUNetModel(out_channels=self.num_classes, pool=cfg.get("pool", "adaptive"), **self._unet_kwargs(cfg))
        return load_checkpoint(net, self.folder / "classifier.safetensors").eval()

    def schedule(self, method: str) -> fg.Schedule:
        sched = fg.Schedule.create(
            self.meta["noise_schedule"],
            self.meta["diffusion_steps"],
            self.meta[f"{method}_respacing"],
            self.meta.get("rescale_timesteps", False),
        )
        assert list(sched.timestep_map) == self.meta[f"{method}_timestep_map"]
        return sched

    def policy(self, guidance: str):
        gamma = self.meta["gamma"]
        policies = {"constant": fg.Constant(gamma), "eds": fg.EntropyDriven(gamma)}
        assert guidance in policies, f"golden guidance {guidance!r} has no fastguide policy mapped"
        return policies[guidance]

    def sampler(self, method: str, model: str, guidance: str) -> fg.GuidedSampler:
        config = fg.SamplerConfig(
            method=method, eta=self.meta.get("ddim_eta", 0.0), clip_denoised=self.meta.get("clip_denoised", True)
        )
        return fg.GuidedSampler(
            self.unets[model], self.classifier, self.schedule(method), self.policy(guidance), config
        )

    def probe_timesteps(self) -> torch.Tensor:
        """The probes are direct network calls, model(x_T, probe_t), whatever rescale_timesteps says."""
        return self.ref["probe_t"]


@functools.cache
def golden(folder: str) -> Golden:
    return Golden(Path(folder))


def _trajectory_cases() -> list:
    cases = []
    for folder in golden_folders():
        keys = load_file(str(folder / "reference.safetensors")).keys()
        for key in sorted(keys):
            m = re.fullmatch(r"(ddim|ddpm)_(uncond|cond)_(\w+?)_x0", key)
            if m:
                cases.append(pytest.param(str(folder), *m.groups(), id=f"{folder.name}-{key[:-3]}"))
    return cases


FOLDERS = [pytest.param(str(f), id=f.name) for f in golden_folders()]


def test_golden_folders_exist():
    assert any(True for _ in golden_folders()), "no golden folder found under tests/golden"


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("model", ["uncond", "cond"])
def test_unet_output(folder, model):
    g = golden(folder)
    kwargs = {"y": g.y} if model == "cond" else {}
    with torch.no_grad():
        out = g.unets[model](g.x_T, g.probe_timesteps(), **kwargs)
    assert rel_err(out, g.ref[f"probe_unet_{model}_out"]) <= NET_RTOL


def backend_or_skip(name: str, op: str, *args) -> None:
    """Skip when ``name`` cannot serve ``op`` here (e.g. no extension build, no CUDA for Triton)."""
    with ops.use_backend(name):
        reason = dict(ops.explain(op, *args))[name]
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")


BACKENDS = list(ops.PRIORITY)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ext"])  # ext has no entropy op
@pytest.mark.parametrize("folder", FOLDERS)
def test_classifier_logits_gradient_entropy_and_eds_scale(folder, backend):
    g = golden(folder)
    backend_or_skip(backend, "softmax_entropy_scale", g.ref["probe_clf_logits"], g.y)
    with ops.use_backend(backend):
        out = fg.classifier_gradient(g.classifier, g.x_T, g.probe_timesteps(), g.y)
    assert rel_err(out.logits, g.ref["probe_clf_logits"]) <= NET_RTOL
    assert rel_err(out.grad, g.ref["probe_clf_grad"]) <= NET_RTOL
    assert rel_err(out.entropy, g.ref["probe_entropy"]) <= NET_RTOL
    scale = fg.eds_scale(out.entropy, g.num_classes, g.meta["gamma"])
    assert rel_err(scale, g.ref["probe_eds_scale"]) <= NET_RTOL


@pytest.mark.parametrize("folder", FOLDERS)
def test_ect_loss(folder):
    g = golden(folder)
    keys = [k for k in g.ref if k.startswith("probe_ect_loss_eta")]
    assert keys, "golden folder has no ECT loss"
    logits = g.ref["probe_clf_logits"]
    for key in keys:
        eta = float(key[len("probe_ect_loss_eta") :])
        loss = fg.ect_loss(logits, g.y, eta)
        assert rel_err(loss.reshape(1), g.ref[key].reshape(1)) <= NET_RTOL, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("folder, method, model, guidance", _trajectory_cases())
def test_guided_trajectory(folder, method, model, guidance, backend):
    g = golden(folder)
    backend_or_skip(backend, f"guided_{method}_update", g.x_T)
    prefix = f"{method}_{model}_{guidance}"
    sampler = g.sampler(method, model, guidance)
    steps = []
    noise = fg.FixedNoise(g.x_T, g.ref.get(f"{prefix}_noise"))  # DDIM with eta = 0 draws no noise
    with ops.use_backend(backend):
        result = sampler.sample(g.y, noise=noise, callback=lambda k, out, rec: steps.append(out.x_prev))
    if f"{prefix}_traj" in g.ref:
        traj = g.ref[f"{prefix}_traj"]
        assert len(steps) == traj.shape[0]
        for k, (x, expected) in enumerate(zip(steps, traj)):
            assert rel_err(x, expected) <= TRAJ_RTOL, f"step {k}"
    expected_x0 = g.ref[f"{prefix}_x0"]
    assert rel_err(result.images, expected_x0) <= TRAJ_RTOL
    assert rel_err(result.trace.scale, g.ref[f"{prefix}_scales"]) <= NET_RTOL


def test_extra_golden_folders_are_collected(tmp_path):
    """FASTGUIDE_EXTRA_GOLDEN adds folders (here: a copy of a shipped one) to every parity test."""
    import shutil
    import subprocess
    import sys

    first = golden_folders()[0]
    copy = tmp_path / "copy_of_golden"
    shutil.copytree(first, copy)
    env = {**os.environ, "FASTGUIDE_EXTRA_GOLDEN": os.pathsep.join([str(copy), ""])}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "--collect-only", "-q", "-k", "not extra_golden"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert f"[{first.name}-" in out and "[copy_of_golden-" in out
    assert out.count("[copy_of_golden-") == out.count(f"[{first.name}-")

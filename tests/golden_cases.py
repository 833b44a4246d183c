"""The golden ADM folders (tests/golden/, plus FASTGUIDE_EXTRA_GOLDEN) and the float64 parity rule: the
helpers of test_adm_parity.py that other test modules use too (test_adm_drop_in, test_xstart, test_solvers,
test_gpu), so that no test module imports another.

:class:`Golden` is one folder (meta.json, reference tensors, the networks rebuilt from them);
:func:`assert_float64_parity` is the rule (error against float64 ≤ 2 × the float32 reference runs' own
+ 1e-6, described in test_adm_parity.py) and records each test's worst case in :data:`WORST`, which
tests/conftest.py reports at the end of the run.
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
from adm_reference import MISSING, VARIANTS, adm_here
from fastguide.adm import EncoderUNetModel, UNetModel, load_checkpoint

GOLDEN_ROOT = Path(__file__).parent / "golden"
F64_FACTOR, F64_FLOOR = 2.0, 1e-6  # error vs float64 ≤ 2 × the float32 reference's own + 1e-6
WORST: dict[str, tuple[float, float, str]] = {}  # per test: worst (error / allowed, error / reference's, what)


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
        f64 = folder / "reference_f64.safetensors"
        self.f64 = load_file(str(f64)) if f64.is_file() else None
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


def here_runs(g: Golden) -> dict:
    """ADM's own code run here on g's weights, one AdmHere per float32 variant (none where
    guided_diffusion is not importable)."""
    return {} if MISSING else {name: adm_here(g, name) for name in VARIANTS}


def assert_float64_parity(
    what: str, got: torch.Tensor, exact: torch.Tensor, references: dict, record: bool = True
) -> float:
    """error(got) ≤ F64_FACTOR × max error(float32 reference runs) + F64_FLOOR, all against float64
    (max-norm relative). Records the test's worst case for the report; returns error / allowed."""
    err = rel_err(got, exact)
    ref_errs = {name: rel_err(r, exact) for name, r in references.items() if r is not None}
    assert ref_errs, f"{what}: no float32 reference run has it"
    ref = max(ref_errs.values())
    used = err / (F64_FACTOR * ref + F64_FLOOR)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    if record and used > WORST.get(test, (-1.0,))[0]:
        WORST[test] = (used, err / max(ref, F64_FLOOR), what)
    detail = ", ".join(f"{n} {e:.3g}" for n, e in ref_errs.items())
    if MISSING:  # one recorded float32 run is a thin yardstick on another CPU
        detail += f"; ADM's loop was not run here: {MISSING}"
    assert used <= 1, (
        f"{what}: error against float64 {err:.3g} > {F64_FACTOR:g} × the float32 reference's ({detail})"
        f" + {F64_FLOOR:g}"
    )
    return used


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


def check_trajectory_against_float64(g: Golden, prefix: str, steps: list, result, record: bool = True) -> None:
    """Every recorded step, the result and the scales, each by assert_float64_parity."""
    runs = {"recorded": g.ref, **{name: run.trajectory(*prefix.split("_")) for name, run in here_runs(g).items()}}
    if f"{prefix}_traj" in g.f64:
        key = f"{prefix}_traj"
        assert len(steps) == g.f64[key].shape[0]
        for k, x in enumerate(steps):
            refs = {name: run[key][k] for name, run in runs.items() if key in run}
            assert_float64_parity(f"{prefix} step {k}", x, g.f64[key][k], refs, record)
    for key, got in ((f"{prefix}_x0", result.images), (f"{prefix}_scales", result.trace.scale)):
        assert_float64_parity(key, got, g.f64[key], {name: run.get(key) for name, run in runs.items()}, record)

"""The reference ADM implementation (openai/guided-diffusion, the test-only dependency
``guided-diffusion-sdk``) run on this machine, on a golden folder's weights, inputs and recorded noise.

A golden folder's ``reference.safetensors`` was made by the same code on another machine: float32
results depend on the CPU (vector width, FMA, the convolution kernels chosen), the thread count and
the memory format, so the reference's float32 error against ``reference_f64.safetensors`` is a
sample of a distribution, not one number. :data:`VARIANTS` are equally valid float32 runs of the
reference here (this process's thread count, another thread count, channels-last weights); the
first is the run fastguide's torch backend can be compared with bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
from unittest import mock

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

try:
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps
    from guided_diffusion.unet import EncoderUNetModel, UNetModel

    MISSING = None
except ImportError as e:  # the tests that need it say so; see setup.py's "test" extra
    MISSING = f"guided_diffusion is not importable ({e}); pip install guided-diffusion-sdk"


class _Model(torch.nn.Module):
    """ADM passes model_kwargs (y) to every model; the unconditional UNet takes no y."""

    def __init__(self, net, cond: bool):
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, x, t, y=None):
        return self.net(x, t, y) if self.cond else self.net(x, t)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# name -> (threads or None for this process's, channels-last weights)
VARIANTS = {
    "ADM here": (None, False),
    "ADM here, other thread count": (1 if torch.get_num_threads() > 1 else 2, False),
    "ADM here, channels-last": (None, True),
}


class AdmHere:
    """ADM's networks, diffusion and guided loops for one golden folder, run here in float32 as the
    variant ``variant`` of :data:`VARIANTS` says."""

    def __init__(self, golden, variant: str = "ADM here"):
        self.g, self.meta = golden, golden.meta
        self.threads, channels_last = VARIANTS[variant]
        folder = golden.folder
        self.unets = {}
        for name, cond in (("uncond", False), ("cond", True)):
            cfg = self.meta[f"unet_{name}"]
            net = UNetModel(
                out_channels=golden.channels * (2 if self.meta.get("learn_sigma", False) else 1),
                num_classes=golden.num_classes if cond else None,
                num_heads_upsample=cfg.get("num_heads_upsample", -1),
                **golden._unet_kwargs(cfg),
            )
            net.load_state_dict(load_file(str(folder / f"unet_{name}.safetensors")))
            self.unets[name] = _Model(net.eval(), cond)
        cfg = self.meta["classifier"]
        clf = EncoderUNetModel(
            out_channels=golden.num_classes, pool=cfg.get("pool", "adaptive"), **golden._unet_kwargs(cfg)
        )
        clf.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        self.classifier = clf.eval()
        if channels_last:
            for net in (*self.unets.values(), self.classifier):
                net.to(memory_format=torch.channels_last)

    def diffusion(self, method: str) -> SpacedDiffusion:
        m = self.meta
        betas = gd.get_named_beta_schedule(m["noise_schedule"], m["diffusion_steps"])
        learn_sigma = m.get("learn_sigma", False)
        return SpacedDiffusion(
            use_timesteps=space_timesteps(m["diffusion_steps"], m[f"{method}_respacing"]),
            betas=betas,
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
            loss_type=gd.LossType.MSE,
            rescale_timesteps=m.get("rescale_timesteps", False),
        )

    def _log_probs_and_grad(self, x, t, y):
        """classifier_sample.py's cond_fn without the scale: log_softmax and d/dx Σ log p(y_i|x_i)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(x)), y.view(-1)]
            return log_probs.detach(), torch.autograd.grad(selected.sum(), x_in)[0]

    def scale(self, guidance: str, log_probs: torch.Tensor) -> torch.Tensor:
        gamma = self.meta["gamma"]
        if guidance == "constant":
            return torch.full(log_probs.shape[:1], float(gamma))
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # the EDS release's s = γ·log K / H
        return gamma * math.log(self.g.num_classes) / entropy

    @functools.cache
    def probes(self) -> dict[str, torch.Tensor]:
        """The float32 probes of reference.safetensors, computed here."""
        with _threads(self.threads):
            return self._probes()

    def _probes(self) -> dict[str, torch.Tensor]:
        g = self.g
        x, t, y = g.x_T, g.probe_timesteps(), g.y
        with torch.no_grad():
            out = {f"probe_unet_{m}_out": self.unets[m](x, t, y) for m in self.unets}
            logits = self.classifier(x, t)
        log_probs, grad = self._log_probs_and_grad(x, t, y)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        out.update(probe_clf_logits=logits, probe_clf_grad=grad, probe_entropy=entropy)
        out["probe_eds_scale"] = self.scale("eds", log_probs)
        return out

    @functools.cache
    def trajectory(self, method: str, model: str, guidance: str) -> dict[str, torch.Tensor]:
        """ADM's p_sample_loop / ddim_sample_loop (progressive), guided as classifier_sample.py does, from
        x_T with the recorded DDPM noise: ``{prefix}_traj`` (every x_{t−1}), ``_x0`` and ``_scales``."""
        scales = []

        def cond_fn(x, t, y=None):
            log_probs, grad = self._log_probs_and_grad(x, t, y)
            s = self.scale(guidance, log_probs)
            scales.append(s)
            return grad * s.view(-1, 1, 1, 1)

        prefix = f"{method}_{model}_{guidance}"
        traj = self.loop(method, model, cond_fn, prefix)
        return {f"{prefix}_traj": traj, f"{prefix}_x0": traj[-1], f"{prefix}_scales": torch.stack(scales)}

    def loop(self, method: str, model: str, cond_fn, prefix: str) -> torch.Tensor:
        """(steps, B, C, H, W): every x_{t−1} of ADM's own progressive loop with ``cond_fn``, from the folder's
        x_T and the recorded noise of trajectory ``prefix`` (DDPM)."""
        g = self.g
        recorded = list(g.ref.get(f"{prefix}_noise", []))
        randn_like = torch.randn_like

        def noise_like(x, *args, **kwargs):  # DDIM with eta = 0 draws noise it multiplies by 0
            return recorded.pop(0).clone() if recorded else randn_like(x, *args, **kwargs)

        diffusion = self.diffusion(method)
        loop = diffusion.p_sample_loop_progressive if method == "ddpm" else diffusion.ddim_sample_loop_progressive
        extra = {"eta": self.meta.get("ddim_eta", 0.0)} if method == "ddim" else {}
        with mock.patch("torch.randn_like", noise_like), _threads(self.threads):
            steps = [
                out["sample"]
                for out in loop(
                    self.unets[model], tuple(g.x_T.shape), noise=g.x_T.clone(),
                    clip_denoised=self.meta.get("clip_denoised", True), cond_fn=cond_fn,
                    model_kwargs={"y": g.y}, device="cpu", **extra,
                )  # fmt: skip
            ]
        return torch.stack(steps)


@functools.cache
def adm_here(golden, variant: str = "ADM here") -> AdmHere:
    return AdmHere(golden, variant)

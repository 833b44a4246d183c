"""Write a golden folder for tests/test_adm_parity.py: the reference ADM implementation's own guided
loops (openai/guided-diffusion, ``pip install guided-diffusion-sdk``) on random weights, in float32
(``reference.safetensors``) and rerun in float64 (``reference_f64.safetensors``), in the format of
tests/golden/adm_tiny/README.md.

    python scripts/make_golden.py --out tests/golden/adm_cosine64 --image_size 64 --noise_schedule cosine \\
        --ddpm_respacing 12 --ddim_respacing ddim8 --channel_mult 1,2,2,2 --attention_ds 4,8 --num_head_channels 8

For the float64 run, ADM's float32 casts are switched off: ``Tensor.float()`` leaves float64 tensors
alone, the networks' ``dtype`` is float64, and the timestep embedding is computed in float64. Weights,
x_T, labels and the DDPM noise are the float32 run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import unet as adm_unet
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--noise_schedule", default="cosine")
    p.add_argument("--ddpm_respacing", default="12")
    p.add_argument("--ddim_respacing", default="ddim8")
    p.add_argument("--model_channels", type=int, default=32)
    p.add_argument("--channel_mult", default="1,2,2,2")
    p.add_argument("--attention_ds", default="4,8")
    p.add_argument("--num_head_channels", type=int, default=8)
    p.add_argument("--gamma", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def configs(args) -> dict:
    net = dict(
        model_channels=args.model_channels, num_res_blocks=1, num_head_channels=args.num_head_channels,
        channel_mult=[int(v) for v in args.channel_mult.split(",")],
        attention_ds=[int(v) for v in args.attention_ds.split(",")],
        num_heads=1, use_scale_shift_norm=True, resblock_updown=True,
    )  # fmt: skip
    return dict(
        preset="make_golden", num_classes=args.num_classes, image_size=args.image_size, batch=args.batch,
        gamma=args.gamma, noise_schedule=args.noise_schedule, diffusion_steps=1000,
        ddim_respacing=args.ddim_respacing, ddpm_respacing=args.ddpm_respacing, learn_sigma=True,
        rescale_timesteps=False, unet_uncond={**net, "use_new_attention_order": False},
        unet_cond={**net, "use_new_attention_order": True}, classifier={**net, "pool": "attention"},
    )  # fmt: skip


def _kwargs(meta: dict, cfg: dict) -> dict:
    return dict(
        image_size=meta["image_size"], in_channels=3, model_channels=cfg["model_channels"],
        num_res_blocks=cfg["num_res_blocks"], attention_resolutions=tuple(cfg["attention_ds"]),
        channel_mult=tuple(cfg["channel_mult"]), num_heads=cfg["num_heads"],
        num_head_channels=cfg["num_head_channels"], use_scale_shift_norm=cfg["use_scale_shift_norm"],
        resblock_updown=cfg["resblock_updown"],
    )  # fmt: skip


def build(meta: dict, gen: torch.Generator) -> dict:
    """ADM's networks with random weights: the parameters ADM initialises to zero (output layers,
    norms' biases) get N(0, 0.05²) so that every layer matters."""
    K = meta["num_classes"]
    nets = {
        "unet_uncond": adm_unet.UNetModel(
            out_channels=6, use_new_attention_order=False, **_kwargs(meta, meta["unet_uncond"])
        ),
        "unet_cond": adm_unet.UNetModel(
            out_channels=6, num_classes=K, use_new_attention_order=True, **_kwargs(meta, meta["unet_cond"])
        ),
        "classifier": adm_unet.EncoderUNetModel(out_channels=K, pool="attention", **_kwargs(meta, meta["classifier"])),
    }
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return {k: v.eval() for k, v in nets.items()}


@contextlib.contextmanager
def float64_adm(nets: dict):
    """ADM's code with its float32 casts switched off (see the module doc)."""
    real_float = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else real_float(self, *args, **kwargs)

    def embedding(timesteps, dim, max_period=10000):  # the sinusoidal embedding, in float64
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        args = timesteps[:, None].double() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb

    for net in nets.values():
        net.double().dtype = torch.float64
    try:
        with mock.patch.object(torch.Tensor, "float", keep_float64), mock.patch.object(
            adm_unet, "timestep_embedding", embedding
        ):
            yield
    finally:
        for net in nets.values():
            net.float().dtype = torch.float32


class Reference:
    """Probes and guided loops of ADM's code on the given networks, in the dtype of x_T."""

    def __init__(self, meta, nets, x_T, y, probe_t, noise):
        self.meta, self.nets, self.x_T, self.y, self.probe_t, self.noise = meta, nets, x_T, y, probe_t, noise

    def log_probs_and_grad(self, x, t, y):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.nets["classifier"](x_in, t), dim=-1)
            selected = log_probs[range(len(x)), y.view(-1)]
            return log_probs.detach(), torch.autograd.grad(selected.sum(), x_in)[0]

    def eds(self, log_probs):
        return self.meta["gamma"] * math.log(self.meta["num_classes"]) / -(log_probs.exp() * log_probs).sum(-1)

    def probes(self) -> dict:
        x, t, y = self.x_T, self.probe_t, self.y
        with torch.no_grad():
            out = {
                "probe_unet_uncond_out": self.nets["unet_uncond"](x, t),
                "probe_unet_cond_out": self.nets["unet_cond"](x, t, y),
                "probe_clf_logits": self.nets["classifier"](x, t),
            }
        log_probs, grad = self.log_probs_and_grad(x, t, y)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        out.update(probe_clf_grad=grad, probe_entropy=entropy, probe_eds_scale=self.eds(log_probs))
        ce = F.cross_entropy(out["probe_clf_logits"], y, reduction="none")
        out["probe_ect_loss_eta0.2"] = (ce + 0.2 * (math.log(self.meta["num_classes"]) - entropy)).mean().reshape(1)
        return out

    def loop(self, method: str, model: str, guidance: str) -> dict:
        m = self.meta
        diffusion = SpacedDiffusion(
            use_timesteps=space_timesteps(m["diffusion_steps"], m[f"{method}_respacing"]),
            betas=gd.get_named_beta_schedule(m["noise_schedule"], m["diffusion_steps"]),
            model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
            loss_type=gd.LossType.MSE, rescale_timesteps=False,
        )  # fmt: skip
        scales = []

        def cond_fn(x, t, y=None):
            log_probs, grad = self.log_probs_and_grad(x, t, y)
            s = self.eds(log_probs) if guidance == "eds" else torch.full((len(x),), m["gamma"], dtype=x.dtype)
            scales.append(s)
            return grad * s.view(-1, 1, 1, 1)

        net = self.nets[f"unet_{model}"]

        def model_fn(x, t, y=None):
            return net(x, t, y) if model == "cond" else net(x, t)

        model_fn.parameters = net.parameters  # ADM reads the device from the model's parameters
        steps = list(self.noise) if method == "ddpm" else []
        real = torch.randn_like

        def noise_like(x, *a, **k):
            return steps.pop(0).to(x.dtype) if steps else real(x, *a, **k)

        loop = diffusion.p_sample_loop_progressive if method == "ddpm" else diffusion.ddim_sample_loop_progressive
        shape, kwargs = tuple(self.x_T.shape), {"y": self.y}
        with mock.patch("torch.randn_like", noise_like):
            outs = loop(model_fn, shape, noise=self.x_T.clone(), clip_denoised=True, cond_fn=cond_fn, model_kwargs=kwargs,
                        device="cpu")  # fmt: skip
            traj = [o["sample"] for o in outs]
        prefix = f"{method}_{model}_{guidance}"
        return {f"{prefix}_traj": torch.stack(traj), f"{prefix}_x0": traj[-1], f"{prefix}_scales": torch.stack(scales)}

    def everything(self) -> dict:
        out = self.probes()
        for method in ("ddim", "ddpm"):
            for model in ("uncond", "cond"):
                for guidance in ("constant", "eds"):
                    out.update(self.loop(method, model, guidance))
        return out


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    meta = configs(args)
    torch.manual_seed(args.seed)  # ADM's own initialisation draws from the global generator
    gen = torch.Generator().manual_seed(args.seed)
    nets = build(meta, gen)
    S, B = args.image_size, args.batch
    x_T = torch.randn(B, 3, S, S, generator=gen)
    y = torch.randint(0, args.num_classes, (B,), generator=gen)
    probe_t = torch.randint(0, 1000, (B,), generator=gen)
    steps = len(space_timesteps(1000, args.ddpm_respacing))
    noise = torch.randn(steps, B, 3, S, S, generator=gen)
    for method in ("ddim", "ddpm"):
        meta[f"{method}_timestep_map"] = sorted(space_timesteps(1000, meta[f"{method}_respacing"]))
    ref32 = Reference(meta, nets, x_T, y, probe_t, noise).everything()
    for model in ("uncond", "cond"):
        for guidance in ("constant", "eds"):
            ref32[f"ddpm_{model}_{guidance}_noise"] = noise.clone()
    with float64_adm(nets):
        ref64 = Reference(meta, nets, x_T.double(), y, probe_t, noise.double()).everything()
    ref64 = {k: v for k, v in ref64.items() if not k.startswith("probe_ect")}
    for name, net in nets.items():
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"{name}.safetensors"))
    save_file({"x_T": x_T, "y": y, "probe_t": probe_t, **{k: v.contiguous() for k, v in ref32.items()}},
              str(out / "reference.safetensors"))  # fmt: skip
    save_file({k: v.contiguous() for k, v in ref64.items()}, str(out / "reference_f64.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    command = " ".join(["python", "scripts/make_golden.py", *sys.argv[1:]])
    (out / "README.md").write_text(
        f"# Golden reference made by scripts/make_golden.py\n\n`{command}`\n\nThe format and conventions are those of "
        "tests/golden/adm_tiny/README.md: ADM's own code (guided-diffusion-sdk) on random weights, float32 in "
        "reference.safetensors, the same loops rerun in float64 in reference_f64.safetensors.\n"
    )
    errs = {k: ((ref32[k].double() - v).abs().max() / v.abs().max()).item() for k, v in ref64.items() if k in ref32}
    worst = max(errs, key=errs.get)
    print(f"wrote {out}: the float32 reference's worst max-norm relative error against float64 is {errs[worst]:.2g}"
          f" ({worst})")  # fmt: skip


if __name__ == "__main__":
    main()

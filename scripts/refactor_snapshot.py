"""Everything the sampler computes on tiny networks, saved and compared bit for bit (issue 27's safety net).

    python scripts/refactor_snapshot.py save /tmp/fg-snap-base.pt     # before a refactoring
    python scripts/refactor_snapshot.py compare /tmp/fg-snap-base.pt  # after it: names the first difference

Covers every method × guidance policy × backend on eager float32 CPU (images, every trace field, every
step's x_prev and pred_xstart), the aot_eager-compiled step, guidance intervals, ``step()`` at mixed indices,
ADM's cond_fn, ``classifier_gradient`` and the compile estimate's counts. Its networks are built here (not
imported from the tests), so moving test helpers cannot change what it compares.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("FASTGUIDE_CPU_BF16", "none")  # as the tests pin it: float32 on every CPU

import torch  # noqa: E402

import fastguide as fg  # noqa: E402
from fastguide.adm import EncoderUNetModel, UNetModel  # noqa: E402

K = 4


def nets():
    torch.manual_seed(0)
    unet = UNetModel(8, 3, 32, 6, 1, (2,), channel_mult=(1, 2), num_head_channels=16, num_classes=K)
    clf = EncoderUNetModel(8, 3, 32, K, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
    with torch.no_grad():
        for p in [*unet.parameters(), *clf.parameters()]:
            p.normal_(0, 0.05)
    return unet.eval(), clf.eval()


METHODS = {"ddpm": dict(method="ddpm"), "ddim": dict(method="ddim"), "ddim-eta": dict(method="ddim", eta=0.5),
           "dpmpp2m": dict(method="dpmpp2m"), "unipc": dict(method="unipc", dynamic_threshold=0.9)}  # fmt: skip


def policies():
    return {"eds": fg.EntropyDriven(2.0), "constant": fg.Constant(3.0), "gradnorm": fg.GradientNorm(5.0, threshold=0.5),
            "callable": lambda s: 1.0 + s.entropy, "none": fg.NoGuidance()}  # fmt: skip


def run(out: dict, name: str, unet, clf, policy, respacing="ddim5", **cfg):
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, respacing), policy,
                               fg.SamplerConfig(**cfg))  # fmt: skip
    steps = []
    result = sampler.sample([1, 2, 3], seeds=[0, 1, 2], callback=lambda k, o, r: steps.append(o))
    out[f"{name}/images"] = result.images
    for field, value in result.trace._asdict().items():
        if isinstance(value, torch.Tensor):
            out[f"{name}/trace.{field}"] = value
    for k, o in enumerate(steps):
        out[f"{name}/{k}/x_prev"], out[f"{name}/{k}/pred_xstart"] = o.x_prev, o.pred_xstart


def snapshot() -> dict:
    out: dict = {}
    unet, clf = nets()
    for backend in ("torch", "auto"):
        with fg.ops.use_backend(None if backend == "auto" else backend):
            for m, cfg in METHODS.items():
                for p, policy in policies().items():
                    run(out, f"{backend}/{m}/{p}", unet, None if p == "none" else clf, policy, **cfg)
    os.environ["FASTGUIDE_COMPILE_BACKEND"] = "aot_eager"
    for m in ("ddim", "ddpm", "unipc"):
        torch._dynamo.reset()
        run(out, f"compiled/{m}", unet, clf, fg.EntropyDriven(2.0), compile=True, **METHODS[m])
    torch._dynamo.reset()
    run(out, "compiled/every", unet, clf, fg.EntropyDriven(2.0), compile=True, guidance_every=2,
        guidance_interval=(0, 700))  # fmt: skip
    del os.environ["FASTGUIDE_COMPILE_BACKEND"]
    run(out, "every", unet, clf, fg.EntropyDriven(2.0), guidance_every=2, guidance_interval=(0, 700))
    run(out, "paper", unet, clf, fg.EntropyDriven(2.0), ddim_guidance="paper")
    run(out, "noclip", unet, clf, fg.Constant(3.0), clip_denoised=False)

    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1])
    for m in ("ddpm", "ddim"):
        s = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0),
                             fg.SamplerConfig(method=m))  # fmt: skip
        o, r = s.step(x, torch.tensor([4, 1, 0]), y, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
        out[f"step/{m}/x_prev"], out[f"step/{m}/pred_xstart"], out[f"step/{m}/scale"] = o.x_prev, o.pred_xstart, r.scale

    t = torch.tensor([900, 500, 10])
    cond = fg.adm.eds_cond_fn(clf, 2.0)
    out["cond_fn/grad"] = cond(x, t, y=y)
    for i, rec in enumerate(getattr(cond, "records", [])):
        for field, value in rec._asdict().items():
            if isinstance(value, torch.Tensor):
                out[f"cond_fn/records/{i}/{field}"] = value
    for field, value in fg.classifier_gradient(clf, x, t, y)._asdict().items():
        out[f"classifier_gradient/{field}"] = value

    s = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0))
    est = s.compile_estimate("cpu", samples=1)
    out["estimate"] = torch.tensor([est.saved_s, est.compile_s] if est is not None else [], dtype=torch.float64)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN where the other has NaN: a trace's steps without a classifier call)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def main() -> None:
    mode, path = sys.argv[1:3]
    got = snapshot()
    if mode == "save":
        torch.save(got, path)
        print(f"saved {len(got)} tensors to {path}")
        return
    want = torch.load(path)
    missing = sorted(set(want) ^ set(got))
    if missing:
        sys.exit(f"keys differ: {missing[:10]}")
    for key in want:
        a, b = want[key], got[key]
        if a.dtype != b.dtype or a.shape != b.shape or not _same_bits(a, b):
            sys.exit(f"first difference: {key} (max |Δ| {(a.double() - b.double()).abs().max().item() if a.shape == b.shape else 'shape'})")
    print(f"all {len(want)} tensors equal bit for bit")


if __name__ == "__main__":
    main()

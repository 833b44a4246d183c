"""End-to-end guided sampling, timed side by side: ADM's loop against fastguide's eager and fast paths.

The contenders sample the same labels from the same x_T with the same networks (weights copied; an x0- or
v-prediction UNet, as the embedded cadm is, is sampled through the same eps view by all of them):

* ``adm``: ADM's own ``ddim_sample_loop`` / ``p_sample_loop`` (guided-diffusion-sdk) with a
  ``classifier_sample.py`` cond_fn, on ADM's own networks (fp16 torso on CUDA, as ADM's flags give);
* ``adm-style``: an eager loop written here in ADM's style (host-side timestep tables, a cond_fn with
  ``autograd.grad``, the update as separate torch ops), on fastguide's networks;
* ``eager``: ``GuidedSampler`` with compile off, float32;
* ``fast``: ``GuidedSampler`` with the whole step compiled (CUDA graphs on CUDA) and the precision
  ``"auto"`` picks (bf16 on CUDA and on a CPU with native bf16, float32 on other CPUs), and
  ``fast-fp32`` / ``fast-bf16`` to separate compilation from precision.

Used by ``test_bench_e2e.py`` (pytest-benchmark rows and the speed goals) and by
``python benchmarks/e2e.py`` (a Markdown table for benchmarks/RESULTS.md; scripts/gpu_check.sh runs it).
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastguide as fg
from fastguide.adm.networks.configs import ClassifierFlags, ModelFlags, adm_classifier_flags, adm_unet_flags

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak of the SXM parts


@dataclass(frozen=True)
class Case:
    """Networks (flags; the embedded weights where ``embedded``) and a sampler setting."""

    name: str
    unet: ModelFlags
    classifier: ClassifierFlags
    embedded: bool = False  # load fastguide's embedded cadm + classifier_ect weights
    scale: float = 1.0  # ADM's classifier scale / EDS γ


def cases() -> dict[str, Case]:
    from fastguide.pretrained import embedded_dir, run_flags

    small = dict(num_channels=64, use_fp16=False, dropout=0.0)
    tiny = dict(channel_mult="1,2", use_fp16=False, dropout=0.0)
    return {
        "embedded": Case("embedded", run_flags(embedded_dir("cadm")), run_flags(embedded_dir("classifier_ect")),
                         embedded=True, scale=3.0),  # fmt: skip
        "adm64-small": Case("adm64-small", adm_unet_flags(64, **small), adm_classifier_flags(64, classifier_width=64)),
        # adm64-small's architecture (64 px, 1000 classes, attention, resblock_updown, new attention order)
        # with two levels of one block: the benchmarks' quick mode (it compiles in a fraction of the time)
        "adm64-tiny": Case("adm64-tiny", adm_unet_flags(64, **tiny, num_channels=32, num_res_blocks=1,
                                                        attention_resolutions="32"),
                           adm_classifier_flags(64, channel_mult="1,2", classifier_width=32, classifier_depth=1,
                                                classifier_attention_resolutions="32")),  # fmt: skip
        "adm64": Case("adm64", adm_unet_flags(64, use_fp16=False, dropout=0.0), adm_classifier_flags(64)),
        "adm128": Case("adm128", adm_unet_flags(128, use_fp16=False, dropout=0.0), adm_classifier_flags(128)),
        "adm256": Case("adm256", adm_unet_flags(256, use_fp16=False, dropout=0.0), adm_classifier_flags(256)),
    }


def networks(case: Case, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """fastguide's UNet and classifier of ``case`` on ``device`` (random weights unless embedded)."""
    if case.embedded:
        from fastguide.pretrained import load_embedded

        unet, clf = load_embedded("cadm"), load_embedded("classifier_ect")
    else:
        torch.manual_seed(0)
        unet, clf = case.unet.build(), case.classifier.build()
        with torch.no_grad():  # ADM zero-initialises output layers: random weights everywhere instead
            for p in [*unet.parameters(), *clf.parameters()]:
                if not p.any():
                    p.normal_(0, 0.02)
    return unet.to(device).eval(), clf.to(device).eval()


def adm_networks(case: Case, unet, clf, fp16: bool):
    """ADM's own UNet and classifier with the same weights (None without guided-diffusion-sdk).

    fastguide's ``unet`` may be an x0- or v-prediction network behind its eps view
    (:class:`fastguide.diffusion.XStartToEps` / :class:`~fastguide.diffusion.VToEps`, as the embedded cadm
    is): ADM's UNet then gets the inner network's weights and the same eps view around it
    (``case.unet.eps_model``: the same conversion, by the original timestep ADM's respacing wrapper passes),
    so that ADM's loop samples the same eps-model as fastguide's contenders."""
    try:
        from guided_diffusion.unet import EncoderUNetModel, UNetModel
    except ImportError:
        return None
    from fastguide.diffusion import VToEps, XStartToEps

    inner = unet.net if isinstance(unet, (VToEps, XStartToEps)) else unet
    ours = [(UNetModel, case.unet, inner), (EncoderUNetModel, case.classifier, clf)]
    nets = []
    for cls, flags, net in ours:
        kwargs = {**flags.network_kwargs(), "use_fp16": False}
        adm = cls(**kwargs)
        adm.load_state_dict(net.state_dict())
        if fp16:
            adm.convert_to_fp16()
            adm.use_fp16, adm.dtype = True, torch.float16
        nets.append(adm.to(next(net.parameters()).device).eval())
    adm_unet, adm_clf = nets
    if inner is not unet:  # the eps view fastguide's unet is, around ADM's network
        adm_unet = case.unet.eps_model(adm_unet).to(next(unet.parameters()).device).eval()
    return adm_unet, adm_clf


# ---- the contenders ----


def adm_loop(case: Case, method: str, respacing: str, unet, clf, fp16: bool,
             accelerate: fg.SamplerConfig | None = None) -> Callable | None:  # fmt: skip
    """ADM's own loop with classifier_sample.py's cond_fn (None without guided-diffusion-sdk); with
    ``accelerate``, the same script with its one changed line, ``diffusion = accelerate(diffusion, config)``."""
    nets = adm_networks(case, unet, clf, fp16)
    if nets is None:
        return None
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    adm_unet, adm_clf = nets
    flags = case.unet
    diffusion = SpacedDiffusion(
        use_timesteps=space_timesteps(flags.diffusion_steps, respacing),
        betas=gd.get_named_beta_schedule(flags.noise_schedule, flags.diffusion_steps),
        model_mean_type=gd.ModelMeanType.EPSILON,  # an x0- or v-network comes behind its eps view
        model_var_type=gd.ModelVarType.LEARNED_RANGE if flags.learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
        rescale_timesteps=flags.rescale_timesteps,
    )

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(adm_clf(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * case.scale

    def model_fn(x, t, y=None):
        return adm_unet(x, t, y=y if flags.class_cond else None)  # by keyword: an eps view passes **kwargs on

    model_fn.parameters = adm_unet.parameters
    if accelerate is not None:
        diffusion = fg.adm.accelerate(diffusion, accelerate)
    loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop

    def run(x_T, y):
        return loop(model_fn, tuple(x_T.shape), noise=x_T, clip_denoised=True, cond_fn=cond_fn,
                    model_kwargs={"y": y}, device=x_T.device)  # fmt: skip

    return run


def adm_style_loop(case: Case, method: str, respacing: str, unet, clf) -> Callable:
    """ADM's step structure written out here: float64 tables on the host gathered at every step
    (``_extract_into_tensor``), the timestep map applied by a wrapper, a cond_fn with autograd.grad,
    p_mean_variance's update as separate torch ops."""
    schedule = case.unet.schedule(respacing)
    tables = {n: schedule.table(n).numpy() for n in fg.schedule.StepCoefficients._fields}
    timestep_map = torch.tensor(schedule.timestep_map)
    class_cond = case.unet.class_cond

    def extract(name, t, x):
        return torch.from_numpy(tables[name]).to(device=t.device)[t].float().view(-1, 1, 1, 1).expand(x.shape)

    def run(x_T, y):
        img = x_T
        for i in reversed(range(schedule.num_steps)):
            t = torch.tensor([i] * len(img), device=img.device)
            t_orig = timestep_map.to(img.device)[t]
            with torch.no_grad():
                out = unet(img, t_orig, y=y) if class_cond else unet(img, t_orig)
            eps, v = out.split(img.shape[1], dim=1) if out.shape[1] == 2 * img.shape[1] else (out, None)
            with torch.enable_grad():  # classifier_sample.py's cond_fn
                x_in = img.detach().requires_grad_(True)
                log_probs = F.log_softmax(clf(x_in, t_orig), dim=-1)
                grad = torch.autograd.grad(log_probs[range(len(img)), y].sum(), x_in)[0] * case.scale
            xstart = (extract("sqrt_recip_alpha_bar", t, img) * img
                      - extract("sqrt_recipm1_alpha_bar", t, img) * eps).clamp(-1, 1)  # fmt: skip
            if method == "ddim":  # condition_score, then ddim_sample with eta = 0
                ab, ab_prev = extract("alpha_bar", t, img), extract("alpha_bar_prev", t, img)
                eps = (extract("sqrt_recip_alpha_bar", t, img) * img - xstart) / extract("sqrt_recipm1_alpha_bar", t, img)
                eps = eps - (1 - ab).sqrt() * grad
                xstart = extract("sqrt_recip_alpha_bar", t, img) * img - extract("sqrt_recipm1_alpha_bar", t, img) * eps
                img = xstart * ab_prev.sqrt() + (1 - ab_prev).sqrt() * eps
            else:  # p_mean_variance with learned range, condition_mean, p_sample
                frac = (v + 1) / 2
                log_var = frac * extract("log_beta", t, img) + (1 - frac) * extract("posterior_log_variance_clipped", t, img)
                mean = extract("posterior_mean_coef1", t, img) * xstart + extract("posterior_mean_coef2", t, img) * img
                mean = mean.float() + torch.exp(log_var) * grad.float()
                nonzero = (t != 0).float().view(-1, 1, 1, 1)
                img = mean + nonzero * torch.exp(0.5 * log_var) * torch.randn_like(img)
        return img

    return run


def fastguide_loop(case: Case, method: str, respacing: str, unet, clf, **config) -> Callable:
    """GuidedSampler with EDS-free constant guidance (the same work as ADM's loop) and ``config``."""
    sampler = fg.GuidedSampler(unet, clf, case.unet.schedule(respacing), fg.Constant(case.scale),
                               fg.SamplerConfig(method=method, **config))  # fmt: skip
    shape = (case.unet.in_channels, case.unet.image_size, case.unet.image_size)

    def run(x_T, y):
        steps = torch.randn((sampler.schedule.num_steps, *x_T.shape), generator=torch.Generator().manual_seed(1))
        return sampler.sample(y, noise=fg.FixedNoise(x_T, steps.to(x_T.device)), device=x_T.device).images

    run.shape = shape
    return run


def contenders(case: Case, method: str, respacing: str, device: torch.device, which: tuple[str, ...]) -> dict:
    unet, clf = networks(case, device)
    cuda = device.type == "cuda"
    make = {
        "adm": lambda: adm_loop(case, method, respacing, unet, clf, fp16=cuda),
        "adm-style": lambda: adm_style_loop(case, method, respacing, unet, clf),
        "eager": lambda: fastguide_loop(case, method, respacing, unet, clf, compile=False, precision="float32"),
        # compiled, with the precision "auto" picks: bfloat16 on CUDA and on a CPU with native bf16 (on other
        # CPUs bf16 is emulated and slower than float32: fastguide.cpu.bf16_kind)
        "fast": lambda: fastguide_loop(case, method, respacing, unet, clf, compile=True,
                                       cuda_graphs=None if cuda else False, precision="auto"),  # fmt: skip
        "fast-fp32": lambda: fastguide_loop(case, method, respacing, unet, clf, compile=True, precision="float32"),
        "fast-bf16": lambda: fastguide_loop(case, method, respacing, unet, clf, compile=False, precision="bfloat16"),
        # ADM's script with accelerate(diffusion): its own cond_fn and model_fn, fastguide's compiled loop
        "adm-accelerated": lambda: adm_loop(case, method, respacing, unet, clf, fp16=cuda, accelerate=fg.SamplerConfig(
            compile=True, precision="auto")),
    }
    runs = {name: make[name]() for name in which}
    return {name: run for name, run in runs.items() if run is not None}


# ---- timing ----


@dataclass
class Timing:
    name: str
    first_s: float  # the first run: compilation included
    runs_s: list[float]  # steady-state runs, in the order they ran
    steps: int
    batch: int
    peak_mb: float | None = None
    output: torch.Tensor | None = field(default=None, repr=False)  # the images of the last run

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.median_s / self.steps

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s

    @property
    def compile_s(self) -> float:
        return max(0.0, self.first_s - self.median_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(runs: dict[str, Callable], x_T: torch.Tensor, y: torch.Tensor, steps: int,
                      rounds: int = 3) -> dict[str, Timing]:  # fmt: skip
    """Each contender once (compiling) and then ``rounds`` times in alternation, so that all see the same
    machine load; medians of whole runs (and each contender's last images, ``Timing.output``)."""
    device = x_T.device
    timings = {}
    for name, run in runs.items():
        _sync(device)
        start = time.perf_counter()
        run(x_T, y)
        _sync(device)
        timings[name] = Timing(name, time.perf_counter() - start, [], steps, len(x_T))
    for _ in range(rounds):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            out = run(x_T, y)
            _sync(device)
            timings[name].runs_s.append(time.perf_counter() - start)
            timings[name].output = out
            if device.type == "cuda":
                timings[name].peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                timings[name].peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak
    return timings


def step_flops(case: Case, batch: int, device: torch.device) -> int:
    """FLOPs of one guided step (UNet forward, classifier forward and input-gradient backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, clf = networks(case, device)
    size, c = case.unet.image_size, case.unet.in_channels
    x = torch.randn(batch, c, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            unet(x, t, y=y) if case.unet.class_cond else unet(x, t)
        x_in = x.requires_grad_(True)
        torch.autograd.grad(clf(x_in, t).logsumexp(-1).sum(), x_in)
    return counter.get_total_flops()


def setup(case_name: str, batch: int, method: str, respacing: str, device: str, which) -> tuple:
    """(contenders, x_T, y, steps) of one setting."""
    case = cases()[case_name]
    dev = torch.device(device)
    runs = contenders(case, method, respacing, dev, tuple(which))
    g = torch.Generator().manual_seed(0)
    size, c = case.unet.image_size, case.unet.in_channels
    x_T = torch.randn(batch, c, size, size, generator=g).to(dev)
    y = (torch.arange(batch) % case.unet.num_classes).to(dev)
    return runs, x_T, y, case.unet.schedule(respacing).num_steps


def measure(case_name: str, batch: int, method: str = "ddim", respacing: str = "ddim25",
            device: str = "cpu", which=("adm", "adm-style", "eager", "fast"), rounds: int = 3) -> dict[str, Timing]:  # fmt: skip
    """Every contender of one setting, timed side by side (:func:`time_side_by_side`)."""
    runs, x_T, y, steps = setup(case_name, batch, method, respacing, device, which)
    return time_side_by_side(runs, x_T, y, steps, rounds)


def markdown(rows: list[tuple[str, int, str, dict[str, Timing]]], device: torch.device) -> str:
    """A RESULTS.md table: per case/batch/sampler, each contender's ms/step, images/s, speedup over ADM,
    compile time, peak memory (and on a GPU, the share of the bf16 FLOP floor)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    lines = ["| case | batch | sampler | contender | ms/step | images/s | × ADM | compile s | peak MiB |"
             + (" bf16 floor |" if peak else ""),
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if peak else "")]  # fmt: skip
    for case_name, batch, sampler, timings in rows:
        base = timings.get("adm") or timings.get("adm-style")
        flops = step_flops(cases()[case_name], batch, device) if peak else None
        for t in timings.values():
            speedup = base.median_s / t.median_s if base else math.nan
            row = (f"| {case_name} | {batch} | {sampler} | {t.name} | {t.ms_per_step:.1f} | {t.images_per_s:.2f} | "
                   f"{speedup:.2f} | {t.compile_s:.0f} | {t.peak_mb or 0:.0f} |")  # fmt: skip
            if peak:
                floor_ms = 1000 * flops / (peak * 1e12)
                row += f" {floor_ms / t.ms_per_step:.0%} |"
            lines.append(row)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="End-to-end guided sampling: ADM's loop vs fastguide, side by side.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=None, help="comma list (default: adm64,adm128,adm256 on CUDA, embedded,adm64-small on CPU)")
    p.add_argument("--batches", default=None, help="comma list (default: 1,8,32 on CUDA, 1,8,16 on CPU)")
    p.add_argument("--samplers", default="ddim25", help="comma list of ddimN / N (DDPM) respacings")
    p.add_argument("--contenders", default="adm,adm-style,eager,fast")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    names = (args.cases or ("adm64,adm128,adm256" if cuda else "embedded,adm64-small")).split(",")
    batches = [int(b) for b in (args.batches or ("1,8,32" if cuda else "1,8,16")).split(",")]
    rows = []
    for name in names:
        for batch in batches:
            for sampler in args.samplers.split(","):
                method = "ddim" if sampler.startswith("ddim") else "ddpm"
                timings = measure(name, batch, method, sampler, args.device, args.contenders.split(","), args.rounds)
                rows.append((name, batch, sampler, timings))
                print("\n".join(markdown(rows[-1:], torch.device(args.device)).splitlines()[2:]), file=sys.stderr,
                      flush=True)  # fmt: skip
    print(markdown(rows, torch.device(args.device)))


if __name__ == "__main__":
    main()

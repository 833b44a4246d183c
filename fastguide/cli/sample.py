"""``fastguide sample``: the embedded models (or run folders) sampled with a guidance policy, written as a PNG
grid, ADM's .npz, the trace plot and run.json. Every argument is checked (and the output folder probed for
writing) before a network is loaded; the files replace an earlier run's as a whole (:mod:`.staging`)."""

from __future__ import annotations

import json
import time

import numpy as np

from ..files import check_disk_space, check_output_folder
from ..guidance import POLICIES
from ..solvers import SOLVERS
from .args import add_fast_path_arguments, add_guidance_schedule_arguments, _int_list, refuse_torchrun, sampler_options
from .staging import Staging

DEFAULT_OUT = "fastguide-out"

MAX_GRAD_MAPS = 16  # samples in the gradient-map figure (its height grows with them)

GRAD_MAP_STEPS = 8  # maps at equal intervals over the chain, as the paper's Fig. 4

# EDS γ of `fastguide sample` when --scale is not given, by whether the UNet is class-conditional: the best γ of
# the committed grid's DDIM-25 sweep with the ECT classifier (docs/results). A class-conditional UNet needs a
# nudge: γ = 3 costs CADM recall, FID 2.48 against 1.50 at γ = 1 (unguided: 2.01); UADM needs all of it (γ = 3:
# 1.89, γ = 1: 8.03, unguided: 11.7).
DEFAULT_GAMMA = {"class-conditional": 1.0, "unconditional": 3.0}


def default_gamma(class_cond: bool) -> float:
    """`fastguide sample`'s EDS γ for a class-conditional (or an unconditional) UNet."""
    return DEFAULT_GAMMA["class-conditional" if class_cond else "unconditional"]


def add_sample_command(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="Sample from the embedded models (EDS by default): PNG grid, ADM .npz, trace plot.",
        description="Classifier-guided sampling. With no arguments: the embedded class-conditional UNet, the "
        "ECT classifier, EDS, DDIM-25, 8 samples of each of the 10 digits.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--model", default="cond", help="cond | uncond (embedded UNets) or a run folder (default: cond)")
    p.add_argument("--classifier", default="ect", help="ect | ce (embedded classifiers) or a run folder (default: ect)")
    p.add_argument("--classes", default="all", help="comma-separated class ids, or 'all' (default: all)")
    p.add_argument("--count", type=int, default=8, help="samples per class (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i (default: 0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, one per sample (overrides --seed)")
    p.add_argument("--policy", default="eds", choices=sorted(POLICIES), help="guidance policy (default: eds)")
    p.add_argument("--scale", "--gamma", dest="scale", type=float, default=None,
                   help=f"γ for eds (default {default_gamma(True):g} for a class-conditional UNet, "
                   f"{default_gamma(False):g} for an unconditional one), s for constant, C/c for the others")  # fmt: skip
    p.add_argument("--threshold", type=float, default=None, help="gradient-norm policy: the norm bound M")
    p.add_argument("--t_max", type=int, default=None, help="constant-range policy: last t that gets c")
    p.add_argument("--method", default="ddim", choices=list(SOLVERS),
                   help=f"sampler: {', '.join(f'{n} ({s.label})' for n, s in SOLVERS.items())} (default: ddim)")  # fmt: skip
    p.add_argument("--respacing", default=None,
                   help="ADM timestep_respacing (default: "
                   f"{', '.join(f'{s.default_respacing} for {n}' for n, s in SOLVERS.items())})")  # fmt: skip
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    add_guidance_schedule_arguments(p)
    p.add_argument("--batch_size", type=int, default=100, help="samples per batch (default: 100)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_fast_path_arguments(p)
    p.add_argument("--grad_maps", type=int, default=0, metavar="M",
                   help="also plot |s·∇| of the first M samples at 8 steps, this policy against ADM's constant "
                   "scale 1 on the same seeds (Fig. 4; default: 0 = off)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(_run=run_sample)


def _sample_plan(args) -> dict:
    """Everything ``sample`` will do, checked; raises ValueError naming the bad value."""
    from ..adm.networks.configs import ClassifierFlags, ModelFlags
    from ..generate import CLASSIFIERS, DEFAULT_RESPACING, MODELS, build_policy, run_dir
    from ..pretrained import run_flags
    from ..config import SamplerConfig

    flags = run_flags(run_dir(args.model, MODELS, "--model"))
    if not isinstance(flags, ModelFlags):
        raise ValueError(f"--model {args.model!r} is a classifier run, not a diffusion UNet")
    guided = args.policy != "none"
    num_classes = flags.num_classes
    if guided:
        clf_flags = run_flags(run_dir(args.classifier, CLASSIFIERS, "--classifier"))
        if not isinstance(clf_flags, ClassifierFlags):
            raise ValueError(f"--classifier {args.classifier!r} is a diffusion run, not a classifier")
        num_classes = clf_flags.num_classes if not flags.class_cond else min(num_classes, clf_flags.num_classes)
    else:
        for name, value, default in (("--scale", args.scale, None), ("--grad_maps", args.grad_maps, 0)):
            if value != default:
                raise ValueError(f"{name} {value} has no effect with --policy none")
    if not guided:
        for name in ("guidance_every", "guidance_interval"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} {getattr(args, name)} has no effect with --policy none")
    if args.classes == "all":
        classes = list(range(num_classes))
    else:
        classes = _int_list(args.classes, "--classes")
        if not classes:
            raise ValueError("--classes is empty")
    for c in classes:
        if not 0 <= c < num_classes:
            raise ValueError(f"unknown class {c}: the models have classes 0..{num_classes - 1}")
    if args.count < 1:
        raise ValueError(f"--count must be a positive number of samples per class, got {args.count}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if not 0 <= args.grad_maps <= MAX_GRAD_MAPS:
        raise ValueError(f"--grad_maps must be between 0 and {MAX_GRAD_MAPS} samples, got {args.grad_maps}")
    schedule = flags.schedule(DEFAULT_RESPACING[args.method] if args.respacing is None else args.respacing)
    _check_disk_space(args, len(classes) * args.count, flags.in_channels * flags.image_size**2, schedule.num_steps)
    labels = [c for c in classes for _ in range(args.count)]
    if args.seeds is not None:
        seeds = _int_list(args.seeds, "--seeds")
        if len(seeds) != len(labels):
            raise ValueError(f"--seeds gives {len(seeds)} seeds for {len(labels)} samples "
                             f"({len(classes)} classes x {args.count})")  # fmt: skip
    else:
        seeds = [args.seed + i for i in range(len(labels))]
    for s in seeds:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed {s} is not in [0, 2**63)")
    strength = args.scale if args.scale is not None or args.policy != "eds" else default_gamma(flags.class_cond)
    policy = build_policy(args.policy, strength, args.threshold, args.t_max)
    options = sampler_options(args)
    config = SamplerConfig(method=args.method, eta=args.eta, **options)  # checks the sampler's settings
    if guided:
        config.guidance_plan(schedule)  # the interval must hold a step of this chain
    return dict(labels=labels, seeds=seeds, policy=policy, classes=classes, num_classes=num_classes, options=options)


def _check_disk_space(args, n: int, pixels: int, steps: int) -> None:
    """ValueError when ``n`` samples cannot be written where --out is: ``sample`` streams its images and
    traces (3 float32 per step and sample) to disk as it goes, then writes the .npz."""
    check_disk_space(args.out, n * (2 * pixels + 3 * 4 * steps), f"--count {args.count} ({n} samples)",
                     "images and traces while sampling, then the .npz")  # fmt: skip


def run_sample(args) -> None:
    refuse_torchrun("sample")
    from ..generate import build_policy, generate, load_networks, make_sampler, resolve_device, save_npz
    from ..plots import _pyplot, save_grad_maps, save_grid, save_trace_plot

    plan = _sample_plan(args)
    extra = plan["options"]
    device = resolve_device(args.device)
    out = check_output_folder(args.out)
    _pyplot()  # the plots' dependency, before any work
    start = time.perf_counter()
    guided = args.policy != "none"
    nets = load_networks(args.model, args.classifier if guided else None, device)
    sampler = make_sampler(nets, plan["policy"], args.method, args.respacing, args.eta, args.compile, args.precision,
                           planned_samples=len(plan["labels"]), **extra)  # fmt: skip
    n_steps = sampler.schedule.num_steps
    m = min(args.grad_maps, len(plan["labels"]))
    map_steps = sorted({round(i * (n_steps - 1) / (GRAD_MAP_STEPS - 1)) for i in range(GRAD_MAP_STEPS)}) if m else []
    with Staging(out) as stage:  # the images and traces stream into it as they are made
        gen = generate(sampler, plan["labels"], plan["seeds"], args.batch_size, device, progress=not args.quiet,
                       grad_map_steps=map_steps, grad_map_samples=m, store=stage.tmp)  # fmt: skip
        seconds = time.perf_counter() - start
        baseline = None
        if map_steps:  # Fig. 4 compares with ADM's constant scale 1 on the same seeds
            base_sampler = make_sampler(nets, build_policy("constant", 1.0), args.method, args.respacing, args.eta,
                                        args.compile, args.precision, planned_samples=m, **extra)  # fmt: skip
            baseline = generate(base_sampler, plan["labels"][:m], plan["seeds"][:m], args.batch_size, device,
                                progress=False, grad_map_steps=map_steps, grad_map_samples=m)  # fmt: skip
        what = (f"{args.model} UNet, {args.classifier} classifier, {plan['policy']!r}, {args.method} "
                f"{n_steps} steps" if guided else f"{args.model} UNet, unguided, {args.method} {n_steps} steps")  # fmt: skip
        n, h, w, c = gen.images.shape
        names = {"grid": "grid.png", "samples": f"samples_{n}x{h}x{w}x{c}.npz", "run": "run.json"}
        if guided:
            names["trace"] = "trace.png"
        if map_steps:
            names["grad_maps"] = "grad_maps.png"
        summary = {
            "what": what,
            "samples": n,
            "sampling_seconds": round(seconds, 2),
            "device": str(device),
            "precision": args.precision,
            "fast_path": (fast := sampler.fast_path(device))._asdict() | {"autocast": str(fast.autocast)},
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "files": names,
        }
        if gen.entropy is not None:
            called = [k for k in range(len(gen.entropy)) if not np.isnan(gen.entropy[k]).all()]  # classifier steps
            summary["mean_entropy_first_last"] = [float(gen.entropy[called[0]].mean()), float(gen.entropy[called[-1]].mean())]
            summary["mean_scale_first_last"] = [float(gen.scale[0].mean()), float(gen.scale[-1].mean())]
        save_npz(stage.path(names["samples"]), gen.images, gen.labels)
        save_grid(stage.path(names["grid"]), gen.images, gen.labels)
        if guided:
            save_trace_plot(stage.path(names["trace"]), gen, what, plan["num_classes"])
        if map_steps:
            save_grad_maps(stage.path(names["grad_maps"]), gen, what, baseline, "constant s=1 (ADM)")
        stage.path(names["run"]).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{n} samples ({what}) in {seconds:.1f} s")
    if stage.removed:
        print(f"  (removed the earlier run's {', '.join(stage.removed)} from {out})")
    for name in names.values():
        print(f"  {out / name}")

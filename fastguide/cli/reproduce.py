"""``fastguide reproduce``: the paper's ablations on MNIST 5k (the grid, its rows and report:
:mod:`fastguide.reproduce`)."""

from __future__ import annotations

import argparse
import sys
import time

from ..evaluation import DEFAULT_EVAL_NET, EVAL_NETS
from ..files import atomic_write
from ..reproduce import (CLASSIFIERS, GRADIENT_NORM_THRESHOLD, IMAGE_STATS, KEY_COLUMNS, METHOD_CHOICES, METRICS,
                         MODELS, POLICY_ORDER, QUICK_RESPACING, QUICK_SWEEPS, RESPACING, SAMPLERS, SWEEPS, _num,
                         _read_rows, _write_csv, markdown, plan, respacing_flag, row_key)
from ..solvers import METHODS, SOLVERS, Multistep
from .args import add_fast_path_arguments, refuse_torchrun


def add_reproduce_command(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="The paper's ablations on MNIST 5k: policies x {CE, ECT} x {uncond, cond} x {DDIM-25, DDPM-250}.",
        description="Sweeps every policy's strength, scores each run (FID, IS, precision, recall, class "
        "accuracy), and writes results.md, results.csv and sweep plots.",
    )
    add_arguments(p)
    p.set_defaults(_run=_run_reproduce)


def _run_reproduce(args) -> None:
    refuse_torchrun("reproduce")
    run(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="fastguide-reproduce", help="output folder (default: ./fastguide-reproduce)")
    p.add_argument("--quick", action="store_true",
                   help="fewer samples and sweep points: the whole grid in < 15 min on 2 CPU cores")  # fmt: skip
    p.add_argument("--num_samples", type=int, default=None, help="samples per run (default: 150; --quick: 100)")
    p.add_argument("--samplers", "--method", dest="samplers", default=",".join(SAMPLERS),
                   help=f"comma list of {list(METHOD_CHOICES)} (default: {','.join(SAMPLERS)})")  # fmt: skip
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--classifiers", default=",".join(CLASSIFIERS), help=f"comma list of {list(CLASSIFIERS)}")
    p.add_argument("--policies", default=",".join(POLICY_ORDER),
                   help=f"comma list of {list(POLICY_ORDER)} (none: the unguided baseline; default: all)")  # fmt: skip
    for name, solver in SOLVERS.items():
        if not solver.multistep:
            p.add_argument(f"--{respacing_flag(name)}", default=None, help=f"respacing of the {solver.label} runs "
                           f"(default: {solver.default_respacing}; --quick: {solver.quick_respacing})")  # fmt: skip
    multistep = [name for name, solver in SOLVERS.items() if solver.multistep]
    p.add_argument("--solver_respacing", default=None, help=f"respacing of the {' and '.join(multistep)} runs "
                   f"(default: {Multistep.default_respacing}; --quick: {Multistep.quick_respacing})")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=250, help="samples per batch (default: 250)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.csv")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rewrite results.md and the plots from OUT/results.csv (lists missing runs)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--eval_net", default=DEFAULT_EVAL_NET, choices=sorted(EVAL_NETS),
                   help=f"the evaluation network that scores the runs (default: {DEFAULT_EVAL_NET})")  # fmt: skip
    add_fast_path_arguments(p)


def _choices(text: str, allowed, what: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad[0] if bad else text!r}; expected a comma list of {list(allowed)}")
    return values


def run(args: argparse.Namespace) -> None:
    from ..files import check_output_folder
    from ..evaluation import Evaluator
    from ..generate import build_policy, generate, load_networks, make_sampler, resolve_device
    from ..plots import save_sweep_plot
    from ..schedule import Schedule

    models = _choices(args.models, MODELS, "model")
    classifiers = _choices(args.classifiers, CLASSIFIERS, "classifier")
    samplers = _choices(args.samplers, METHOD_CHOICES, "sampler")
    policies = _choices(args.policies, POLICY_ORDER, "policy")
    n = args.num_samples if args.num_samples is not None else (100 if args.quick else 150)
    if n < 10:
        raise ValueError(f"--num_samples must be at least 10 (one per class and enough for the metrics), got {n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    defaults = QUICK_RESPACING if args.quick else RESPACING
    given = {m: getattr(args, respacing_flag(m)) for m in METHODS}  # "" is ADM's: every step
    respacing = {m: defaults[m] if given[m] is None else given[m] for m in given}
    steps = {m: Schedule.create("linear", 1000, respacing[m]).num_steps for m in samplers}  # checks respacing
    names = {method: f"{method}-{steps[method]}" for method in samplers}
    device = resolve_device(args.device)
    out = check_output_folder(args.out)
    runs = plan(models, classifiers, tuple(names[m] for m in samplers), QUICK_SWEEPS if args.quick else SWEEPS,
                policies)
    if args.report and not (out / "results.csv").is_file():
        raise ValueError(f"--report: no {out / 'results.csv'} to report on")
    rows = _read_rows(out / "results.csv") if args.resume or args.report else []
    other = sorted({r["num_samples"] for r in rows} - {str(n)})
    if other:
        raise ValueError(f"{'--report' if args.report else '--resume'}: {out / 'results.csv'} holds runs of "
                         f"{other[0]} samples, not {n}; "
                         "use another --out or the same --num_samples")  # fmt: skip
    nets = sorted({r["eval_net"] for r in rows} - {args.eval_net})
    if nets and not args.report:
        raise ValueError(f"--resume: {out / 'results.csv'} holds runs scored by the {nets[0]} evaluation network, not "
                         f"{args.eval_net}; use another --out or --eval_net {nets[0]}")  # fmt: skip
    done = {row_key(r) for r in rows}
    todo = [r for r in runs if r.key not in done]
    print(f"reproduce: {len(runs)} runs ({len(runs) - len(todo)} already done), {n} samples each, "
          f"{' and '.join(names.values())}, on {device}" + (", report only" if args.report else ""), flush=True)  # fmt: skip
    missing, todo = (todo, []) if args.report else ([], todo)
    evaluator = Evaluator(device=device, eval_net=args.eval_net) if todo else None
    labels, seeds = [i % 10 for i in range(n)], list(range(n))
    out.mkdir(parents=True, exist_ok=True)
    command = "fastguide reproduce " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["reproduce"] else "fastguide reproduce"
    settings = (f"Settings: {n} samples per run (labels i mod 10, seeds i); samplers "
                f"{', '.join(f'{names[m]} (respacing {respacing[m]})' for m in samplers)}, DDIM eta 0; "
                f"constant-range: c for t <= 700, s = 1 above; gradient-norm: c where "
                f"‖∇‖ < {GRADIENT_NORM_THRESHOLD}, s = 1 elsewhere; timestep-aware: s = C·(T − t).")  # fmt: skip
    nets_cache: dict[tuple, object] = {}
    for i, r in enumerate(todo):
        key = (r.model, None if r.policy == "none" else r.classifier)
        if key not in nets_cache:
            nets_cache[key] = load_networks(r.model, key[1], device)
        strength = None if r.policy == "none" else r.strength
        threshold = GRADIENT_NORM_THRESHOLD if r.policy == "gradient-norm" else None
        policy = build_policy(r.policy, strength, threshold)
        method = r.sampler.split("-")[0]
        # each run weighs its own compile (compile=None: fastguide.cost, counted cold although the grid's
        # runs share their graphs), so a grid of short runs stays eager on the CPU
        sampler = make_sampler(nets_cache[key], policy, method, respacing[method], compile=args.compile,
                               precision=args.precision, planned_samples=n)  # fmt: skip
        start = time.perf_counter()
        desc = f"[{i + 1}/{len(todo)}] {r.model} {r.sampler} {r.classifier} {r.policy} {r.strength:g}"
        try:
            gen = generate(sampler, labels, seeds, args.batch_size, device, progress=not args.quiet, desc=desc)
            scores = evaluator(gen.images, gen.labels).as_dict()
        except (FloatingPointError, ValueError) as err:  # a diverging setting is a result, not a crash
            print(f"{desc}: failed, recorded without metrics ({' '.join(str(err).split())})", flush=True)
            scores = {m: "" for m in METRICS + IMAGE_STATS}
        row = dict(zip(KEY_COLUMNS, r.key), num_samples=n, seconds=f"{time.perf_counter() - start:.1f}",
                   eval_net=args.eval_net)  # fmt: skip
        row.update({m: (f"{scores[m]:.6g}" if scores[m] != "" else "") for m in METRICS + IMAGE_STATS})
        rows.append(row)
        _write_csv(out / "results.csv", rows)
        print(f"{desc}: " + ", ".join(f"{m} {row[m]}" for m in METRICS) + f" ({row['seconds']} s)", flush=True)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown(rows, command, settings, missing)))
    numeric = [dict(r, strength=float(r["strength"]), **{m: _num(r, m) for m in METRICS}) for r in rows
               if r["policy"] != "none"]  # fmt: skip
    for model in models:
        for sampler in names.values():
            for classifier in classifiers:
                sel = [r for r in numeric if (r["model"], r["sampler"], r["classifier"]) == (model, sampler, classifier)]
                unguided = [dict(r, **{m: _num(r, m) for m in METRICS}) for r in rows
                            if (r["model"], r["sampler"], r["policy"]) == (model, sampler, "none")]  # fmt: skip
                if sel:
                    save_sweep_plot(out / f"sweep_{model}_{sampler}_{classifier}.png", sel, ("fid", "class_accuracy", "recall"),
                                    f"{model} UNet, {sampler}, {classifier.upper()} classifier",
                                    unguided[0] if unguided else None)  # fmt: skip
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'} and the sweep plots")

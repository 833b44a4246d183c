"""``fastguide reproduce``: the paper's ablations (its Tables 1-3 and supplement Fig. 1-2) on MNIST 5k.

Grid: guidance policy {constant (ADM), constant-range, timestep-aware, gradient-norm, EDS} × classifier
{CE, ECT} × model {uncond (UADM), cond (CADM)} × sampler {DDIM-25, DDPM-250}, each policy's strength
swept over :data:`SWEEPS` (``--quick``: DDIM-10 and DDPM-25, 100 samples, the middle strength only),
plus the unguided baseline of each model and sampler. Every run draws the same labels (``i mod 10``)
and seeds (``i``), so runs differ only in what is compared. Each run is scored with
:class:`fastguide.evaluation.Evaluator` (embedded evaluation network, held-out split); per policy the
strength with the best FID is reported, as the paper does.

Outputs (in ``--out``): ``results.csv`` (every run), ``results.md`` (best per policy, and the command),
``sweep_<model>_<sampler>_<classifier>.png``. The CSV is rewritten after each run, and ``--resume``
skips the runs already in it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write, atomic_write_csv
from .evaluation import DEFAULT_EVAL_NET, EVAL_NETS
from .generate import DEFAULT_RESPACING, add_fast_path_arguments
from .guidance import POLICIES
from .solvers import METHODS, SOLVERS, Multistep

MODELS = ("uncond", "cond")
CLASSIFIERS = ("ce", "ect")
SAMPLERS = ("ddim", "ddpm")  # the paper's grid; the multistep solvers can be added (--samplers)
METHOD_CHOICES = METHODS
RESPACING = DEFAULT_RESPACING  # the paper's DDIM-25 and DDPM-250; 15 steps for DPM-Solver++(2M) and UniPC
QUICK_RESPACING = {name: solver.quick_respacing for name, solver in SOLVERS.items()}


def respacing_flag(method: str) -> str:
    """The option that sets ``method``'s respacing: --solver_respacing for every multistep solver, else
    --<method>_respacing."""
    return "solver_respacing" if SOLVERS[method].multistep else f"{method}_respacing"
POLICY_ORDER = tuple(POLICIES)  # the results table's order: the registry's

# strengths swept per policy (each policy's ``sweep``): s (constant), c (constant-range with base s = 1,
# t <= 700; gradient-norm with base s = 1 and M = GRADIENT_NORM_THRESHOLD), C (timestep-aware,
# s = C·(T − t)), γ (EDS). The embedded classifiers' ‖∇ log p‖ is about 0.06-1.2 along a DDIM-10 path
# (median per step), so the constant scales that change MNIST samples are around 3-30 rather than
# ADM's ImageNet 1-10.
SWEEPS = {name: cls.sweep for name, cls in POLICIES.items() if cls.strength is not None}
QUICK_SWEEPS = {policy: values[1:2] for policy, values in SWEEPS.items()}  # the middle strength of each
# M of the gradient-norm policy: along DDIM-25 paths of the embedded models (constant scale 1) ‖∇‖ is
# 0.07-0.15 early, 0.4-1.0 at its peak (t ≈ 600) and 0.001-0.01 once the classifier is confident; with
# M = 0.5 the policy was constant c at almost every step (identical metrics to constant at c = 30)
GRADIENT_NORM_THRESHOLD = 0.05
METRICS = ("fid", "inception_score", "precision", "recall", "class_accuracy")
KEY_COLUMNS = ("model", "classifier", "sampler", "policy", "strength")  # the fields of Run.key, in its order
IMAGE_STATS = ("nonblack_background", "mean_intensity")  # in results.csv, not in the table
COLUMNS = KEY_COLUMNS + METRICS + ("num_samples", "seconds", "eval_net") + IMAGE_STATS
EARLIER_EVAL_NET = "eval-unet"  # what scored the rows of a results.csv without an eval_net column


@dataclass(frozen=True)
class Run:
    model: str
    classifier: str  # "-" for the unguided baseline
    sampler: str
    policy: str
    strength: float  # 0 for the unguided baseline

    @property
    def key(self) -> tuple:
        return (self.model, self.classifier, self.sampler, self.policy, f"{self.strength:g}")


def row_key(row: dict) -> tuple:
    """The :attr:`Run.key` of a ``results.csv`` row, so that a resumed grid skips the runs it holds."""
    return Run(row["model"], row["classifier"], row["sampler"], row["policy"], float(row["strength"])).key


def plan(models=MODELS, classifiers=CLASSIFIERS, samplers=SAMPLERS, sweeps=SWEEPS,
         policies=POLICY_ORDER) -> list[Run]:  # fmt: skip
    """The runs of the grid, in order; ``policies`` picks a subset ("none" is the unguided baseline)."""
    runs = []
    for model in models:
        for sampler in samplers:
            if "none" in policies:
                runs.append(Run(model, "-", sampler, "none", 0.0))
            for classifier in classifiers:
                for policy in (p for p in POLICY_ORDER[1:] if p in policies):
                    runs += [Run(model, classifier, sampler, policy, s) for s in sweeps.get(policy, ())]
    return runs


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


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["eval_net"] = row.get("eval_net") or EARLIER_EVAL_NET
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, COLUMNS)


def _num(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


def _fid_key(row: dict) -> float:
    """FID for ranking: a run without one (diverged or failed) ranks last."""
    value = _num(row, "fid")
    return math.inf if math.isnan(value) else value


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (model, sampler, classifier, policy): the row with the lowest FID (ties: first)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["model"], r["sampler"], r["classifier"], r["policy"])
        if k not in best or _fid_key(r) < _fid_key(best[k]):
            best[k] = r
    order = {p: i for i, p in enumerate(POLICY_ORDER)}
    return sorted(best.values(), key=lambda r: (MODELS.index(r["model"]), r["sampler"], r["classifier"],
                                                order[r["policy"]]))  # fmt: skip


def markdown(rows: list[dict], command: str, settings: str, missing: list[Run] = ()) -> str:
    """The best-per-policy table of ``rows``; ``missing`` lists planned runs not in ``rows`` (partial grid)."""
    lines = [
        "# Reproduced ablations on MNIST 5k",
        "",
        "Made by:",
        "",
        "```text",
        command,
        "```",
        "",
        settings,
        "",
        "Best strength per policy by FID (embedded evaluation network's feature space, against the 500",
        "held-out images). FID: lower is better; IS, precision, recall, class accuracy: higher is better.",
        "The strength is s (constant), c (constant-range, gradient-norm), C (timestep-aware) or γ (EDS).",
        "",
        "| model | sampler | classifier | policy | strength | FID | IS | precision | recall | class acc |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in best_rows(rows):
        vals = " | ".join(f"{_num(r, m):.3f}" for m in METRICS)
        lines.append(f"| {r['model']} | {r['sampler']} | {r['classifier']} | {r['policy']} | {r['strength']} | {vals} |")
    lines += ["", f"All {len(rows)} runs, with every swept strength: `results.csv`. Sweeps: `sweep_*.png`.", ""]
    if missing:
        lines += [f"Partial grid: {len(missing)} planned runs are not in `results.csv` yet (their setting's "
                  "best row is over the strengths that did run):", ""]  # fmt: skip
        groups: dict[tuple, dict[str, list[str]]] = {}
        for r in missing:
            groups.setdefault((r.model, r.sampler, r.classifier), {}).setdefault(r.policy, []).append(f"{r.strength:g}")
        for (model, sampler, classifier), policies in groups.items():
            runs = "; ".join(f"{p} {', '.join(v)}" if p != "none" else p for p, v in policies.items())
            lines.append(f"- {model} {sampler} {classifier}: {runs}")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from .files import check_output_folder
    from .evaluation import Evaluator
    from .generate import build_policy, generate, load_networks, make_sampler, resolve_device
    from .plots import save_sweep_plot
    from .schedule import Schedule

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

"""Quality against steps for DDIM, DPM-Solver++(2M) and UniPC, constant against EDS guidance, on the
embedded models; and what calling the classifier less often (guidance_every / guidance_interval) costs.

    python scripts/solver_study.py --out docs/results/solvers [--models uncond,cond] [--part steps|schedule|all]
    python scripts/solver_study.py --out docs/results/solvers --report     # table and plot from results.csv

Part "steps": {DDIM, DPM-Solver++(2M), UniPC} × {5, 10, 15, 25} steps × {constant, EDS} × {UADM, CADM}, ECT
classifier. Every method walks the same chain: ADM's even respacing "N" (t = 999 ... 0), so that the
methods differ only in their update. Part "schedule": DDIM-25 and UniPC-10 with EDS, the classifier called
at every step, every 2nd or 3rd step (the last scale and gradient reused between), or only for t >= 500
or t < 500; the sampling time of each run is measured in the same process, one run after another.

Resumable: the CSV is rewritten after every run and runs it holds are skipped. Scores are fastguide
evaluate's (the ResNet evaluation network's feature space, MNIST test images as reference).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from fastguide.evaluation import Evaluator
from fastguide.files import atomic_write, atomic_write_csv
from fastguide.generate import build_policy, generate, load_networks, make_sampler
from fastguide.solvers import SOLVERS

STEPS = (5, 10, 15, 25)
METHODS = ("ddim", "dpmpp2m", "unipc")
NAMES = {method: SOLVERS[method].label for method in METHODS}
# constant s: the best constant of the DDIM-25 grid with the ECT classifier (the eps-models' grid of 2026-11-26;
# the v-prediction models' grid has the same best constants); EDS γ = 3: fastguide sample's default until
# 2026-11-30 (since then 1 for a class-conditional UNet)
STRENGTHS = {("uncond", "constant"): 10.0, ("cond", "constant"): 3.0, ("uncond", "eds"): 3.0, ("cond", "eds"): 3.0}
SCHEDULES = {  # name -> SamplerConfig options
    "every step": {},
    "every 2nd": {"guidance_every": 2},
    "every 3rd": {"guidance_every": 3},
    "t >= 500 only": {"guidance_interval": (500, 999)},
    "t < 500 only": {"guidance_interval": (0, 499)},
}
SCHEDULE_RUNS = (("ddim", 25), ("unipc", 10))
COLUMNS = ("part", "model", "method", "steps", "policy", "strength", "schedule", "classifier_calls", "fid",
           "precision", "recall", "class_accuracy", "nonblack_background", "sampling_seconds", "num_samples")  # fmt: skip


def runs(models, part):
    out = []
    if part in ("steps", "all"):
        for model in models:
            for policy in ("constant", "eds"):
                for method in METHODS:
                    out += [("steps", model, method, n, policy, "every step") for n in STEPS]
    if part in ("schedule", "all"):
        for model in models:
            for method, n in SCHEDULE_RUNS:
                out += [("schedule", model, method, n, "eds", name) for name in SCHEDULES]
    return out


def key(row: dict) -> tuple:
    """A CSV row's run, as :func:`runs` lists it (strings)."""
    return tuple(str(row[c]) for c in ("part", "model", "method", "steps", "policy", "schedule"))


def fmt(value, digits=3) -> str:
    return "" if value in ("", None) else f"{float(value):.{digits}f}"


def report(out: Path, rows: list[dict], command: str) -> None:
    """results.md (one table per part) and solvers.png (FID, class accuracy and recall against steps)."""
    lines = [f"# Few-step solvers with guidance\n\nThis page: `{command}` (how the runs were made: README.md here).\n",
             f"{rows[0]['num_samples'] if rows else '?'} samples per run (labels i mod 10, seeds i), ECT classifier, "
             "ADM's even respacing (t = 999 ... 0) for every method; scores from `fastguide evaluate`'s default "
             "(ResNet evaluation network, MNIST test set). Constant s: "
             f"{STRENGTHS[('uncond', 'constant')]:g} (UADM), {STRENGTHS[('cond', 'constant')]:g} (CADM); EDS γ = "
             f"{STRENGTHS[('cond', 'eds')]:g}.\n", "## Quality against steps\n",
             "| model | policy | method | steps | FID | precision | recall | class acc | non-black | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted((r for r in rows if r["part"] == "steps"),
                    key=lambda r: (r["model"] != "uncond", r["policy"], METHODS.index(r["method"]), int(r["steps"]))):  # fmt: skip
        lines.append(f"| {r['model']} | {r['policy']} | {NAMES[r['method']]} | {r['steps']} | {fmt(r['fid'], 4)} | "
                     f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['class_accuracy'])} | "
                     f"{fmt(r['nonblack_background'])} | {fmt(r['sampling_seconds'], 1)} |")  # fmt: skip
    lines += ["", "## Calling the classifier less often (EDS)\n",
              "Time: sampling seconds of the run on this machine (2 CPU cores, one process per model), runs one "
              "after another in the same process.\n",
              "| model | method | steps | classifier | calls | FID | recall | class acc | non-black | seconds | time saved |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    sched = [r for r in rows if r["part"] == "schedule"]
    for r in sorted(sched, key=lambda r: (r["model"] != "uncond", r["method"], list(SCHEDULES).index(r["schedule"]))):
        base = next((b for b in sched if (b["model"], b["method"], b["schedule"]) == (r["model"], r["method"], "every step")), None)
        saved = "" if base is None else f"{1 - float(r['sampling_seconds']) / float(base['sampling_seconds']):.0%}"
        lines.append(f"| {r['model']} | {NAMES[r['method']]} | {r['steps']} | {r['schedule']} | {r['classifier_calls']} | "
                     f"{fmt(r['fid'], 4)} | {fmt(r['recall'])} | {fmt(r['class_accuracy'])} | "
                     f"{fmt(r['nonblack_background'])} | {fmt(r['sampling_seconds'], 1)} | {saved} |")  # fmt: skip
    atomic_write(out / "results.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    steps = [r for r in rows if r["part"] == "steps" and r["fid"] != ""]
    if not steps:
        return
    from fastguide.plots import _pyplot, _save

    plt = _pyplot()
    models = [m for m in ("uncond", "cond") if any(r["model"] == m for r in steps)]
    metrics = ("fid", "class_accuracy", "recall")
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.4 * len(metrics), 3.6 * len(models)), squeeze=False)
    colors = {"ddim": "tab:blue", "dpmpp2m": "tab:orange", "unipc": "tab:green"}
    for row_axes, model in zip(axes, models):
        for ax, metric in zip(row_axes, metrics):
            for method in METHODS:
                for policy, style in (("eds", "-"), ("constant", "--")):
                    pts = sorted((int(r["steps"]), float(r[metric])) for r in steps
                                 if (r["model"], r["method"], r["policy"]) == (model, method, policy))  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", color=colors[method], label=f"{NAMES[method]}, {policy}")
            ax.set_xticks(STEPS)
            ax.set_xlabel("steps (network calls)")
            ax.set_title(f"{'UADM' if model == 'uncond' else 'CADM'}: {metric}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "solvers.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="uncond,cond")
    p.add_argument("--part", default="all", choices=["steps", "schedule", "all"])
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--report", action="store_true", help="only rewrite results.md and the plot from results.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    rows = list(csv.DictReader(open(path, newline=""))) if path.is_file() else []
    command = "python scripts/solver_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report:
        report(out, rows, command)
        return 0
    models = [m.strip() for m in args.models.split(",")]
    done = {key(r) for r in rows}
    todo = [r for r in runs(models, args.part) if tuple(map(str, r)) not in done]
    device = torch.device("cpu")
    evaluator = Evaluator(device=device)
    labels, seeds = [i % 10 for i in range(args.num_samples)], list(range(args.num_samples))
    nets = {}
    for i, (part, model, method, n, policy, schedule) in enumerate(todo):
        if model not in nets:
            nets[model] = load_networks(model, "ect", device)
        strength = STRENGTHS[(model, policy)]
        sampler = make_sampler(nets[model], build_policy(policy, strength), method, str(n), **SCHEDULES[schedule])
        calls = sum(a == "call" for a in sampler.guidance_plan())
        start = time.perf_counter()
        gen = generate(sampler, labels, seeds, 100, device, progress=False)
        seconds = time.perf_counter() - start
        scores = evaluator(gen.images, gen.labels)
        rows.append(dict(part=part, model=model, method=method, steps=n, policy=policy, strength=strength,
                         schedule=schedule, classifier_calls=calls, fid=scores.fid, precision=scores.precision,
                         recall=scores.recall, class_accuracy=scores.class_accuracy,
                         nonblack_background=scores.nonblack_background,
                         sampling_seconds=round(seconds, 2), num_samples=args.num_samples))  # fmt: skip
        atomic_write_csv(path, rows, COLUMNS)
        print(f"[{i + 1}/{len(todo)}] {part} {model} {method}-{n} {policy} {schedule}: FID {scores.fid:.4f} "
              f"acc {scores.class_accuracy:.3f} recall {scores.recall:.3f} {seconds:.1f} s", flush=True)
    report(out, rows, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

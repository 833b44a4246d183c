"""The grid of ``fastguide reproduce`` (the command: :mod:`fastguide.cli.reproduce`): the paper's ablations
(its Tables 1-3 and supplement Fig. 1-2) on MNIST 5k.

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

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_csv
from .generate import DEFAULT_RESPACING
from .guidance import POLICIES
from .solvers import METHODS, SOLVERS

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



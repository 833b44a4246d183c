"""Lines a reader follows for one default DDIM step and one DPM-Solver++(2M) step (issue 27's measure).

The unit is docs/plans/issue27.md §1.1's: whole definitions (decorators to the end of the body) and the
module constants they read, blank lines counted (the non-blank count leaves them out), imports and module
docstrings not. Python definitions are found by name (ast), so the count follows the code as it moves; the
files the refactor did not touch (dispatch, the kernels' references, the extension, C++) are counted by the
plan's line ranges (§5). Run: ``python scripts/count_step_lines.py`` (this tree), and
``git worktree add /tmp/before d276551 && python scripts/count_step_lines.py --before /tmp/before``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# untouched since the plan's baseline (d276551): its ranges
RANGES_COMMON = [("fastguide/schedule.py", 112, 136), ("fastguide/schedule.py", 234, 251), ("fastguide/ops.py", 28, 30),
                 ("fastguide/ops.py", 37, 158), ("kernels/reference.py", 40, 67), ("fastguide/entropy.py", 11, 33)]  # fmt: skip
RANGES_DDIM = [
    ("fastguide/_ext.py", 30, 82), ("fastguide/_ext.py", 117, 140), ("kernels/reference.py", 70, 73),
    ("kernels/reference.py", 99, 117), ("fastguide/diffusion.py", 21, 40), ("fastguide/diffusion.py", 145, 148),
    ("fastguide/diffusion.py", 182, 217), ("csrc/ops.cpp", 15, 60), ("csrc/ops.cpp", 85, 113), ("csrc/ops.cpp", 118, 128),
    ("csrc/ops_cpu.cpp", 21, 86), ("csrc/ops_cpu.cpp", 102, 119), ("csrc/ops_cpu.cpp", 128, 137),
    ("csrc/ops_cpu.cpp", 155, 159), ("csrc/ops_cpu.cpp", 175, 199), ("csrc/ops_cpu.cpp", 216, 233),
    ("csrc/step_math.h", 12, 39), ("csrc/step_math.h", 52, 53), ("csrc/step_math.h", 146, 187),
]  # fmt: skip

# what the default step runs (and its compiled wrapper), by name
SYMBOLS_COMMON = {
    "fastguide/config.py": ["SamplerConfig:fields", "SamplerConfig.draws_noise", "SamplerConfig.guidance_plan",
                            "SamplerConfig.fast_path", "SamplerConfig.compile_weighed", "SamplerConfig._precision",
                            "FastPath"],
    "fastguide/sampler.py": ["SamplingTrace", "SampleResult", "_stack", "GuidedSampler._spec", "GuidedSampler.fast_path",
                             "GuidedSampler._runner", "GuidedSampler.sample", "GuidedSampler.steps",
                             "GuidedSampler.guidance_plan", "GuidedSampler._warn_entropy_floor"],
    "fastguide/compiled.py": ["StepRunner", "step_of", "own_code"],
    "fastguide/step.py": ["CHECKS", "NONFINITE", "LOGIT_FAULTS", "GUIDANCE_ACTIONS", "StepRecord", "StepTables",
                          "StepSpec", "_networks", "nonfinite_code", "logits_code", "eps_and_v", "guidance_pass",
                          "guided_step", "guidance_plan", "fault_location", "first_fault"],
    "fastguide/classifier.py": ["NO_SCALE_ARGS", "ClassifierPass", "network_input", "check_labels",
                                "_input_gradient_call", "_BackwardFailed", "classifier_pass", "_forward_backward"],
    "fastguide/guidance.py": ["GuidanceState", "Policy", "as_policy", "policy_scale", "EntropyDriven"],
    "fastguide/solvers/base.py": ["SOLVERS", "Carry", "StepInputs", "Solver"],
}
SYMBOLS_DDIM = {"fastguide/solvers/ddim.py": ["Ddim"]}
# the same path in the layout before issue 27 (d276551): the plan's §5 ranges, by name
BEFORE_COMMON = {
    "fastguide/sampler.py": ["SamplerConfig:fields", "SamplerConfig.guidance_plan", "SamplerConfig.fast_path",
                             "SamplerConfig.compile_weighed", "FastPath", "SamplingTrace", "SampleResult", "_stack",
                             "GuidedSampler._spec", "GuidedSampler.fast_path", "GuidedSampler._runner",
                             "GuidedSampler.sample", "GuidedSampler.steps", "GuidedSampler.guidance_plan",
                             "GuidedSampler._warn_entropy_floor", "_Runner", "_step_of", "_own_code"],
    "fastguide/step.py": ["CHECKS", "NONFINITE", "LOGIT_FAULTS", "GUIDANCE_ACTIONS", "StepRecord", "StepTables",
                          "StepSpec", "_networks", "_input_gradient_call", "nonfinite_code", "logits_code", "eps_and_v",
                          "check_labels", "classifier_pass", "_classifier_pass", "_BackwardFailed", "guidance_pass",
                          "guided_step", "guidance_plan", "fault_location", "first_fault"],
    "fastguide/solvers.py": ["Carry"],
    "fastguide/guidance.py": ["EntropyDriven"],
}
BEFORE_DPM = {"fastguide/solvers.py": ["MULTISTEP", "SOLVER_FIELDS", "_grid", "predictor_order", "multistep_table",
                                       "threshold", "multistep_update"]}
SYMBOLS_DPM = {"fastguide/solvers/multistep.py": ["SOLVER_FIELDS", "_grid", "predictor_order", "threshold",
                                                  "multistep_update", "Multistep"],
               "fastguide/solvers/dpmpp2m.py": ["Dpmpp2m"]}  # fmt: skip


def _definitions(tree: ast.Module) -> dict[str, tuple[int, int]]:
    found = {}

    def add(node, prefix=""):
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            found[name] = (start, node.end_lineno)
            if isinstance(node, ast.ClassDef):
                body = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                first = min([n.lineno for n in body] + [min([d.lineno for d in n.decorator_list], default=n.lineno) for n in body],
                            default=node.end_lineno + 1)  # fmt: skip
                found[name + ":fields"] = (start, first - 1)
                for n in body:
                    add(n, name + ".")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    found[t.id] = (node.lineno, node.end_lineno)

    for node in tree.body:
        add(node)
    return found


def count(symbols: dict[str, list[str]], ranges: list[tuple[str, int, int]], root: Path = ROOT) -> tuple[int, int, set[str]]:
    lines = nonblank = 0
    files = set()
    for rel, names in symbols.items():
        text = (root / rel).read_text().splitlines()
        defs = _definitions(ast.parse("\n".join(text)))
        for name in names:
            a, b = defs[name]
            chunk = text[a - 1 : b]
            lines, nonblank = lines + len(chunk), nonblank + sum(bool(s.strip()) for s in chunk)
        files.add(rel)
    for rel, a, b in ranges:
        chunk = (root / rel).read_text().splitlines()[a - 1 : b]
        lines, nonblank = lines + len(chunk), nonblank + sum(bool(s.strip()) for s in chunk)
        files.add(rel)
    return lines, nonblank, files


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="CHECKOUT", help="count the pre-issue-27 layout in this checkout (d276551)")
    args = p.parse_args()
    root = Path(args.before) if args.before else ROOT
    common_symbols, ddim, dpm = (BEFORE_COMMON, {}, BEFORE_DPM) if args.before else (SYMBOLS_COMMON, SYMBOLS_DDIM, SYMBOLS_DPM)
    common = count(common_symbols, RANGES_COMMON, root)
    for what, extra_symbols, extra_ranges in (("DDIM", ddim, RANGES_DDIM), ("DPM-Solver++(2M)", dpm, [])):
        extra = count(extra_symbols, extra_ranges, root)
        files = common[2] | extra[2]
        print(f"{what}: {common[0] + extra[0]} lines ({common[1] + extra[1]} non-blank) in {len(files)} files"
              f" (common part {common[0]} lines); files: {', '.join(sorted(files))}")  # fmt: skip


if __name__ == "__main__":
    main()

"""How the package is put together: no import cycles between its modules (functions' own imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name → file, for fastguide/ and kernels/ (installed as fastguide.kernels)."""
    mods = {}
    for path in sorted((ROOT / "fastguide").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        parts = ("fastguide", *rel) if rel[0] == "kernels" else rel
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at module level or inside functions (not the packages
    that contain it: a submodule importing its parent's name is not a cycle of code)."""
    mods = _modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest module name."""
    found = []

    def walk(start, node, path):
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    graph = import_graph()
    assert "fastguide.kernels.reference" in graph["fastguide.ops"]  # lazy imports count
    assert "fastguide.entropy" in graph["fastguide.kernels.reference"]


def test_the_package_imports_from_a_plain_checkout():
    """Without the install's mapping of kernels/ (a fresh clone on PYTHONPATH), ``import fastguide`` and its
    kernels work, from this checkout's files; the installed mapping, where there is one, is left to win."""
    import subprocess
    import sys

    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(ROOT)!r}); import fastguide, fastguide.kernels.reference as r; "
            "print(fastguide.__file__); print(r.__file__); print(fastguide.kernels is sys.modules['fastguide.kernels'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    package, reference, same = out.split()
    assert Path(package) == ROOT / "fastguide" / "__init__.py"
    assert Path(reference) == ROOT / "kernels" / "reference.py"
    assert same == "True"


def test_gpu_check_script_skips_cleanly_without_a_gpu():
    import subprocess

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: scripts/gpu_check.sh would run the GPU checks for minutes")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gpu_check: no CUDA device here; the GPU checks are skipped"


def test_setup_lists_every_package_so_a_wheel_has_them_all():
    """A non-editable install (pip install .) ships only the packages setup.py names: every folder of
    fastguide/ with an __init__.py must be among them (fastguide.kernels comes from kernels/)."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    listed = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastguide").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from setup.py: {sorted(found - listed)}"
    assert "fastguide.kernels" in listed


def test_adm_networks_import_nothing_of_sampling():
    """fastguide.adm.networks is ADM's networks alone: no module of it imports the sampler, the step, the
    solvers, the guidance or the dispatch (fastguide.adm.integration does)."""
    graph = import_graph()
    sampling = {"fastguide.sampler", "fastguide.step", "fastguide.solvers", "fastguide.classifier", "fastguide.guidance",
                "fastguide.ops", "fastguide.compiled", "fastguide.adm.integration"}  # fmt: skip
    networks = [m for m in graph if m.startswith("fastguide.adm.networks")]
    assert len(networks) >= 5
    for module in networks:
        bad = {t for t in graph[module] if any(t == s or t.startswith(s + ".") for s in sampling)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_every_subcommand_runs_from_a_module_of_its_own_in_the_cli_package():
    """fastguide/cli/: one module per subcommand (the two train-* commands share train.py)."""
    from fastguide.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    where = {}
    for name, p in sub.choices.items():
        run = p.get_default("_run")
        where[name] = run.__module__
    assert where == {
        "sample": "fastguide.cli.sample", "evaluate": "fastguide.cli.evaluate", "reproduce": "fastguide.cli.reproduce",
        "adm-sample": "fastguide.cli.adm_sample", "train-classifier": "fastguide.cli.train",
        "train-diffusion": "fastguide.cli.train",
    }  # fmt: skip
    assert not (ROOT / "fastguide" / "commands.py").exists() and not (ROOT / "fastguide" / "adm_sample.py").exists()

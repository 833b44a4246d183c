"""The README: its example runs, its set-up and test commands are CI's, its table is the committed grid."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.images.shape == (2, 3, 32, 32)
    assert result.trace.scale.shape == (25, 2)
    assert "torch.Size([2, 3, 32, 32])" in capsys.readouterr().out


def test_ci_runs_the_readme_commands():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0].strip().splitlines()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in commands[0] and "--no-build-isolation" in commands[0]
    assert commands[0].endswith("&& fastguide sample")  # the quickstart samples right after installing
    assert "torch==2.13.0" in ci and "--no-build-isolation -e \".[test]\"" in ci
    assert "\nfastguide sample\n" in ci  # CI runs the quickstart's sampling as written
    assert commands[1].strip() in ci


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_readme_table_is_the_committed_grid():
    """The README's reproduced table is `docs/results/results.md`'s, and that is the CSV's best rows."""
    from fastguide.reproduce import _read_rows, markdown, plan, row_key

    results = ROOT / "docs" / "results"
    rows = _read_rows(results / "results.csv")
    planned = plan(samplers=("ddim-25", "ddpm-250"))  # the committed run's respacings (ddim25, 250)
    assert {row_key(r) for r in rows} == {r.key for r in planned} and len(rows) == len(planned)
    committed = (results / "results.md").read_text()
    assert "Partial grid" not in committed
    assert _table(committed) == _table(markdown(rows, "", ""))
    section = README.split("## Reproduced ablations")[1].split("\n## ")[0]
    assert _table(section) == _table(committed)

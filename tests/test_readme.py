"""The README's runnable example runs, and its set-up and test commands are the ones CI uses."""

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

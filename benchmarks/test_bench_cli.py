"""`fastguide sample` with no arguments (the README's quickstart) must finish in < 60 s on 2 CPU cores.

Times the whole command in a fresh process (imports, loading the embedded models, 80 samples with
EDS over 25 DDIM steps, writing the grid, the npz and the plots), the way a user runs it. Quick mode
(benchmarks/conftest.py) runs it once with ``--count 1`` (10 samples) and does not assert the time.
"""

import shutil
import subprocess
import sys
import time

TARGET_S = 60.0


def test_default_sample_command(tagged_benchmark, tmp_path, quick):
    out = tmp_path / "out"
    extra, count = (["--count", "1"], 10) if quick else ([], 80)

    def run():
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastguide", "sample", "--out", str(out), "--quiet", *extra], check=True)
        return time.perf_counter() - start

    seconds = tagged_benchmark.pedantic(run, rounds=2, iterations=1)
    assert (out / f"samples_{count}x32x32x1.npz").is_file()
    if not quick:
        assert tagged_benchmark.stats.stats.max < TARGET_S, f"default sample took {seconds:.1f} s"

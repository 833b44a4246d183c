"""Whole guided runs on the embedded models (CADM + ECT classifier, EDS γ = 3, 16 samples): DDIM-25 against
UniPC-10, DPM-Solver++(2M)-10 and DPM-Solver++(3M)-10, and the classifier called at every 2nd step only. Ratios come from
one ``pytest benchmarks/test_bench_solvers.py --benchmark-only`` run (compare the rows side by side); the
quality each costs is in docs/results/solvers (scripts/solver_study.py). Quick mode (benchmarks/conftest.py):
2 samples, one round."""

import pytest
import torch

import fastguide as fg
from fastguide.generate import load_networks, make_sampler

RUNS = {
    "ddim-25": ("ddim", "25", {}),
    "ddim-25-every-2nd": ("ddim", "25", {"guidance_every": 2}),
    "dpmpp2m-10": ("dpmpp2m", "10", {}),
    "dpmpp3m-10": ("dpmpp3m", "10", {}),
    "unipc-10": ("unipc", "10", {}),
    "unipc-10-every-2nd": ("unipc", "10", {"guidance_every": 2}),
}


@pytest.fixture(scope="module")
def nets():
    return load_networks("cond", "ect", torch.device("cpu"))


@pytest.mark.parametrize("run", list(RUNS))
def test_guided_run_16_samples(tagged_benchmark, nets, run, quick):
    method, respacing, options = RUNS[run]
    sampler = make_sampler(nets, fg.EntropyDriven(3.0), method, respacing, **options)
    n = 2 if quick else 16
    labels, seeds = [i % 10 for i in range(n)], list(range(n))
    result = tagged_benchmark.pedantic(sampler.sample, args=(labels,), kwargs=dict(seeds=seeds), rounds=3,
                                       warmup_rounds=1)  # fmt: skip
    assert result.images.shape[0] == n and torch.isfinite(result.images).all()

"""The contract of a solver (fastguide.solvers), as one test base that every registered solver runs.

A solver's test class subclasses :class:`SolverContract` and names the solver (:attr:`method`) and the
settings its tests run it with (:attr:`configs`); tests/test_solver_contract.py holds one class per solver
and checks that every registered solver has one. What a solver's numbers must be is tested against an
oracle elsewhere: the golden ADM trajectories for DDPM and DDIM (test_adm_parity.py), diffusers and a
float64 run for the multistep solvers (test_solvers.py).

Compiled runs use the ``aot_eager`` backend: the same fullgraph trace as inductor without its code
generation, so a compiled step must give the eager step's bits.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastguide as fg
from nets import tiny_nets

from fastguide.cli import build_parser
from fastguide.generate import DEFAULT_RESPACING
from fastguide.reproduce import METHOD_CHOICES, QUICK_RESPACING
from fastguide.solvers import METHODS, SOLVERS, Solver

TIGHT = dict(atol=1e-6, rtol=1e-6)  # float32 rounding of the tiny networks' outputs, O(1)


class SolverContract:
    """Tests every solver passes; a subclass sets :attr:`method` and, optionally, :attr:`configs`."""

    method: str = ""
    configs: tuple[dict, ...] = ({},)  # more SamplerConfig fields to run each test with (one id each)

    @pytest.fixture(autouse=True)
    def _aot_eager(self, monkeypatch):
        monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield

    @property
    def solver(self) -> type[Solver]:
        return SOLVERS[self.method]

    def sampler(self, guided=True, compile=False, respacing="ddim5", **cfg) -> fg.GuidedSampler:
        unet, clf = tiny_nets()
        return fg.GuidedSampler(unet, clf if guided else None, fg.Schedule.create("linear", 1000, respacing),
                                fg.EntropyDriven(2.0) if guided else None,
                                fg.SamplerConfig(method=self.method, compile=compile, **cfg))  # fmt: skip

    def test_is_registered_and_every_command_line_offers_it(self):
        """In the registry under its name with a label and respacings that parse; fastguide sample, adm-sample
        and reproduce accept it, with its default respacings; SamplerConfig takes eta and dynamic_threshold
        exactly where the solver says it does."""
        cls = self.solver
        assert cls.name == self.method and self.method in METHODS and cls.label
        for respacing in (cls.default_respacing, cls.quick_respacing):
            assert fg.Schedule.create("linear", 1000, respacing).num_steps >= 2
        assert DEFAULT_RESPACING[self.method] == cls.default_respacing and QUICK_RESPACING[self.method] == cls.quick_respacing
        parser = build_parser()
        assert parser.parse_args(["sample", "--method", self.method]).method == self.method
        assert parser.parse_args(["adm-sample", "--method", self.method]).method == self.method
        assert self.method in METHOD_CHOICES
        fg.SamplerConfig(method=self.method)
        for field, value, takes in (("eta", 0.5, cls.takes_eta), ("dynamic_threshold", 0.9, cls.takes_threshold)):
            if takes:
                fg.SamplerConfig(method=self.method, **{field: value})
            else:
                with pytest.raises(ValueError, match=f"{field}.*applies to .*not .*{self.method!r}"):
                    fg.SamplerConfig(method=self.method, **{field: value})

    def test_table_is_one_float32_row_per_respaced_index(self):
        """The solver's own table, if it has one: (N, F) float32, finite, made from float64 and rounded once."""
        schedule = fg.Schedule.create("linear", 1000, "ddim10")
        table = self.solver.table(schedule)
        if table is None:
            assert not self.solver.multistep
            return
        assert table.dtype == torch.float32 and table.shape[0] == schedule.num_steps and table.isfinite().all()
        assert torch.equal(self.solver.table(schedule), table)

    @pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
    def test_the_step_is_one_graph_that_never_recompiles_and_equals_eager(self, guided):
        """fullgraph=True and error_on_recompile: every step of two runs of the same shape uses one graph, and
        gives the eager run's samples (and scales) bit for bit."""
        for cfg in self.configs:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            fast, eager = self.sampler(guided, compile=True, **cfg), self.sampler(guided, **cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "cannot be compiled" fallback
                first = fast.sample([1, 2, 3], seeds=[0, 1, 2])
                second = fast.sample([0, 3, 1], seeds=[5, 6, 7])
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, cfg
            for got, labels, seeds in ((first, [1, 2, 3], [0, 1, 2]), (second, [0, 3, 1], [5, 6, 7])):
                want = eager.sample(labels, seeds=seeds)
                torch.testing.assert_close(got.images, want.images, rtol=0, atol=0, msg=lambda m: f"{cfg}: {m}")
                if guided:
                    torch.testing.assert_close(got.trace.scale, want.trace.scale, rtol=0, atol=0)

    def test_a_sample_depends_only_on_its_seed_and_label(self):
        """The same sample whether drawn in a batch, in another order or alone (to float32 rounding)."""
        for cfg in self.configs:
            s = self.sampler(**cfg)
            full = s.sample([0, 1, 2], seeds=[3, 4, 5])
            swapped = s.sample([2, 0], seeds=[5, 3])
            alone = s.sample([1], seeds=[4])
            torch.testing.assert_close(swapped.images, full.images[[2, 0]], **TIGHT)
            torch.testing.assert_close(alone.images, full.images[[1]], **TIGHT)
            torch.testing.assert_close(swapped.trace.scale, full.trace.scale[:, [2, 0]], **TIGHT)
            assert not torch.allclose(full.images[0], full.images[1], atol=1e-3)  # seeds do matter

    def test_one_step_from_per_sample_indices_or_a_clear_refusal(self):
        """A single-step solver steps samples at different indices in one call as each alone; a multistep
        solver refuses step() (it needs the steps before) and points to sample() and steps()."""
        s = self.sampler()
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 0])
        noise = torch.randn(x.shape, generator=g) if s.config.draws_noise else None
        if self.solver.multistep:
            with pytest.raises(ValueError, match=r"multistep solver .* use sample\(\) or steps\(\)"):
                s.step(x, torch.tensor([4, 2]), y, noise)
            return
        both, record = s.step(x, torch.tensor([4, 2]), y, noise)
        for i, index in enumerate([4, 2]):
            one, record1 = s.step(x[i : i + 1], torch.tensor([index]), y[i : i + 1],
                                  None if noise is None else noise[i : i + 1])  # fmt: skip
            torch.testing.assert_close(both.x_prev[i : i + 1], one.x_prev, **TIGHT)
            torch.testing.assert_close(both.pred_xstart[i : i + 1], one.pred_xstart, **TIGHT)
            torch.testing.assert_close(record.scale[i : i + 1], record1.scale, **TIGHT)

    def test_a_nonfinite_eps_is_named_at_its_step_and_sample(self):
        """An eps-model that returns NaN for one sample from the third step on (t < 500 of ddim5's 800, 600,
        400, ...): FloatingPointError naming the eps-model, the sample and the step, eager and compiled."""
        unet, clf = tiny_nets()

        class Faulty(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net, self.num_classes = unet, unet.num_classes

            def forward(self, x, t, y=None):
                out = self.net(x, t, y=y)
                late = (t < 500).view(-1, 1, 1, 1) & (torch.arange(len(x)) == 1).view(-1, 1, 1, 1)
                return torch.where(late, math.nan, out)

        for compile_ in (False, True):
            s = fg.GuidedSampler(Faulty(), clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.EntropyDriven(2.0),
                                 fg.SamplerConfig(method=self.method, compile=compile_))  # fmt: skip
            with pytest.raises(FloatingPointError, match=r"eps-model output is nan for sample 1 at step 2 \(t="):
                s.sample([0, 1, 2], seeds=[0, 1, 2])

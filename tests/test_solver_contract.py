"""Every registered solver through the solver contract (solver_contract.py), one class each."""

from __future__ import annotations

from solver_contract import SolverContract

from fastguide.solvers import SOLVERS


class TestDdpm(SolverContract):
    method = "ddpm"
    configs = ({}, dict(variance="fixed_small"))


class TestDdim(SolverContract):
    method = "ddim"
    configs = ({}, dict(eta=0.5), dict(ddim_guidance="paper"))


class TestDpmpp2m(SolverContract):
    method = "dpmpp2m"


class TestUnipc(SolverContract):
    method = "unipc"
    configs = ({}, dict(dynamic_threshold=0.9))


class TestDpmpp3m(SolverContract):
    method = "dpmpp3m"
    configs = ({}, dict(dynamic_threshold=0.9))


def test_every_registered_solver_has_a_contract_class():
    tested = {cls.method for cls in SolverContract.__subclasses__()}
    assert tested == set(SOLVERS), f"solvers without a contract class here: {sorted(set(SOLVERS) - tested)}"

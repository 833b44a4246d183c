"""``fastguide reproduce`` on a tiny grid: files, table, resume, bad input."""

import csv

import pytest

from fastguide.cli import main
from fastguide.reproduce import KEY_COLUMNS, QUICK_SWEEPS, SWEEPS, best_rows, plan, row_key

TINY = ["--quick", "--num_samples", "12", "--models", "cond", "--classifiers", "ect", "--ddim_respacing", "ddim2",
        "--ddpm_respacing", "2", "--quiet"]  # fmt: skip


def test_plan_covers_the_papers_grid():
    runs = plan()
    per_setting = 1 + 2 * sum(len(v) for v in SWEEPS.values())  # baseline + both classifiers x every strength
    assert len(runs) == 2 * 2 * per_setting
    assert {r.policy for r in runs} == {"none", "constant", "constant-range", "timestep-aware", "gradient-norm", "eds"}
    assert all(len(v) >= 3 for v in SWEEPS.values())  # every policy is swept
    assert all(QUICK_SWEEPS[p] == (SWEEPS[p][1],) for p in SWEEPS)


def test_plan_picks_policies_in_grid_order():
    runs = plan(models=("cond",), samplers=("ddpm-250",), policies=("eds", "none"))
    assert (runs[0].classifier, runs[0].policy) == ("-", "none")
    assert [(r.policy, r.strength) for r in runs[1:]] == [("eds", s) for _ in range(2) for s in SWEEPS["eds"]]
    assert {r.classifier for r in runs[1:]} == {"ce", "ect"}
    assert plan(models=("cond",), samplers=("ddpm-250",), policies=("eds",))[0].policy == "eds"  # no baseline


def test_a_csv_row_has_the_key_of_its_run():
    run = plan(models=("uncond",), samplers=("ddpm-250",), policies=("timestep-aware",))[0]
    row = {"model": "uncond", "classifier": run.classifier, "sampler": "ddpm-250", "policy": "timestep-aware",
           "strength": f"{run.strength:.4f}", "fid": "0.1"}  # fmt: skip
    assert row["strength"] != f"{run.strength:g}" and row_key(row) == run.key  # "0.0010" is the run of 0.001
    assert row_key(dict(row, strength="0.3")) != run.key
    assert row_key(dict(zip(KEY_COLUMNS, run.key))) == run.key  # the row run() writes for a run


def test_tiny_reproduce_writes_csv_table_and_plots_and_resumes(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["reproduce", "--out", str(out), *TINY]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * (1 + 5)  # ddim and ddpm: baseline + 5 policies at one strength
    assert {r["sampler"] for r in rows} == {"ddim-2", "ddpm-2"}
    for r in rows:
        assert r["num_samples"] == "12" and 0 <= float(r["class_accuracy"]) <= 1 and float(r["fid"]) >= 0
    table = (out / "results.md").read_text()
    assert "fastguide reproduce" in table and table.count("| cond | ddim-2 |") == 6
    assert sorted(p.name for p in out.glob("sweep_*.png")) == ["sweep_cond_ddim-2_ect.png", "sweep_cond_ddpm-2_ect.png"]
    capsys.readouterr()
    assert main(["reproduce", "--out", str(out), *TINY, "--resume"]) == 0
    assert "12 runs (12 already done)" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 12
    assert main(["reproduce", "--out", str(out), *TINY, "--resume", "--num_samples", "15"]) == 2
    assert "holds runs of 12 samples, not 15" in capsys.readouterr().err
    # every row names the network that scored it; a resume does not mix networks
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["eval_net"] for r in rows} == {"resnet"}
    assert all(0 <= float(r["nonblack_background"]) <= 1 and 0 < float(r["mean_intensity"]) < 1 for r in rows)
    assert main(["reproduce", "--out", str(out), *TINY, "--resume", "--eval_net", "eval-unet"]) == 2
    assert "holds runs scored by the resnet evaluation network, not eval-unet" in capsys.readouterr().err


def test_rows_of_an_earlier_csv_without_an_eval_net_are_the_earlier_networks(tmp_path):
    from fastguide.reproduce import _read_rows

    (tmp_path / "results.csv").write_text("model,classifier,sampler,policy,strength,fid\ncond,-,ddim-25,none,0,0.1\n")
    assert _read_rows(tmp_path / "results.csv")[0]["eval_net"] == "eval-unet"


def test_policies_subset_then_report_lists_the_missing_runs(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["reproduce", "--out", str(out), *TINY, "--samplers", "ddim"]
    assert main([*args, "--policies", "none,eds"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["classifier"], r["policy"]) for r in rows] == [("-", "none"), ("ect", "eds")]
    assert "Partial grid" not in (out / "results.md").read_text()  # the subset asked for is complete
    (out / "results.md").unlink()
    capsys.readouterr()
    assert main([*args, "--report"]) == 0  # the whole grid: 4 policies have not run
    assert "6 runs (2 already done)" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 2  # nothing ran
    table = (out / "results.md").read_text()
    assert "Partial grid: 4 planned runs are not in `results.csv` yet" in table
    listed = "; ".join(f"{p} {QUICK_SWEEPS[p][0]:g}" for p in ("constant", "constant-range", "timestep-aware",
                                                                "gradient-norm"))  # fmt: skip
    assert f"- cond ddim-2 ect: {listed}\n" in table
    assert "| cond | ddim-2 | ect | eds |" in table
    assert main(["reproduce", "--out", str(tmp_path / "empty"), "--report", "--quiet"]) == 2
    assert "--report: no " in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_best_rows_pick_the_lowest_fid_per_policy():
    rows = [
        dict(model="cond", sampler="ddim-25", classifier="ect", policy="eds", strength="9", fid=""),  # diverged
        dict(model="cond", sampler="ddim-25", classifier="ect", policy="eds", strength="1", fid="0.5"),
        dict(model="cond", sampler="ddim-25", classifier="ect", policy="eds", strength="3", fid="0.2"),
        dict(model="cond", sampler="ddim-25", classifier="ect", policy="constant", strength="3", fid="0.4"),
    ]
    best = best_rows(rows)
    assert [(r["policy"], r["strength"]) for r in best] == [("constant", "3"), ("eds", "3")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "big"], "unknown model 'big'"),
        (["--samplers", "euler"], "unknown sampler 'euler'"),
        (["--policies", "eds,cfg"], "unknown policy 'cfg'"),
        (["--num_samples", "5"], "--num_samples must be at least 10"),
        (["--ddim_respacing", "ddim5000"], "5000"),
    ],
)
def test_bad_reproduce_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    assert main(["reproduce", "--out", str(tmp_path / "r"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastguide reproduce: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_multistep_solvers_join_the_grid_at_their_own_respacing(tmp_path):
    out = tmp_path / "r"
    assert main(["reproduce", "--out", str(out), *TINY, "--method", "dpmpp2m,unipc", "--solver_respacing", "3",
                 "--policies", "none,eds"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["sampler"], r["policy"]) for r in rows] == [
        ("dpmpp2m-3", "none"), ("dpmpp2m-3", "eds"), ("unipc-3", "none"), ("unipc-3", "eds")]
    assert "dpmpp2m-3 (respacing 3)" in (out / "results.md").read_text()


def test_the_sweep_plot_draws_the_unguided_run_as_a_reference_line(tmp_path, monkeypatch):
    import fastguide.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = [{"policy": "eds", "strength": s, "fid": f, "recall": 0.5} for s, f in ((1.0, 3.0), (3.0, 2.0))]
    plots.save_sweep_plot(tmp_path / "s.png", rows, ("fid", "recall"), "t", {"fid": 4.5, "recall": float("nan")})
    fid, recall = figures[0].axes[:2]
    line = [ln for ln in fid.lines if ln.get_label() == "unguided"]
    assert len(line) == 1 and list(line[0].get_ydata()) == [4.5, 4.5]
    assert not [ln for ln in recall.lines if ln.get_label() == "unguided"]  # no value, no line

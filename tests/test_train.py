"""The trainer on CPU: ECT vs cross-entropy, resume (bitwise), checkpoints, precision, microbatches,
DDP over 2 gloo processes and SIGKILL recovery under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from fastguide.schedule import Schedule
from fastguide.train import checkpoint as ckpt
from fastguide.train.data import mnist5k
from fastguide.train.distributed import DistState
from fastguide.train.loop import draw_step_noise
from fastguide.losses import q_sample
from fastguide.train.tasks import (
    ClassifierTrainConfig,
    DiffusionTrainConfig,
    train_classifier,
    train_diffusion,
)
from train_support import TINY_CLF, TINY_UNET, _Sized


@pytest.fixture(scope="module")
def small_sets():
    """A 64-image training subset of MNIST 5k and a 40-image held-out subset (fast)."""
    train, val = mnist5k("train"), mnist5k("heldout")
    return torch.utils.data.Subset(train, range(64)), torch.utils.data.Subset(val, range(40))


def clf_config(tmp_path, **kw) -> ClassifierTrainConfig:
    base = dict(
        out_dir=str(tmp_path / "run"), model=TINY_CLF, batch_size=8, iterations=6, log_interval=1,
        save_interval=3, eval_interval=0, eval_buckets=2, progress=False, lr=1e-3,
    )  # fmt: skip
    base.update(kw)
    return ClassifierTrainConfig(**base)


def run_clf(tmp_path, small_sets, **kw):
    train, val = small_sets
    return train_classifier(clf_config(tmp_path, **kw), train_set=_Sized(train), val_set=_Sized(val))


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "train.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, exact: bool = True, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)


# ---- the loss ----


def test_ect_eta_zero_equals_plain_cross_entropy_training(tmp_path, small_sets):
    """The trainer with η = 0 gives the weights of a hand-written ADM-style cross-entropy loop."""
    result = run_clf(tmp_path, small_sets, iterations=3, save_interval=3)
    train, _ = small_sets
    torch.manual_seed(0)
    model = dataclasses.replace(TINY_CLF).build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    schedule = Schedule.create("linear", 1000, "")
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    order = list(sampler)
    for step in range(3):
        idx = order[step * 8 : (step + 1) * 8]
        x0 = torch.stack([train[i][0] for i in idx])
        y = torch.tensor([train[i][1] for i in idx])
        rnd = draw_step_noise(gen, 8, (1, 32, 32), 1000, DistState())
        logits = model(q_sample(x0, rnd.t, rnd.noise, schedule), rnd.t)
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
    assert_same_weights(weights(result), dict(model.state_dict()), exact=False, rtol=1e-5, atol=1e-6)


def test_ect_eta_changes_training_and_lowers_confidence(tmp_path, small_sets):
    plain = run_clf(tmp_path / "a", small_sets, iterations=3)
    ect = run_clf(tmp_path / "b", small_sets, iterations=3, eta=5.0)
    assert not torch.equal(weights(plain)["out.2.c_proj.weight"], weights(ect)["out.2.c_proj.weight"])
    row = json.loads((Path(ect.out_dir) / "train.jsonl").read_text().splitlines()[-1])
    assert row["loss"] == pytest.approx(row["ce"] + 5.0 * row["ect"], rel=1e-6)
    plain_row = json.loads((Path(plain.out_dir) / "train.jsonl").read_text().splitlines()[-1])
    assert row["ect"] < plain_row["ect"]  # closer to uniform: higher predictive entropy


# ---- checkpoints and resume ----


def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(tmp_path, small_sets):
    full = run_clf(tmp_path / "full", small_sets, iterations=6)
    part = run_clf(tmp_path / "part", small_sets, iterations=3, save_interval=3)
    assert part.step == 3
    resumed = run_clf(tmp_path / "part", small_sets, iterations=6)  # resume="auto"
    assert resumed.step == 6
    assert_same_weights(weights(full), weights(resumed))
    assert losses(full.out_dir)[3:] == losses(resumed.out_dir)[3:]


def test_resume_from_an_explicit_folder_and_none(tmp_path, small_sets):
    first = run_clf(tmp_path / "a", small_sets, iterations=3)
    cont = run_clf(tmp_path / "b", small_sets, iterations=6, resume=str(first.out_dir))
    full = run_clf(tmp_path / "c", small_sets, iterations=6)
    assert_same_weights(weights(full), weights(cont))
    fresh = run_clf(tmp_path / "a", small_sets, iterations=3, resume="none")
    assert_same_weights(weights(first), weights(fresh))
    with pytest.raises(ValueError, match="nowhere"):
        run_clf(tmp_path / "d", small_sets, resume=str(tmp_path / "nowhere"))


def test_checkpoint_holds_weights_as_safetensors_and_full_state(tmp_path, small_sets):
    result = run_clf(tmp_path, small_sets, iterations=3)
    path = ckpt.latest_checkpoint(result.out_dir)
    assert path.name == "step_0000003"
    w, state = ckpt.read_checkpoint(path)
    assert set(w) == {"model"}
    assert {"step", "epoch", "batch", "optimizer", "scaler", "generator", "rng"} <= set(state)
    assert state["step"] == 3 and state["batch"] == 3 and len(state["rng"]) == 1
    assert load_file(str(Path(result.out_dir) / "model.safetensors")).keys() == w["model"].keys()


def test_half_written_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = ckpt.write_checkpoint(root, 1, {"model": {"w": torch.ones(3)}}, {"step": 1}, {})
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:10])  # truncated, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(root, 2, {"model": {"w": torch.zeros(3)}}, {"step": 2}, {})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root) == good
    w, state = ckpt.read_checkpoint(good)
    assert torch.equal(w["model"]["w"], torch.ones(3)) and state["step"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]


def test_old_checkpoints_are_pruned_but_latest_kept(tmp_path):
    root = tmp_path / "c"
    for step in range(1, 5):
        ckpt.write_checkpoint(root, step, {"model": {"w": torch.full((1,), float(step))}}, {"step": step}, {}, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert ckpt.latest_checkpoint(root).name == "step_0000004"


def _steps(out_dir, name) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out_dir) / name).read_text().splitlines()]


def test_resume_passes_over_a_checkpoint_with_truncated_weights(tmp_path, small_sets):
    full = run_clf(tmp_path / "full", small_sets, iterations=6, save_interval=2)
    part = run_clf(tmp_path / "part", small_sets, iterations=4, save_interval=2)
    newest = ckpt.latest_checkpoint(part.out_dir)
    assert newest.name == "step_0000004"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # cut short (a full disk, a bad copy)
    with pytest.warns(UserWarning, match=r"step_0000004.*model.safetensors.*is damaged.*resuming from .*step_0000002"):
        resumed = run_clf(tmp_path / "part", small_sets, iterations=6, save_interval=2)
    assert resumed.step == 6
    assert_same_weights(weights(full), weights(resumed))
    assert _steps(resumed.out_dir, "train.jsonl") == [1, 2, 3, 4, 5, 6]


def test_checkpoints_newer_than_the_resumed_one_are_removed_by_the_next_save(tmp_path, small_sets):
    """After passing over a damaged step 4 to resume at step 2, the run's next checkpoints are the ones kept."""
    part = run_clf(tmp_path, small_sets, iterations=4, save_interval=2)
    root = Path(part.out_dir) / "checkpoints"
    (root / "step_0000004" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(UserWarning, match="step_0000004.*is damaged"):
        run_clf(tmp_path, small_sets, iterations=3, save_interval=1)
    assert [p.name for p in ckpt._steps(root)] == ["step_0000002", "step_0000003"]
    assert ckpt.latest_checkpoint(root).name == "step_0000003"


def test_resume_with_every_checkpoint_damaged_names_each(tmp_path, small_sets):
    part = run_clf(tmp_path, small_sets, iterations=4, save_interval=2)
    for folder in sorted(Path(part.out_dir, "checkpoints").glob("step_*")):
        state = folder / "state.pt"
        state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"no readable checkpoint.*step_0000004.*state.pt.*step_0000002.*state.pt"):
        run_clf(tmp_path, small_sets, iterations=6, save_interval=2)


def test_rerunning_a_finished_run_writes_no_duplicate_log_rows(tmp_path, small_sets):
    first = run_clf(tmp_path, small_sets, iterations=3, eval_interval=2)
    train_log = (Path(first.out_dir) / "train.jsonl").read_text()
    eval_rows = _steps(first.out_dir, "eval.jsonl")
    assert sorted(set(eval_rows)) == [2, 3]  # step 2 and the final evaluation, a row per t bucket
    again = run_clf(tmp_path, small_sets, iterations=3, eval_interval=2)
    assert again.step == 3
    assert (Path(again.out_dir) / "train.jsonl").read_text() == train_log
    assert _steps(again.out_dir, "eval.jsonl") == eval_rows


def test_resuming_drops_the_log_rows_written_after_the_checkpoint(tmp_path, small_sets):
    """A run killed after logging step 3 but before its step-4 checkpoint resumes at step 2: the rows of
    step 3 are written again, once; so are its evaluations. A row cut short by the kill is dropped."""
    full = run_clf(tmp_path / "full", small_sets, iterations=4, save_interval=2, eval_interval=1)
    run = run_clf(tmp_path / "run", small_sets, iterations=4, save_interval=2, eval_interval=1)
    root = Path(run.out_dir) / "checkpoints"
    shutil.rmtree(root / "step_0000004")
    (root / "latest").write_text("step_0000002\n")
    with open(Path(run.out_dir) / "train.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    resumed = run_clf(tmp_path / "run", small_sets, iterations=4, save_interval=2, eval_interval=1)
    assert _steps(resumed.out_dir, "train.jsonl") == [1, 2, 3, 4]
    assert _steps(resumed.out_dir, "eval.jsonl") == _steps(full.out_dir, "eval.jsonl")
    assert losses(resumed.out_dir) == losses(full.out_dir)


def test_starting_over_with_resume_none_clears_the_logs(tmp_path, small_sets):
    run_clf(tmp_path, small_sets, iterations=3)
    again = run_clf(tmp_path, small_sets, iterations=2, resume="none")
    assert _steps(again.out_dir, "train.jsonl") == [1, 2]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_and_checkpoints_get_the_users_umask(tmp_path, small_sets, umask):
    old = os.umask(umask)
    try:
        result = run_clf(tmp_path, small_sets, iterations=2, save_interval=2)
    finally:
        os.umask(old)
    out = Path(result.out_dir)
    step = ckpt.latest_checkpoint(out)
    for path in (out / "model.safetensors", step / "model.safetensors", step / "state.pt", out / "train.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE(step.stat().st_mode) == 0o777 & ~umask


def test_negative_eta_is_refused_before_any_work(tmp_path, capsys):
    from fastguide.cli import main

    out = tmp_path / "run"
    assert main(["train-classifier", "--eta", "-1", "--iterations", "1", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    why = "eta must be a number >= 0 (0 = cross-entropy, the paper's ECT 0.2), got -1.0"
    assert err == f"fastguide train-classifier: error: {why}\n"
    assert not out.exists()
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        clf_config(tmp_path, eta=-0.1).validate(1)
    with pytest.raises(ValueError, match="ema_rate must be in"):
        DiffusionTrainConfig(out_dir=str(out), ema_rate=1.5).validate(1)


class _Payload:
    """Unpickling this would create the sentinel file (a stand-in for arbitrary code)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pickled_checkpoint_with_code_payload_is_refused(tmp_path, small_sets, zip_format):
    """Refused, and never passed over for the older checkpoint as a damaged one would be."""
    first = run_clf(tmp_path / "a", small_sets, iterations=6, save_interval=3)
    state_file = ckpt.latest_checkpoint(first.out_dir) / "state.pt"
    sentinel = tmp_path / "payload-ran"
    # a real torch checkpoint carrying code
    torch.save({"step": _Payload(sentinel)}, state_file, _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "resuming from step_0000003 instead"
        with pytest.raises(ValueError, match=r"refusing to load .*step_0000006.*state.pt"):
            run_clf(tmp_path / "a", small_sets, iterations=9, save_interval=3)
    assert not sentinel.exists()


# ---- precision, microbatches, validation, diffusion ----


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, small_sets, precision):
    result = run_clf(tmp_path, small_sets, iterations=3, precision=precision)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(result.out_dir))
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(result.out_dir))[1]
    assert bool(state["scaler"]) == (precision == "fp16")  # a grad scaler only for fp16


def _first_step_gradients(monkeypatch, tmp_path, small_sets, **kw) -> list[torch.Tensor]:
    grads: list[torch.Tensor] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        if not grads:
            grads.extend(p.grad.clone() for group in self.param_groups for p in group["params"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run_clf(tmp_path, small_sets, iterations=1, **kw)
    monkeypatch.undo()
    return grads


def test_microbatches_accumulate_to_the_full_batch_gradient(tmp_path, monkeypatch, small_sets):
    full = _first_step_gradients(monkeypatch, tmp_path / "a", small_sets)
    micro = _first_step_gradients(monkeypatch, tmp_path / "b", small_sets, microbatch=3)  # 3 + 3 + 2
    assert len(full) == len(micro) > 0
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_validation_logs_accuracy_and_entropy_per_noise_bucket(tmp_path, small_sets):
    result = run_clf(tmp_path, small_sets, iterations=4, eval_interval=2, eval_buckets=4)
    rows = [json.loads(x) for x in (Path(result.out_dir) / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 5 + [4] * 5
    assert [r["t"] for r in rows[:5]] == ["clean", "0-249", "250-499", "500-749", "750-999"]
    for r in rows:
        assert 0 <= r["top1"] <= r["top5"] <= 1 and 0 <= r["entropy"] <= torch.log(torch.tensor(10.0)) + 1e-4
        assert r["images"] == 40


def test_diffusion_training_hybrid_loss_ema_and_resume(tmp_path, small_sets):
    train, val = (_Sized(s) for s in small_sets)
    flags = dataclasses.replace(TINY_UNET, class_cond=True)
    cfg = DiffusionTrainConfig(
        out_dir=str(tmp_path / "d"), model=flags, batch_size=8, iterations=4, log_interval=1, save_interval=2,
        eval_interval=0, eval_buckets=2, progress=False, ema_rate=0.5,
    )  # fmt: skip
    full = train_diffusion(cfg, train_set=train, val_set=val)
    out = Path(full.out_dir)
    ema = load_file(str(out / "ema.safetensors"))
    assert not torch.equal(ema["out.2.weight"], full.model.state_dict()["out.2.weight"])
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["mse"] + 0.001 * 1000 * r["vb"], rel=1e-5) for r in rows)
    assert all(r["vb"] > 0 for r in rows)
    part = train_diffusion(dataclasses.replace(cfg, out_dir=str(tmp_path / "p"), iterations=2), train_set=train)
    resumed = train_diffusion(dataclasses.replace(cfg, out_dir=str(tmp_path / "p")), train_set=train)
    assert part.step == 2 and resumed.step == 4
    assert_same_weights(weights(full), weights(resumed))
    assert all(torch.equal(full.ema[k], resumed.ema[k]) for k in full.ema)


def test_bad_config_is_rejected_before_training(tmp_path, small_sets):
    with pytest.raises(ValueError, match="microbatch 9"):
        run_clf(tmp_path, small_sets, microbatch=9)
    with pytest.raises(ValueError, match="'fp8'"):
        run_clf(tmp_path, small_sets, precision="fp8")
    assert not (tmp_path / "run").exists()


# ---- command line and torchrun ----

CLI_ARGS = [
    "--batch_size", "8", "--iterations", "6", "--log_interval", "1", "--save_interval", "3",
    "--eval_interval", "0", "--eval_buckets", "2", "--progress", "false", "--classifier_width", "32",
    "--classifier_depth", "1", "--classifier_attention_resolutions", "8", "--channel_mult", "1,2", "--lr", "1e-3",
]  # fmt: skip


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(out_dir, nproc: int, *extra_args, env=None, restarts: int = 0):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}", "-m", "fastguide", "train-classifier", "--out_dir", str(out_dir), *CLI_ARGS,
        *extra_args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=300)


def test_cli_trains_one_process_and_reports_bad_input_in_one_line(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "fastguide", "train-classifier", "--out_dir", str(tmp_path / "r"), *CLI_ARGS],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "r" / "model.safetensors").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "fastguide", "train-classifier", "--out_dir", str(tmp_path / "x"), "--data",
         str(tmp_path / "no_such_folder")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no_such_folder" in bad.stderr


def test_ddp_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """Same losses and weights as one process, to float32 rounding of the gradient sums.

    Tolerance: losses 1e-6 relative at every step; weights: 99.9% of elements within 1e-6, all within
    5e-4 (= lr/2). Adam divides by sqrt(v), so gradients that are exactly zero in exact arithmetic (conv
    biases before a GroupNorm, attention key biases) turn their rounding noise into steps of up to lr.
    """
    one = _torchrun(tmp_path / "one", 1)
    two = _torchrun(tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(losses(tmp_path / "one")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() <= 5e-4
    assert (diff <= 1e-6).float().mean() >= 0.999


def test_sigkill_of_one_rank_restarts_and_finishes_equal_to_uninterrupted(tmp_path):
    clean = _torchrun(tmp_path / "clean", 2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", 2, env=_env(FASTGUIDE_KILL_AT_STEP="5:1"), restarts=1)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resumed from" in killed.stdout + killed.stderr and "step 3" in killed.stdout + killed.stderr
    a = load_file(str(tmp_path / "clean" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert_same_weights(a, b)  # bitwise on CPU


def test_step_randomness_does_not_depend_on_the_number_of_ranks():
    """Rank r of W keeps rows r::W of the one global draw; together the ranks hold the 1-process draw."""
    whole = draw_step_noise(torch.Generator().manual_seed(5), 6, (1, 4, 4), 1000, DistState())
    parts = [draw_step_noise(torch.Generator().manual_seed(5), 6, (1, 4, 4), 1000, DistState(r, 3)) for r in range(3)]
    for field in range(3):
        merged = torch.empty_like(whole[field])
        for r, part in enumerate(parts):
            merged[r::3] = part[field]
        assert torch.equal(merged, whole[field])
    assert whole.flip.dtype == torch.bool and 0 <= int(whole.t.min()) and int(whole.t.max()) < 1000


def test_random_flip_option_changes_training(tmp_path, small_sets):
    plain = run_clf(tmp_path / "a", small_sets, iterations=2)
    flipped = run_clf(tmp_path / "b", small_sets, iterations=2, random_flip=True)
    assert losses(plain.out_dir) != losses(flipped.out_dir)


def test_any_module_can_be_trained_as_classifier(tmp_path, small_sets):
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32 * 32, 10)

        def forward(self, x, t):
            return self.fc(x.flatten(1)) * (1 + t.float()[:, None] / 1000)

    train, val = small_sets
    result = train_classifier(clf_config(tmp_path, iterations=3), model=Linear(), train_set=_Sized(train),
                              val_set=_Sized(val))  # fmt: skip
    assert isinstance(result.model, Linear) and result.step == 3


def test_image_folder_training_skips_corrupt_files_and_rejects_empty_folders(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 36), (60 * i, 100, 200 if label == "cat" else 20)).save(
                tmp_path / "data" / label / f"{i}.png"
            )
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"not a png at all")
    cfg = clf_config(
        tmp_path, data=str(tmp_path / "data"), channels=3, iterations=2, batch_size=4,
        model=dataclasses.replace(TINY_CLF, in_channels=3, num_classes=2),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        result = train_classifier(cfg)
    assert result.step == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        train_classifier(dataclasses.replace(cfg, data=str(tmp_path / "empty"), out_dir=str(tmp_path / "r2")))


def test_diffusion_training_with_l_simple_only(tmp_path, small_sets):
    train, _ = small_sets
    cfg = DiffusionTrainConfig(
        out_dir=str(tmp_path / "d"), model=dataclasses.replace(TINY_UNET, learn_sigma=False), batch_size=8,
        iterations=2, log_interval=1, eval_interval=0, progress=False, val_data="none",
    )  # fmt: skip
    result = train_diffusion(cfg, train_set=_Sized(train))
    assert result.model.out_channels == 1
    rows = [json.loads(x) for x in (Path(result.out_dir) / "train.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["mse"] and r["vb"] == 0 for r in rows)


def test_held_out_folder_with_other_classes_is_rejected(tmp_path):
    from PIL import Image

    for root, classes in (("train", ("cat", "dog")), ("val", ("cat", "eel"))):
        for label in classes:
            (tmp_path / root / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / root / label / "0.png")
    cfg = ClassifierTrainConfig(data=str(tmp_path / "train"), val_data=str(tmp_path / "val"), image_size=8)
    from fastguide.train.tasks import load_datasets

    with pytest.raises(ValueError, match="eel"):
        load_datasets(cfg)


def test_mid_epoch_resume_with_dropout_is_bitwise(tmp_path, small_sets):
    """Dropout draws from the global RNG: a resumed run must continue its stream exactly (64 images,
    batch 8: the checkpoint at step 3 is in the middle of an epoch, and the run crosses into the next)."""
    train, _ = small_sets
    flags = dataclasses.replace(TINY_UNET, dropout=0.3)
    cfg = DiffusionTrainConfig(
        out_dir=str(tmp_path / "full"), model=flags, batch_size=8, iterations=10, log_interval=1, save_interval=3,
        eval_interval=0, progress=False, val_data="none", anneal_lr=True,
    )  # fmt: skip
    full = train_diffusion(cfg, train_set=_Sized(train))

    def crash_at_step_5(variable, step, rank):
        if step == 5:
            raise KeyboardInterrupt  # the process dies after steps 4 and 5's work; the checkpoint is step 3

    from fastguide.train import loop

    interrupted = dataclasses.replace(cfg, out_dir=str(tmp_path / "p"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "kill_if_asked", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train_diffusion(interrupted, train_set=_Sized(train))
    resumed = train_diffusion(interrupted, train_set=_Sized(train))
    assert resumed.step == 10
    assert_same_weights(weights(full), weights(resumed))
    assert all(torch.equal(full.ema[k], resumed.ema[k]) for k in full.ema)


def test_checkpoint_pointer_to_a_missing_folder_falls_back_to_the_newest_complete_one(tmp_path):
    root = tmp_path / "c"
    ckpt.write_checkpoint(root, 1, {"model": {"w": torch.ones(1)}}, {"step": 1}, {})
    ckpt.write_checkpoint(root, 2, {"model": {"w": torch.ones(1)}}, {"step": 2}, {})
    (root / "latest").write_text("step_0000009\n")  # as if a crash hit while step 9 was re-written
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.latest_checkpoint(root).name == "step_0000002"


def test_rewriting_the_same_step_replaces_it(tmp_path):
    root = tmp_path / "c"
    ckpt.write_checkpoint(root, 1, {"model": {"w": torch.ones(1)}}, {"step": 1}, {})
    ckpt.write_checkpoint(root, 1, {"model": {"w": torch.zeros(1)}}, {"step": 1}, {})
    w, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(root))
    assert torch.equal(w["model"]["w"], torch.zeros(1))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]


def test_adm_fp16_weight_flags_are_rejected_for_training(tmp_path, small_sets):
    with pytest.raises(ValueError, match="--precision fp16"):
        run_clf(tmp_path, small_sets, model=dataclasses.replace(TINY_CLF, classifier_use_fp16=True))


def test_ema_warmup_forgets_the_random_initial_weights(tmp_path, small_sets):
    """With ema_rate 0.9999 and no warm-up (ADM's EMA), 4 steps leave the EMA at the random initial weights;
    with the warm-up its decay is min(0.9999, (1 + k) / (10 + k)), and it follows the trained weights."""
    train, val = (_Sized(s) for s in small_sets)
    cfg = DiffusionTrainConfig(
        out_dir=str(tmp_path / "plain"), model=TINY_UNET, batch_size=8, iterations=4, log_interval=1,
        save_interval=4, eval_interval=0, progress=False, ema_rate=0.9999, lr=1e-2,
    )  # fmt: skip
    plain = train_diffusion(cfg, train_set=train)
    warm = train_diffusion(dataclasses.replace(cfg, out_dir=str(tmp_path / "warm"), ema_warmup=True), train_set=train)
    assert_same_weights(weights(plain), weights(warm))  # the warm-up changes the EMA only

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a if a[k].is_floating_point()) ** 0.5

    final = plain.model.state_dict()
    assert distance(warm.ema, final) < 0.5 * distance(plain.ema, final)


def test_resume_from_a_missing_folder_is_refused_before_out_dir_is_made(tmp_path, small_sets):
    with pytest.raises(ValueError, match=r"--resume '.*nowhere': no such folder"):
        run_clf(tmp_path / "run", small_sets, iterations=2, resume=str(tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", [dict(lr=0.1), dict(eta=0.5), dict(batch_size=4)], ids=["lr", "eta", "batch_size"])
def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, small_sets, change):
    """--lr on resume was ignored (the optimizer state brought back the old one) and --eta silently mixed two
    losses, while config.json stated the new value for the whole run."""
    run_clf(tmp_path, small_sets, iterations=3, save_interval=3)
    (name, value), = change.items()
    with pytest.raises(ValueError, match=rf"resuming would change {name} from .* to {value!r}.*--allow_change {name}"):
        run_clf(tmp_path, small_sets, iterations=6, save_interval=3, **change)
    assert json.loads((tmp_path / "run" / "config.json").read_text())[name] != value


def test_a_deliberate_change_on_resume_applies_and_is_recorded(tmp_path, small_sets):
    run_clf(tmp_path, small_sets, iterations=3, save_interval=3)
    result = run_clf(tmp_path, small_sets, iterations=6, save_interval=3, lr=5e-4, allow_change="lr")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr"] == 5e-4
    assert config["changes"] == [{"step": 3, "lr": {"from": 1e-3, "to": 5e-4}}]
    assert result.step == 6
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "run") / "state.pt", weights_only=True)
    assert all(group["lr"] == 5e-4 for group in state["optimizer"]["param_groups"])
    # iterations and the like may change freely; a setting that is not one is refused
    run_clf(tmp_path, small_sets, iterations=7, save_interval=3, log_interval=2, lr=5e-4)
    with pytest.raises(ValueError, match="allow_change names 'nonsense', which is not a setting"):
        run_clf(tmp_path, small_sets, iterations=8, lr=5e-4, allow_change="nonsense")


def test_a_resume_into_another_architecture_is_one_line_naming_the_difference(tmp_path, small_sets):
    run_clf(tmp_path, small_sets, iterations=3, save_interval=3)
    other = dataclasses.replace(TINY_CLF, classifier_width=64, num_head_channels=64)
    with pytest.raises(ValueError, match=r"resuming would change model.classifier_width from 32 to 64") as caught:
        run_clf(tmp_path, small_sets, iterations=6, model=other)
    assert "\n" not in str(caught.value)
    (ckpt.latest_checkpoint(tmp_path / "run") / "config.json").unlink()  # no record: the weights are compared
    with pytest.raises(ValueError, match=r"is of another network than this run's: .*other shapes") as caught:
        run_clf(tmp_path, small_sets, iterations=6, model=other)
    assert "\n" not in str(caught.value)


def test_one_run_per_out_dir_and_a_killed_runs_temporaries_go_with_the_next_run(tmp_path, small_sets):
    from fastguide.files import try_lock

    from faults import snapshot

    part = run_clf(tmp_path, small_sets, iterations=3, save_interval=3)
    out, ckpt = part.out_dir, part.out_dir / "checkpoints"
    litter = [out / ".model.0123456789ab.safetensors", out / ".train.abcdef012345.jsonl",
              out / ".config.0123456789ab.json", ckpt / ".tmp-latest-4242", ckpt / ".tmp-step_0000006-abcdef"]  # fmt: skip
    for path in litter[:-1]:
        path.write_bytes(b"half written")
    litter[-1].mkdir()
    (out / ".model.notes").write_text("the user's")  # not a name fastguide writes: kept
    held = try_lock(out)  # another training run writing there
    try:
        before = snapshot(out)
        with pytest.raises(ValueError, match="is in use: another fastguide training run is writing there"):
            run_clf(tmp_path, small_sets, iterations=6)
        assert snapshot(out) == before
    finally:
        os.close(held)
    assert run_clf(tmp_path, small_sets, iterations=6).step == 6
    assert not any(p.exists() for p in litter) and (out / ".model.notes").exists()


def test_eval_samples_evaluates_the_first_held_out_images_only(tmp_path, small_sets):
    result = run_clf(tmp_path, small_sets, iterations=2, eval_buckets=2, eval_samples=12)
    rows = [json.loads(x) for x in (Path(result.out_dir) / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["images"] == 12 for r in rows)
    with pytest.raises(ValueError, match="eval_samples must be -1 \\(all\\) or >= 1, got 0"):
        run_clf(tmp_path / "b", small_sets, eval_samples=0)


def test_a_resume_whose_data_files_changed_is_refused_unless_allowed(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (60 * i, 100, 200 if label == "cat" else 20)).save(tmp_path / "data" / label / f"{i}.png")
    cfg = clf_config(tmp_path, data=str(tmp_path / "data"), val_data="none", channels=3, iterations=2, batch_size=4,
                     save_interval=2, model=dataclasses.replace(TINY_CLF, in_channels=3, num_classes=2))  # fmt: skip
    train_classifier(cfg)
    recorded = json.loads((Path(cfg.out_dir) / "config.json").read_text())["data_contents"]
    assert len(recorded["train"]) == 16 and recorded["held_out"] is None
    assert train_classifier(dataclasses.replace(cfg, iterations=3)).step == 3  # the same files: resumes
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "data" / "dog" / "1.png")  # one file's pixels change
    with pytest.raises(ValueError, match=r"resuming would change data_contents\.train from '[0-9a-f]{16}' to "
                                         r"'[0-9a-f]{16}'.*--allow_change data_contents"):  # fmt: skip
        train_classifier(dataclasses.replace(cfg, iterations=4))
    done = train_classifier(dataclasses.replace(cfg, iterations=4, allow_change="data_contents"))
    assert done.step == 4
    changes = json.loads((Path(cfg.out_dir) / "config.json").read_text())["changes"]
    assert changes[-1]["step"] == 3 and set(changes[-1]) == {"step", "data_contents.train"}

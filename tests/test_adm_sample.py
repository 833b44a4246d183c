"""``fastguide adm-sample``: ADM's flags and checkpoints, ADM's .npz, the same file on 1 and 2 torchrun ranks,
also when a rank is killed and the job restarted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from adm_sample_support import FLAGS, NPZ, RUN, cli, load

import fastguide as fg
from fastguide.adm.flags import parse_flags
from fastguide.cli import main


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(nproc: int, out, checkpoints, *extra, env=None, restarts: int = 0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", "-m", "fastguide", "adm-sample", *FLAGS, *checkpoints, *RUN,
           "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=600)


def test_one_and_two_ranks_write_the_same_npz_also_after_a_rank_is_killed(tmp_path, checkpoints):
    one = torchrun(1, tmp_path / "one", checkpoints)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, tmp_path / "two", checkpoints)
    assert two.returncode == 0, two.stderr[-3000:]
    killed = torchrun(2, tmp_path / "killed", checkpoints, env=_env(FASTGUIDE_KILL_AFTER_BATCHES="1:1"), restarts=1)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "exitcode: -9" in killed.stderr  # rank 1 was SIGKILLed after its first batch; torchrun restarted both
    images, labels = load(tmp_path / "one" / NPZ)
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    for other in ("two", "killed"):
        got_images, got_labels = load(tmp_path / other / NPZ)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels), other
        assert not (tmp_path / other / ".adm-sample-shards").exists()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adm-sample.json", NPZ]


def test_the_npz_holds_fastguides_samples_for_each_samples_seed_and_label(tmp_path, checkpoints):
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path), "--seed", "10"]) == 0
    images, labels = load(tmp_path / NPZ)
    flags = parse_flags(FLAGS)
    unet = fg.adm.load_checkpoint(flags.model.build(), checkpoints[1]).eval()
    classifier = fg.adm.load_checkpoint(flags.classifier.build(), checkpoints[3]).eval()
    sampler = fg.GuidedSampler(unet, classifier, fg.Schedule.create("linear", 1000, "ddim4"), fg.EntropyDriven(2.0))
    want_labels = [int(np.random.default_rng([10, i]).integers(1000)) for i in range(5)]
    assert labels.tolist() == want_labels
    # batch 1 of batch size 2: samples 2 and 3
    want = fg.to_uint8(sampler.sample(want_labels[2:4], seeds=[12, 13]).images).numpy()
    assert np.array_equal(images[2:4], want)
    # a second run of the same command finds its output and does nothing
    before = (tmp_path / NPZ).stat().st_mtime_ns
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path), "--seed", "10"]) == 0
    assert (tmp_path / NPZ).stat().st_mtime_ns == before


@pytest.mark.parametrize("extra, message", [
    (["--num_channel", "32"], "unrecognized arguments: --num_channel 32"),
    (["--class_cond", "maybe"], "--class_cond expects a boolean"),
    (["--num_samples", "0"], "--num_samples must be positive, got 0"),
    (["--model_path", "no_such.pt"], "no_such.pt"),
    (["--policy", "constant"], "--use_entropy_scale True asks for EDS, but --policy is constant"),
    (["--timestep_respacing", "ddim7000"], "ddim7000"),
])  # fmt: skip
def test_bad_input_is_one_line_before_any_work(tmp_path, checkpoints, capsys, extra, message):
    assert cli(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_another_run_in_the_same_folder_is_refused(tmp_path, checkpoints, capsys):
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path)]) == 0
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path), "--classifier_scale", "3"]) == 2
    assert "holds a run with other settings or inputs (classifier_scale)" in capsys.readouterr().err


def test_sample_and_reproduce_refuse_to_run_on_several_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["sample", "--out", str(tmp_path / "s")], ["reproduce", "--out", str(tmp_path / "r"), "--quick"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "torchrun started 2" in err and "fastguide adm-sample" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["dpmpp2m", "unipc"])
def test_method_runs_fastguides_multistep_solver_on_adms_chain(tmp_path, checkpoints, method):
    run = [*RUN[:RUN.index("--use_ddim")], "--use_ddim", "False", *RUN[RUN.index("--use_ddim") + 2:]]
    assert main(["adm-sample", *FLAGS, *checkpoints, *run, "--out", str(tmp_path), "--method", method]) == 0
    images, labels = load(tmp_path / NPZ)
    flags = parse_flags(FLAGS)
    unet = fg.adm.load_checkpoint(flags.model.build(), checkpoints[1]).eval()
    classifier = fg.adm.load_checkpoint(flags.classifier.build(), checkpoints[3]).eval()
    sampler = fg.GuidedSampler(unet, classifier, fg.Schedule.create("linear", 1000, "ddim4"), fg.EntropyDriven(2.0),
                               fg.SamplerConfig(method=method))  # fmt: skip
    want = fg.to_uint8(sampler.sample(labels[:2].tolist(), seeds=[0, 1]).images).numpy()
    assert np.array_equal(images[:2], want)
    # the method is part of the run's settings
    assert main(["adm-sample", *FLAGS, *checkpoints, *run, "--out", str(tmp_path)]) == 2


def test_method_that_contradicts_use_ddim_is_refused(tmp_path, checkpoints, capsys):
    assert cli(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path / "o"), "--method", "ddpm"]) == 2
    assert "--method ddpm contradicts --use_ddim True" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_run_folder_written_before_method_existed_still_resumes(tmp_path, checkpoints):
    import json

    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "adm-sample.json").read_text())
    del plan["method"]  # as adm-sample wrote it before --method
    (tmp_path / "adm-sample.json").write_text(json.dumps(plan))
    before = (tmp_path / NPZ).stat().st_mtime_ns
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(tmp_path)]) == 0  # use_ddim True: ddim
    assert (tmp_path / NPZ).stat().st_mtime_ns == before


def _other_weights(path, like):
    """A checkpoint at ``path`` with the same architecture as ``like`` and other values."""
    state = torch.load(like, weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, path)


def test_a_resume_with_other_weights_at_the_same_path_is_refused_naming_them(tmp_path, checkpoints):
    """Kill after the first shard, put other weights at --model_path, rerun: refused (samples of two models
    would be mixed in one .npz), naming the changed input; the classifier likewise."""
    ckpt = dict(zip(checkpoints[::2], checkpoints[1::2]))
    for flag in ("--model_path", "--classifier_path"):
        model = tmp_path / f"{flag[2:]}.pt"
        _other_weights(model, ckpt[flag])
        _other_weights(model, model)  # its own file, changed below
        args = [*FLAGS, *RUN, *[x for f, p in ckpt.items() for x in (f, str(model) if f == flag else p)]]
        out = tmp_path / f"out-{flag[2:]}"
        env = {"FASTGUIDE_KILL_AFTER_BATCHES": "1:0"}
        run = subprocess.run([sys.executable, "-m", "fastguide", "adm-sample", *args, "--out", str(out)],
                             capture_output=True, text=True, env=_env(**env), timeout=600)  # fmt: skip
        assert run.returncode != 0 and (out / ".adm-sample-shards").is_dir()
        _other_weights(model, ckpt[flag])  # other contents, same path
        with pytest.raises(ValueError, match=rf"holds a run with other settings or inputs \(the contents of "
                           rf"{flag[2:]}\)"):  # fmt: skip
            _run(args, out)


def _run(args, out):
    from fastguide.cli.adm_sample import run_adm_sample
    from fastguide.cli import build_parser

    run_adm_sample(build_parser().parse_args(["adm-sample", *args, "--out", str(out)]))


@pytest.mark.parametrize("bad, message", [
    (["--attention_resolutions", "32,abc"], "attention_resolutions"),
    (["--channel_mult", "1,,2"], "channel_mult"),
    (["--num_heads", "0", "--num_head_channels", "-1"], "num_heads"),
    (["--seed", str(2**63 - 3)], r"the last sample's seed 9223372036854775809 is not below 2\*\*63"),
], ids=["attention_resolutions", "channel_mult", "num_heads", "seed-range"])  # fmt: skip
def test_bad_flags_and_checkpoints_are_one_line_and_write_nothing(tmp_path, checkpoints, capsys, bad, message):
    out = tmp_path / "out"
    assert main(["adm-sample", *FLAGS, *checkpoints, *RUN, "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "error:" in err[0], err
    assert any(__import__("re").search(message, line) for line in err), err
    assert not out.exists()


def test_a_foreign_checkpoint_writes_nothing(tmp_path, checkpoints, capsys):
    ckpt = dict(zip(checkpoints[::2], checkpoints[1::2]))
    out = tmp_path / "out"
    args = ["--model_path", ckpt["--classifier_path"], "--classifier_path", ckpt["--classifier_path"]]
    assert main(["adm-sample", *FLAGS, *args, *RUN, "--out", str(out)]) == 2
    assert "does not fit the UNetModel" in capsys.readouterr().err
    assert not out.exists()


def _killed_after(args, out, batches: int) -> None:
    """adm-sample ARGS into OUT, SIGKILLed after it has written BATCHES shards."""
    run = subprocess.run([sys.executable, "-m", "fastguide", "adm-sample", *args, "--out", str(out)], capture_output=True,
                         text=True, env=_env(FASTGUIDE_KILL_AFTER_BATCHES=f"{batches}:0"), timeout=600)  # fmt: skip
    assert run.returncode != 0


@pytest.mark.parametrize("damage", ["cut", "flip", "empty"])
def test_a_damaged_shard_is_sampled_again_on_resume(tmp_path, checkpoints, damage):
    out = tmp_path / "out"
    args = [*FLAGS, *checkpoints, *RUN]
    _killed_after(args, out, batches=2)
    shard = out / ".adm-sample-shards" / "batch_000000.npz"
    data = bytearray(shard.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="batch 0 is sampled again"):
        _run(args, out)
    whole = tmp_path / "whole"
    _run(args, whole)
    got, want = np.load(out / NPZ), np.load(whole / NPZ)
    assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["arr_1"], want["arr_1"])


def test_one_writer_per_folder_and_a_killed_runs_temporaries_go_with_the_next_run(tmp_path, checkpoints, capsys):
    from fastguide.files import try_lock

    from faults import snapshot

    out = tmp_path / "out"
    args = [*FLAGS, *checkpoints, *RUN]
    _killed_after(args, out, batches=1)
    litter = [out / ".samples_5x64x64x3.0123456789ab.npz", out / ".adm-sample.abcdef012345.json",
              out / ".adm-sample-shards" / ".batch_000001.0123456789ab.npz"]  # what a kill -9 mid-write leaves
    for path in litter:
        path.write_bytes(b"half written")
    (out / ".samples_mine.npz").write_bytes(b"the user's")  # not a name fastguide writes: kept
    held = try_lock(out)  # another process writing there
    try:
        before = snapshot(out)
        assert cli(["adm-sample", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use: another fastguide adm-sample is writing there" in err
        assert snapshot(out) == before
    finally:
        os.close(held)
    assert cli(["adm-sample", *args, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == [".samples_mine.npz", "adm-sample.json", NPZ]

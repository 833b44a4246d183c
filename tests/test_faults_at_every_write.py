"""Fault injection at every file operation of the commands that write over time (issue 25): a training
checkpoint and adm-sample's merge. Whatever operation fails (EIO) or is killed, what is left reads as the
earlier complete output or the new one, and the next run finishes the job without a trace of the fault."""

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from fastguide.train.checkpoint import load_latest_checkpoint, remove_stale, write_checkpoint

from adm_sample_support import FLAGS, NPZ, RUN, cli, load
from faults import FileFaults, snapshot


def _write(root, step):
    weights = {"model": {"w": torch.full((3, 2), float(step))}}
    write_checkpoint(root, step, weights, {"step": step, "rng": torch.arange(step)}, {"lr": 0.1}, keep=2)


def _resumes_from(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an incomplete newest checkpoint is passed over with a warning
        found = load_latest_checkpoint(root)
    path, weights, state = found
    step = state["step"]
    assert torch.equal(weights["model"]["w"], torch.full((3, 2), float(step))) and torch.equal(state["rng"], torch.arange(step))
    return step


def test_a_checkpoint_write_with_an_error_at_any_operation_resumes_from_a_complete_one(tmp_path):
    _write(tmp_path / "base", 1)
    with FileFaults() as count:
        _write(tmp_path / "base", 2)
    steps = set()
    for k in range(count.calls):
        root = tmp_path / f"k{k}"
        _write(root, 1)
        faults = FileFaults(fail_at=k)
        try:
            with faults:
                _write(root, 2)
        except OSError:
            pass
        steps.add(_resumes_from(root))  # the earlier checkpoint or the new one, each whole
        _write(root, 3)  # the next save: no temporary of the failed one is left
        assert _resumes_from(root) == 3 and not list(root.glob(".tmp-*")), faults.names[k]
    assert steps == {1, 2}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_checkpoint_write_killed_at_any_operation_resumes_from_a_complete_one(tmp_path):
    _write(tmp_path / "base", 1)
    with FileFaults() as count:
        _write(tmp_path / "base", 2)
    steps = set()
    for k in range(count.calls + 1):  # the last: no kill
        root = tmp_path / f"k{k}"
        _write(root, 1)
        pid = os.fork()
        if pid == 0:
            try:
                with FileFaults(fail_at=k, kill_code=9):
                    _write(root, 2)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        steps.add(_resumes_from(root))
        remove_stale(root)  # what the next run does first, holding out_dir's lock
        _write(root, 3)
        assert _resumes_from(root) == 3 and not list(root.glob(".tmp-*"))
    assert steps == {1, 2}


def test_adm_sample_merge_with_an_error_at_any_operation_leaves_the_shards_or_the_npz(tmp_path, checkpoints):
    args = ["adm-sample", *FLAGS, *checkpoints, *RUN]
    whole = tmp_path / "whole"
    assert cli([*args, "--out", str(whole)]) == 0
    want = load(whole / NPZ)
    shards = tmp_path / "shards"  # every shard written, the merge not begun: as a kill just before it leaves
    assert cli([*args, "--out", str(shards)]) == 0
    os.unlink(shards / NPZ)
    (shards / ".adm-sample-shards").mkdir()
    for b, first in enumerate(range(0, 5, 2)):
        np.savez(shards / ".adm-sample-shards" / f"batch_{b:06d}.npz", want[0][first : first + 2], want[1][first : first + 2])
    shutil.copytree(shards, tmp_path / "count")
    with FileFaults() as count:
        assert cli([*args, "--out", str(tmp_path / "count")]) == 0
    assert count.calls > 4
    for k in range(count.calls):
        out = tmp_path / f"k{k}"
        shutil.copytree(shards, out)
        with FileFaults(fail_at=k) as faults:
            code = cli([*args, "--out", str(out)])
        files = set(snapshot(out))
        if NPZ in files:  # the merge got through: the .npz is whole
            got = load(out / NPZ)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), faults.names[k]
        else:
            assert code != 0, faults.names[k]
        assert cli([*args, "--out", str(out)]) == 0  # the rerun finishes, and leaves nothing else
        got = load(out / NPZ)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), faults.names[k]
        assert sorted(os.listdir(out)) == ["adm-sample.json", NPZ], faults.names[k]

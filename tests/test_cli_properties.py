"""The command line's promise on bad input, walked over every subcommand (issue 25): exit status 2, one line
`fastguide CMD: error: ...` without a traceback, naming the bad value, and the output folder exactly as it
was (a user's file in it kept, nothing added; a folder that did not exist not made).

Two walks: every option that takes a number, given a word (argparse's types, generated from the parser, so
that a new option is covered without editing this file); and a table of values that parse but are wrong."""

import argparse

import numpy as np
import pytest

from fastguide.cli import build_parser, main

from adm_sample_support import FLAGS as ADM_FLAGS
from faults import snapshot

OUT_FLAG = {"sample": "--out", "reproduce": "--out", "adm-sample": "--out", "train-classifier": "--out_dir",
            "train-diffusion": "--out_dir"}  # fmt: skip


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _numeric_options():
    for name, parser in _subcommands().items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", None)
            if action.option_strings and action.nargs is None and kind in ("int", "float", "_parse_bool"):
                yield pytest.param(name, action.option_strings[-1], id=f"{name} {action.option_strings[-1]}")


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err


def _check(tmp_path, capsys, command, args, named):
    """``fastguide COMMAND ARGS`` into a folder holding a user's file, and into one that does not exist."""
    for out in (tmp_path / "existing", tmp_path / "missing" / "o"):
        if out.name == "existing":
            out.mkdir(exist_ok=True)
            (out / "notes.txt").write_text("the user's")
        before = snapshot(tmp_path)
        extra = [OUT_FLAG[command], str(out)] if command in OUT_FLAG else []
        code, err = _run(capsys, [command, *args, *extra])
        assert code == 2, (args, err)
        assert err.startswith(f"fastguide {command}: error: ") or err.startswith("fastguide: error: "), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert named in err, (named, err)
        assert snapshot(tmp_path) == before, (args, err)


@pytest.mark.parametrize("command, option", list(_numeric_options()))
def test_every_numeric_option_given_a_word_is_one_line_naming_it(tmp_path, capsys, command, option):
    _check(tmp_path, capsys, command, [option, "abc"], option)


def test_the_walk_covers_every_subcommand():
    covered = {p.values[0] for p in _numeric_options()}
    assert covered >= set(_subcommands()) - {"evaluate"}  # evaluate has no number to give
    assert len(list(_numeric_options())) > 40


TINY = ["--count", "2", "--respacing", "ddim4", "--quiet"]
BAD = {
    "sample": [
        (["--count", "0"], "count"), (["--count", "1000000000"], "--count 1000000000 (10000000000 samples) needs"), (["--count", "-3"], "-3"), (["--batch_size", "0"], "batch_size"),
        (["--scale", "nan"], "nan"), (["--scale", "1e39"], "1e+39"), (["--scale", "-1"], "-1"),
        (["--seed", "-1"], "-1"), (["--seed", str(2**63)], str(2**63)), (["--seeds", "1,x"], "1,x"),
        (["--seeds", "1"], "1 seeds"), (["--classes", "10"], "10"), (["--classes", "-1"], "-1"),
        (["--classes", "0,a"], "0,a"), (["--respacing", " "], "respacing"), (["--respacing", "ddimx"], "ddimx"),
        (["--respacing", "10,a"], "10,a"), (["--eta", "-0.5"], "eta"), (["--eta", "nan"], "eta"),
        (["--method", "euler"], "euler"), (["--policy", "bogus"], "bogus"), (["--model", "nope"], "nope"),
        (["--classifier", "nope"], "nope"), (["--grad_maps", "-1"], "grad_maps"),
        (["--guidance_every", "0"], "guidance_every"), (["--guidance_interval", "5"], "guidance_interval"),
        (["--guidance_interval", "5,x"], "5,x"), (["--threshold", "nan"], "threshold"),
        (["--dynamic_threshold", "7"], "dynamic_threshold"), (["--device", "tpu"], "tpu"),
        (["--precision", "fp8"], "fp8"),
    ],
    "evaluate": [
        (["MISSING"], "missing.npz"), (["FOLDER"], "is a folder"), (["JUNK"], "junk.txt"),
        (["--ref", "MISSING", "SAMPLES"], "missing.npz"),
    ],
    "reproduce": [
        (["--num_samples", "0"], "num_samples"), (["--batch_size", "0"], "batch_size"),
        (["--policies", "bogus"], "bogus"), (["--models", "nope"], "nope"), (["--samplers", "euler"], "euler"),
        (["--ddim_respacing", "ddimx"], "ddimx"), (["--classifiers", "nope"], "nope"),
    ],
    "adm-sample": [
        (["--num_samples", "0"], "num_samples"), (["--batch_size", "0"], "batch_size"),
        (["--attention_resolutions", "32,abc"], "attention_resolutions"), (["--channel_mult", "1,,2"], "channel_mult"),
        (["--num_heads", "0", "--num_head_channels", "-1"], "num_heads"), (["--classifier_scale", "nan"], "nan"),
        (["--timestep_respacing", "ddimx"], "ddimx"), (["--model_path", "MISSING"], "missing.npz"),
        (["--model_path", "FOLDER"], "is a folder"), (["--seed", str(2**63)], str(2**63)), (["--use_ddim", "maybe"], "maybe"),
        (["--image_size", "48"], "48"), (["--num_samples", str(10**14)], "TB on disk"),
    ],
    "train-classifier": [
        (["--batch_size", "0"], "batch_size"), (["--lr", "-1"], "lr"), (["--lr", "nan"], "lr"),
        (["--eta", "-1"], "eta"), (["--eta", "nan"], "eta"), (["--iterations", "0"], "iterations"),
        (["--data", "missing"], "missing"), (["--labels", "x"], "'x'"), (["--labels", "prefix"], "prefix"),
        (["--precision", "fp9"], "fp9"), (["--allow_change", "bogus"], "bogus"),
        (["--resume", "/nonexistent"], "/nonexistent"), (["--microbatch", "0"], "microbatch"),
        (["--eval_interval", "-1"], "eval_interval"), (["--num_workers", "-1"], "num_workers"),
        (["--channel_mult", "1,x"], "1,x"), (["--classifier_attention_resolutions", "16,x"], "16,x"),
        (["--noise_schedule", "foo"], "foo"), (["--image_size", "0"], "image_size"),
    ],
    "train-diffusion": [
        (["--batch_size", "0"], "batch_size"), (["--lr", "-1"], "lr"), (["--iterations", "-5"], "-5"),
        (["--ema_rate", "1"], "ema_rate"), (["--lambda_vlb", "-1"], "lambda_vlb"),
        (["--attention_resolutions", "16,x"], "16,x"), (["--keep_checkpoints", "0"], "keep_checkpoints"),
        (["--save_interval", "0"], "save_interval"), (["--diffusion_steps", "0"], "diffusion_steps"),
    ],
}


@pytest.mark.parametrize("command, args, named",
                         [pytest.param(c, a, n, id=f"{c} {' '.join(a)}") for c, cases in BAD.items() for a, n in cases])  # fmt: skip
def test_bad_values_are_one_line_naming_them_and_leave_the_folder_as_it_was(tmp_path, capsys, checkpoints,
                                                                             command, args, named):  # fmt: skip
    if command == "sample":
        args = [*TINY, *args]
    if command == "adm-sample":
        ckpt = checkpoints if "--model_path" not in args else checkpoints[2:]
        args = [*ADM_FLAGS, *ckpt, "--num_samples", "2", "--quiet", *args]
    (tmp_path / "junk.txt").write_text("not an archive")
    np.savez(tmp_path / "s.npz", np.zeros((8, 32, 32, 1), np.uint8))
    where = {"MISSING": tmp_path / "missing.npz", "FOLDER": tmp_path, "JUNK": tmp_path / "junk.txt",
             "SAMPLES": tmp_path / "s.npz"}  # fmt: skip
    args = [str(where.get(a, a)) for a in args]
    _check(tmp_path, capsys, command, args, named)

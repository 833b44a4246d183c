"""What the adm-sample tests share: the FLAGS networks and the RUN of test_adm_sample.py (also run by
test_cli_properties.py and test_faults_at_every_write.py), the command-line helpers, and test_adm_flags.py's
ADM argparse helpers (adm_build also makes the ``checkpoints`` fixture's networks, tests/conftest.py)."""

from __future__ import annotations

import argparse
import shlex

import numpy as np

from fastguide.cli import main

FLAGS = (
    "--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32 --num_head_channels 16 "
    "--class_cond True --learn_sigma True --channel_mult 1,2 --classifier_width 64 --classifier_depth 1 "
    "--classifier_attention_resolutions 16,8"
).split()
RUN = ["--num_samples", "5", "--batch_size", "2", "--timestep_respacing", "ddim4", "--use_ddim", "True",
       "--use_entropy_scale", "True", "--classifier_scale", "2", "--quiet"]  # fmt: skip
NPZ = "samples_5x64x64x3.npz"

SAMPLE_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
                       classifier_path="", classifier_scale=1.0)  # fmt: skip  scripts/classifier_sample.py's


def adm_args(text: str) -> argparse.Namespace:
    """The flags as ADM's classifier_sample.py parses them (its own argparse helpers)."""
    from guided_diffusion import script_util as su

    defaults = {**SAMPLE_DEFAULTS, **su.model_and_diffusion_defaults(), **su.classifier_defaults()}
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    return parser.parse_args(shlex.split(text))


def adm_build(text: str):
    from guided_diffusion import script_util as su

    args = adm_args(text)
    model, diffusion = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults().keys()))
    classifier = su.create_classifier(**su.args_to_dict(args, su.classifier_defaults().keys()))
    return args, model, diffusion, classifier


def cli(argv: list[str]) -> int:
    """The exit status of ``fastguide ARGV`` (argparse's own errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def load(path):
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        return f["arr_0"], f["arr_1"]

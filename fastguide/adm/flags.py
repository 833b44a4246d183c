"""ADM's flag strings (MODEL_FLAGS, CLASSIFIER_FLAGS, SAMPLE_FLAGS of guided-diffusion's README and scripts)
parsed with ADM's defaults and types into fastguide's :class:`ModelFlags`, :class:`ClassifierFlags` and
:class:`SampleFlags`.

Types follow ADM's ``add_dict_to_argparser``: each flag takes the type of its default, booleans read as
ADM's ``str2bool`` ("yes/true/t/y/1", "no/false/f/n/0", any case). Differences from argparse, each an
error rather than a guess: an unknown flag is named (argparse would also accept an unambiguous prefix),
and so is a flag given twice with different values.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from .networks.configs import ClassifierFlags, ModelFlags, check_types


@dataclass(frozen=True)
class SampleFlags:
    """scripts/classifier_sample.py's own flags (its defaults), and the EDS release's ``use_entropy_scale``."""

    clip_denoised: bool = True  # clip x̂0 to [-1, 1]
    num_samples: int = 10000  # how many images in all
    batch_size: int = 16  # images per batch (per rank)
    use_ddim: bool = False  # DDIM instead of ancestral sampling
    model_path: str = ""  # the UNet's checkpoint
    classifier_path: str = ""  # the classifier's checkpoint
    classifier_scale: float = 1.0  # ADM's constant scale; with use_entropy_scale, EDS's γ
    use_entropy_scale: bool = False  # EDS: s = classifier_scale · log K / H(p(y|x_t)) per sample

    def __post_init__(self):
        check_types(self)


# ADM's defaults: script_util.model_and_diffusion_defaults(), classifier_defaults(), and classifier_sample.py's
ADM_FLAGS = {
    "model": {f.name: f.default for f in dataclasses.fields(ModelFlags) if f.name not in ModelFlags.NOT_ADM},
    "classifier": {f.name: f.default for f in dataclasses.fields(ClassifierFlags) if f.name not in ClassifierFlags.NOT_ADM},
    "sample": {f.name: f.default for f in dataclasses.fields(SampleFlags)},
}  # fmt: skip


def str2bool(value: str | bool) -> bool:
    """ADM's str2bool."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"boolean value expected, got {value!r}")


def _convert(name: str, text: str, default):
    try:
        if isinstance(default, bool):
            return str2bool(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        kind = "a boolean (True/False)" if isinstance(default, bool) else type(default).__name__
        raise ValueError(f"--{name} expects {kind}, got {text!r}") from None


@dataclass(frozen=True)
class AdmFlags:
    """A parsed ADM command line."""

    model: ModelFlags
    classifier: ClassifierFlags
    sample: SampleFlags
    given: frozenset  # the flags the command line set (the rest are ADM's defaults)


def split_flags(argv: str | Sequence[str], known: dict) -> tuple[dict, list[str]]:
    """``{flag: raw text}`` of the ``--flag value`` / ``--flag=value`` pairs among ``known``, and the
    tokens that are not ADM flags (left for the caller)."""
    tokens = shlex.split(argv) if isinstance(argv, str) else list(argv)
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name not in known:
            rest.append(token)
            i += 1
            continue
        if eq:
            text, i = inline, i + 1
        elif i + 1 < len(tokens):
            text, i = tokens[i + 1], i + 2
        else:
            raise ValueError(f"--{name} needs a value")
        if name in values and values[name] != text:
            raise ValueError(f"--{name} is given twice, as {values[name]!r} and {text!r}")
        values[name] = text
    return values, rest


def parse_flags(argv: str | Sequence[str], extra: dict | None = None) -> AdmFlags | tuple[AdmFlags, dict]:
    """Parse ADM flags (a string such as ``"$MODEL_FLAGS $CLASSIFIER_FLAGS $SAMPLE_FLAGS"`` or a list of
    tokens) with ADM's defaults and types. ``extra`` (name -> default) admits more flags, parsed the same
    way and returned beside the flags.

    Raises:
        ValueError: an unknown flag (named), a value of the wrong type, a flag without a value, a flag twice.
    """
    known = {**ADM_FLAGS["model"], **ADM_FLAGS["classifier"], **ADM_FLAGS["sample"], **(extra or {})}
    raw, rest = split_flags(argv, known)
    if rest:
        unknown = [t for t in rest if t.startswith("-")] or rest
        raise ValueError(f"unknown ADM flag {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    values = {name: _convert(name, text, known[name]) for name, text in raw.items()}

    def pick(group):
        return {k: v for k, v in values.items() if k in ADM_FLAGS[group]}

    flags = AdmFlags(ModelFlags(**pick("model")), ClassifierFlags(**pick("classifier")), SampleFlags(**pick("sample")),
                     frozenset(values))  # fmt: skip
    if extra is None:
        return flags
    return flags, {k: values.get(k, v) for k, v in extra.items()}


# the flag strings of guided-diffusion's README for its published checkpoints
README_FLAGS = {
    "64x64": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True "
        "--classifier_attention_resolutions 32,16,8 --classifier_depth 4 --classifier_width 128 "
        "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True "
        "--classifier_scale 1.0 --classifier_use_fp16 True"
    ),
    "128x128": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
        "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
        "--classifier_use_scale_shift_norm True --classifier_scale 0.5 --classifier_use_fp16 True"
    ),
    "256x256": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
        "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
        "--classifier_use_scale_shift_norm True --classifier_scale 1.0 --classifier_use_fp16 True"
    ),
    "256x256_uncond": (
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
        "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
        "--classifier_use_scale_shift_norm True --classifier_scale 10.0 --classifier_use_fp16 True"
    ),
    "512x512": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 False --use_scale_shift_norm True --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
        "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
        "--classifier_use_scale_shift_norm True --classifier_scale 4.0 --classifier_use_fp16 True"
    ),
}

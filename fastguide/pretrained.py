"""Rebuilding trained networks from a training run's folder (config.json + safetensors weights).

A run folder written by ``fastguide train-classifier`` / ``train-diffusion`` (or a copy of its
``config.json`` and weights, as the models shipped with fastguide are) holds everything needed: the
ADM flags under ``"model"`` and the weights. Diffusion runs also carry EMA weights, which sampling
uses by default.

The embedded models (``fastguide/weights/<name>``, see each ``MODEL_CARD.md``) load by name with
:func:`load_embedded`: ``uadm`` / ``cadm`` (unconditional / class-conditional UNets, learned sigma),
``classifier_ce`` / ``classifier_ect`` (noise-aware classifiers, cross-entropy / ECT η = 0.2) and
``eval`` (a clean-image classifier: class accuracy and the feature space of the sample metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from .adm.networks.checkpoint import load_checkpoint
from .adm.networks.configs import ClassifierFlags, ModelFlags


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
EMBEDDED = ("uadm", "cadm", "classifier_ce", "classifier_ect", "eval", "eval_resnet")


def embedded_dir(name: str) -> Path:
    """The folder of the embedded model ``name`` (one of :data:`EMBEDDED`)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {EMBEDDED}")
    path = WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model {name!r} is missing from {str(path)!r}; reinstall fastguide")
    return path


def load_embedded(name: str) -> nn.Module:
    """The embedded model ``name`` with its weights, in eval mode (see :data:`EMBEDDED`)."""
    path = embedded_dir(name)
    config = json.loads((path / "config.json").read_text())
    if config.get("architecture") == "ResNetJudge":  # the evaluation network (scripts/train_eval_net.py)
        from .evalnet import ResNetJudge

        return load_checkpoint(ResNetJudge(**config["model"]), path / "model.safetensors").eval()
    return load_run(path)


def run_flags(path: str | os.PathLike) -> ClassifierFlags | ModelFlags:
    """The ADM flags of a run folder (its architecture and, for UNets, its noise schedule)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}")
    config = json.loads(config_file.read_text())
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{str(config_file)!r} has no 'model' flags; it was not written by a fastguide training run")
    return _flags(config["model"])


def _flags(model: dict) -> ClassifierFlags | ModelFlags:
    kind = ClassifierFlags if "classifier_width" in model else ModelFlags
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields in the run config: {unknown}")
    return kind(**model)


def load_run(path: str | os.PathLike, weights: str = "auto") -> nn.Module:
    """The network of the run folder ``path``, with its trained weights, in eval mode; an x0- or v-prediction
    UNet (``predict_xstart``, ``predict_v``) comes as the eps-model the samplers take (:meth:`ModelFlags.eps_model`).

    Args:
        path: a run folder (``config.json`` and ``model.safetensors``, optionally ``ema.safetensors``).
        weights: "auto" (EMA weights when present, else the model's), "ema" or "model".
    Raises:
        FileNotFoundError: no config.json or no requested weights in ``path``.
        ValueError: a config without ADM flags, an unknown ``weights`` choice, or weights that cannot be
            read or do not fit the config's architecture.
    """
    path = Path(path)
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    flags = run_flags(path)
    stem = "ema" if weights == "ema" or (weights == "auto" and (path / "ema.safetensors").is_file()) else "model"
    net = load_checkpoint(flags.build(), path / f"{stem}.safetensors").eval()
    return flags.eps_model(net) if isinstance(flags, ModelFlags) else net

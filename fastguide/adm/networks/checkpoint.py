"""Loading ADM-format state_dicts without unpickling arbitrary objects."""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ...files import require_file

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or from a torch ``.pt`` file with ``weights_only=True``.

    A pickle that carries anything but tensors and plain containers is refused by torch's
    weights-only unpickler; this function never falls back to full unpickling.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, an unknown suffix, a file that cannot be read, or one that does not hold a
            mapping of names to tensors.
    """
    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(map_location))
        except SafetensorError as err:  # a header or data cut short or garbled
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    elif path.suffix in _PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises UnpicklingError for refused payloads
            raise ValueError(weights_only_refusal(path, err)) from None
    else:
        raise ValueError(f"unknown checkpoint format {path.suffix!r} for {str(path)!r}; use .safetensors or .pt")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    return state


def weights_only_refusal(path, err: Exception) -> str:
    """One line on a .pt file torch's weights-only unpickler refused or could not read (torch's own message is
    ~1300 characters with terminal escapes and advises weights_only=False, which would run the file's code)."""
    text = " ".join(str(err).split())
    found = re.search(r"(?:Unsupported global: GLOBAL|GLOBAL) ([\w.]+)", text)
    if found:  # a pickled object, e.g. a whole nn.Module saved with torch.save(model, ...)
        return (f"refusing to load {str(path)!r}: it holds a pickled object ({found.group(1)}), not just tensors; "
                "fastguide does not run a file's code. Save the weights instead: torch.save(model.state_dict(), path)")
    cause = err.__context__ if "WeightsUnpickler error" in text and err.__context__ is not None else err
    reason = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(cause).split()))[:200]  # no terminal colour codes
    return f"refusing to load {str(path)!r}: not a readable weights-only checkpoint ({reason or type(cause).__name__})"


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load an ADM checkpoint into ``model`` (strict by default) and return the model.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (see :func:`load_state_dict`), or its tensors do not fit
            ``model`` (missing or unexpected keys, other shapes); the message names the file and the
            first mismatches.
    """
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        problem = describe_mismatch(model, state, strict) or " ".join(str(err).split())
        raise ValueError(f"{str(path)!r} does not fit the {type(model).__name__}: {problem}") from None
    return model


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, show: int = 3) -> str:
    """One line on how a state_dict differs from a model's: tensors of other shapes and, when ``strict``,
    missing and unexpected keys (the first ``show`` of each kind); empty when it finds none."""
    own = model.state_dict()
    kinds = {
        "other shapes (file vs model)": [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],  # fmt: skip
    }
    if strict:
        missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
        kinds = {"missing": missing, "unexpected": unexpected, **kinds}
    parts = []
    for what, items in kinds.items():
        if items:
            more = f" and {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)

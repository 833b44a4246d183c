"""fastguide: classifier-guided diffusion sampling with entropy-driven guidance (EDS) and ECT training.

Implements *Entropy-driven Sampling and Training Scheme for Conditional Diffusion Generation*
(ECCV 2022) on ADM-compatible networks.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _kernels_of_a_checkout() -> None:
    """In a source checkout (no install), ``kernels/`` beside this package becomes ``fastguide.kernels``, as
    setup.py's ``package_dir`` maps it in a wheel and in the editable install."""
    name = f"{__name__}.kernels"
    if _importlib_util.find_spec(name) is not None:
        return
    folder = _Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_kernels_of_a_checkout()

from . import adm, ops  # noqa: E402
from .guidance import (
    POLICIES,
    ClassifierOutput,
    Constant,
    ConstantRange,
    EntropyDriven,
    GradientNorm,
    GuidanceState,
    NoGuidance,
    TimestepAware,
    classifier_gradient,
    eds_scale,
    entropy_from_log_probs,
)
from .images import to_uint8
from .losses import ect_loss
from .noise import FixedNoise, PerSampleNoise
from .diffusion import StepOutput
from .ops import guided_ddim_update, guided_ddpm_update
from .config import SamplerConfig
from .sampler import GuidedSampler, SampleResult, SamplingTrace
from .step import StepRecord
from .schedule import Schedule, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "adm",
    "ops",
    "POLICIES",
    "ClassifierOutput",
    "Constant",
    "ConstantRange",
    "EntropyDriven",
    "FixedNoise",
    "GradientNorm",
    "GuidanceState",
    "GuidedSampler",
    "NoGuidance",
    "PerSampleNoise",
    "SampleResult",
    "SamplerConfig",
    "SamplingTrace",
    "StepOutput",
    "StepRecord",
    "Schedule",
    "TimestepAware",
    "classifier_gradient",
    "ect_loss",
    "eds_scale",
    "entropy_from_log_probs",
    "guided_ddim_update",
    "guided_ddpm_update",
    "space_timesteps",
    "to_uint8",
]

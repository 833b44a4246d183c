"""fastguide: classifier-guided diffusion sampling with entropy-driven guidance (EDS) and ECT training.

Implements *Entropy-driven Sampling and Training Scheme for Conditional Diffusion Generation*
(ECCV 2022) on ADM-compatible networks.
"""

from . import adm, ops
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
from .sampler import GuidedSampler, SampleResult, SamplerConfig, SamplingTrace, StepRecord
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

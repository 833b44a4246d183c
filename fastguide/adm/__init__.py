"""ADM-compatible networks (openai/guided-diffusion; fastguide.adm.networks): same classes, arguments and
state_dict keys; and fastguide inside ADM code (fastguide.adm.integration): cond_fn for ADM's loops,
accelerate(diffusion) for fastguide's loops behind ADM's interface."""

from .networks.checkpoint import load_checkpoint, load_state_dict
from .networks.configs import (
    PUBLISHED_CLASSIFIER_SCALE,
    PUBLISHED_CLASSIFIERS,
    PUBLISHED_UNETS,
    ClassifierFlags,
    ModelFlags,
    adm_classifier,
    adm_classifier_flags,
    adm_unet,
    adm_unet_flags,
)
from .integration import AcceleratedDiffusion, CondFn, accelerate, cond_fn, eds_cond_fn
from .flags import AdmFlags, SampleFlags, parse_flags
from .networks.nn import timestep_embedding
from .networks.unet import EncoderUNetModel, UNetModel

__all__ = [
    "AcceleratedDiffusion",
    "AdmFlags",
    "CondFn",
    "accelerate",
    "cond_fn",
    "eds_cond_fn",
    "PUBLISHED_CLASSIFIERS",
    "PUBLISHED_CLASSIFIER_SCALE",
    "PUBLISHED_UNETS",
    "ClassifierFlags",
    "EncoderUNetModel",
    "ModelFlags",
    "SampleFlags",
    "UNetModel",
    "adm_classifier",
    "adm_classifier_flags",
    "adm_unet",
    "adm_unet_flags",
    "load_checkpoint",
    "load_state_dict",
    "parse_flags",
    "timestep_embedding",
]

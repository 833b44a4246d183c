"""ADM-compatible networks (openai/guided-diffusion): same classes, arguments and state_dict keys."""

from .checkpoint import load_checkpoint, load_state_dict
from .configs import (
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
from .nn import timestep_embedding
from .unet import EncoderUNetModel, UNetModel

__all__ = [
    "PUBLISHED_CLASSIFIERS",
    "PUBLISHED_CLASSIFIER_SCALE",
    "PUBLISHED_UNETS",
    "ClassifierFlags",
    "EncoderUNetModel",
    "ModelFlags",
    "UNetModel",
    "adm_classifier",
    "adm_classifier_flags",
    "adm_unet",
    "adm_unet_flags",
    "load_checkpoint",
    "load_state_dict",
    "timestep_embedding",
]

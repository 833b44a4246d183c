"""ADM's command-line flags as frozen dataclasses, and the published ADM configurations.

Field names are guided-diffusion's flag names (``--num_channels``, ``--attention_resolutions``,
``--classifier_width`` ...) so that an ADM command line maps onto them one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .unet import EncoderUNetModel, UNetModel

IMAGENET_CLASSES = 1000

# channel multipliers ADM picks from the image size when --channel_mult is empty
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def channel_mult_for(image_size: int, channel_mult: str = "") -> tuple[float, ...]:
    """ADM's channel multipliers: parsed from ``channel_mult`` or chosen by image size."""
    if channel_mult:
        try:
            mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult {channel_mult!r} is not a comma list of numbers (e.g. '1,2,2')") from None
        if not all(m > 0 for m in mult):
            raise ValueError(f"channel_mult {channel_mult!r} has a multiplier <= 0")
        return mult
    if image_size not in _DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"no default channel_mult for image_size {image_size}; "
            f"pass channel_mult explicitly (defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)})"
        )
    return _DEFAULT_CHANNEL_MULT[image_size]


def attention_ds(image_size: int, attention_resolutions: str) -> tuple[int, ...]:
    """Turn ADM's ``attention_resolutions`` ("32,16,8") into downsampling rates (image_size // res)."""
    out = []
    for res in attention_resolutions.split(","):
        try:
            r = int(res)
        except ValueError:
            raise ValueError(f"attention_resolutions {attention_resolutions!r} is not a comma list of integers "
                             "(e.g. '32,16,8')") from None  # fmt: skip
        if r <= 0 or image_size % r:
            raise ValueError(f"attention resolution {r} does not divide image_size {image_size}")
        out.append(image_size // r)
    return tuple(out)


def check_types(flags) -> None:
    """ValueError naming a field whose value is not of its declared type (a bool given as "False" would
    otherwise count as true): bool fields take bools, int fields ints, float fields numbers, str fields str."""
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
    for f in dataclasses.fields(flags):
        value, want = getattr(flags, f.name), kinds.get(str(f.type))
        if want is None:
            continue
        wrong = not isinstance(value, want) or (isinstance(value, bool) and str(f.type) != "bool")
        if wrong:
            hint = "; parse flag strings with fastguide.adm.parse_flags" if isinstance(value, str) else ""
            raise ValueError(f"{f.name} must be {f.type}, got {value!r}{hint}")


@dataclass(frozen=True)
class ModelFlags:
    """ADM's model and diffusion flags (guided-diffusion ``model_and_diffusion_defaults``)."""

    image_size: int = 64  # side of the square image
    num_channels: int = 128  # base width (model_channels)
    num_res_blocks: int = 2  # residual blocks per resolution
    num_heads: int = 4  # attention heads when num_head_channels == -1
    num_heads_upsample: int = -1  # heads in the decoder; -1 = num_heads
    num_head_channels: int = -1  # channels per head; -1 = use num_heads
    attention_resolutions: str = "16,8"  # resolutions with self-attention
    channel_mult: str = ""  # comma list; empty = ADM's choice by image size
    dropout: float = 0.0  # dropout inside residual blocks
    class_cond: bool = False  # class-conditional UNet (label embedding)
    use_checkpoint: bool = False  # gradient checkpointing while training
    use_scale_shift_norm: bool = True  # FiLM-like timestep conditioning
    resblock_updown: bool = False  # residual blocks for up/down sampling
    use_fp16: bool = False  # torso in float16 (ADM's fp16 mode)
    use_new_attention_order: bool = False  # split q/k/v before heads
    learn_sigma: bool = False  # output 2C channels: eps and the variance interpolation v
    diffusion_steps: int = 1000  # T of the training schedule
    noise_schedule: str = "linear"  # "linear" or "cosine"
    timestep_respacing: str = ""  # "" (all steps), "250", "10,15,20" or "ddim25"
    use_kl: bool = False  # train on the variational bound (training only)
    predict_xstart: bool = False  # the network predicts x0 instead of eps (sampled through XStartToEps)
    predict_v: bool = False  # the network predicts v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 (not an ADM flag; VToEps)
    rescale_timesteps: bool = False  # feed the network t scaled to 0..1000
    rescale_learned_sigmas: bool = False  # RESCALED_MSE loss (training only)
    in_channels: int = 3  # image channels (not an ADM flag; 3 in ADM)
    num_classes: int = IMAGENET_CLASSES  # classes of a class-conditional model (not an ADM flag)

    NOT_ADM: ClassVar[tuple[str, ...]] = ("in_channels", "num_classes", "predict_v")

    def __post_init__(self):
        check_types(self)
        if self.predict_xstart and self.predict_v:
            raise ValueError("predict_xstart and predict_v are both set; a network predicts one of x0, v or eps")

    @property
    def prediction(self) -> str:
        """What the network's first C channels predict: "eps", "x0" (``predict_xstart``) or "v" (``predict_v``)."""
        return "x0" if self.predict_xstart else "v" if self.predict_v else "eps"

    def build(self) -> UNetModel:
        """Instantiate the UNet these flags describe (randomly initialised)."""
        return UNetModel(**self.network_kwargs())

    def network_kwargs(self) -> dict:
        """The constructor arguments of the UNet (fastguide's and ADM's UNetModel take the same)."""
        return dict(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.num_channels,
            out_channels=self.in_channels * (2 if self.learn_sigma else 1),
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=attention_ds(self.image_size, self.attention_resolutions),
            dropout=self.dropout,
            channel_mult=channel_mult_for(self.image_size, self.channel_mult),
            num_classes=self.num_classes if self.class_cond else None,
            use_checkpoint=self.use_checkpoint,
            use_fp16=self.use_fp16,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            use_new_attention_order=self.use_new_attention_order,
        )

    def eps_model(self, net: nn.Module) -> nn.Module:
        """``net`` as fastguide's samplers take it: an eps-model as it is, an x0-prediction network
        (``predict_xstart``) behind :class:`fastguide.diffusion.XStartToEps`, a v-prediction network
        (``predict_v``) behind :class:`fastguide.diffusion.VToEps`."""
        from ...diffusion import VToEps, XStartToEps

        view = {"x0": XStartToEps, "v": VToEps}.get(self.prediction)
        return net if view is None else view(net, self.schedule(""))

    def schedule(self, timestep_respacing: str | None = None):
        """The (respaced) noise schedule these flags describe; ``timestep_respacing`` overrides the flag."""
        from ...schedule import Schedule

        respacing = self.timestep_respacing if timestep_respacing is None else timestep_respacing
        return Schedule.create(self.noise_schedule, self.diffusion_steps, respacing, self.rescale_timesteps)


@dataclass(frozen=True)
class ClassifierFlags:
    """ADM's classifier flags (guided-diffusion ``classifier_defaults``)."""

    image_size: int = 64  # side of the square image
    classifier_use_fp16: bool = False  # torso in float16
    classifier_width: int = 128  # base width
    classifier_depth: int = 2  # residual blocks per resolution
    classifier_attention_resolutions: str = "32,16,8"  # resolutions with self-attention
    classifier_use_scale_shift_norm: bool = True  # FiLM-like timestep conditioning
    classifier_resblock_updown: bool = True  # residual blocks for downsampling
    classifier_pool: str = "attention"  # adaptive | attention | spatial | spatial_v2
    channel_mult: str = ""  # not an ADM flag: empty = ADM's choice by image size
    in_channels: int = 3  # not an ADM flag
    num_classes: int = IMAGENET_CLASSES  # not an ADM flag: classifier outputs
    num_head_channels: int = 64  # not an ADM flag: ADM hard-codes 64

    NOT_ADM: ClassVar[tuple[str, ...]] = ("channel_mult", "in_channels", "num_classes", "num_head_channels")

    def __post_init__(self):
        check_types(self)

    def build(self) -> EncoderUNetModel:
        """Instantiate the classifier these flags describe (randomly initialised)."""
        return EncoderUNetModel(**self.network_kwargs())

    def network_kwargs(self) -> dict:
        """The constructor arguments of the classifier (fastguide's and ADM's EncoderUNetModel take the same)."""
        return dict(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.classifier_width,
            out_channels=self.num_classes,
            num_res_blocks=self.classifier_depth,
            attention_resolutions=attention_ds(self.image_size, self.classifier_attention_resolutions),
            channel_mult=channel_mult_for(self.image_size, self.channel_mult),
            use_fp16=self.classifier_use_fp16,
            num_head_channels=self.num_head_channels,
            use_scale_shift_norm=self.classifier_use_scale_shift_norm,
            resblock_updown=self.classifier_resblock_updown,
            pool=self.classifier_pool,
        )


_ADM_COMMON = dict(
    attention_resolutions="32,16,8",
    diffusion_steps=1000,
    learn_sigma=True,
    num_res_blocks=2,
    num_channels=256,
    resblock_updown=True,
    use_scale_shift_norm=True,
    noise_schedule="linear",
)

# MODEL_FLAGS of the published ADM checkpoints (guided-diffusion README), with class_cond=True
PUBLISHED_UNETS: dict[int, ModelFlags] = {
    64: ModelFlags(
        **{**_ADM_COMMON, "num_res_blocks": 3, "num_channels": 192, "noise_schedule": "cosine"},
        image_size=64, class_cond=True, dropout=0.1, num_head_channels=64, use_new_attention_order=True,
        use_fp16=True,
    ),  # fmt: skip
    128: ModelFlags(**_ADM_COMMON, image_size=128, class_cond=True, num_heads=4, use_fp16=True),
    256: ModelFlags(**_ADM_COMMON, image_size=256, class_cond=True, num_head_channels=64, use_fp16=True),
    512: ModelFlags(**_ADM_COMMON, image_size=512, class_cond=True, num_head_channels=64, use_fp16=False),
}

# classifier flags of the published ADM classifiers (guided-diffusion README)
PUBLISHED_CLASSIFIERS: dict[int, ClassifierFlags] = {
    64: ClassifierFlags(image_size=64, classifier_depth=4),
    128: ClassifierFlags(image_size=128),
    256: ClassifierFlags(image_size=256),
    512: ClassifierFlags(image_size=512),
}

# --classifier_scale used with each published model in the guided-diffusion README
PUBLISHED_CLASSIFIER_SCALE = {64: 1.0, 128: 0.5, 256: 1.0, 512: 4.0}
PUBLISHED_CLASSIFIER_SCALE_UNCOND = {256: 10.0}


def adm_unet_flags(image_size: int, class_cond: bool = True, **overrides) -> ModelFlags:
    """Flags of the published ADM UNet at ``image_size`` (64, 128, 256, 512), optionally unconditional."""
    if image_size not in PUBLISHED_UNETS:
        raise ValueError(f"no published ADM UNet at image_size {image_size}; choose from {sorted(PUBLISHED_UNETS)}")
    return dataclasses.replace(PUBLISHED_UNETS[image_size], class_cond=class_cond, **overrides)


def adm_classifier_flags(image_size: int, **overrides) -> ClassifierFlags:
    """Flags of the published ADM classifier at ``image_size`` (64, 128, 256, 512)."""
    if image_size not in PUBLISHED_CLASSIFIERS:
        raise ValueError(
            f"no published ADM classifier at image_size {image_size}; choose from {sorted(PUBLISHED_CLASSIFIERS)}"
        )
    return dataclasses.replace(PUBLISHED_CLASSIFIERS[image_size], **overrides)


def adm_unet(image_size: int, class_cond: bool = True, **overrides) -> UNetModel:
    """Build the published ADM UNet at ``image_size`` (random weights; load a checkpoint into it)."""
    return adm_unet_flags(image_size, class_cond, **overrides).build()


def adm_classifier(image_size: int, **overrides) -> EncoderUNetModel:
    """Build the published ADM classifier at ``image_size`` (random weights; load a checkpoint into it)."""
    return adm_classifier_flags(image_size, **overrides).build()

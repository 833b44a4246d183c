"""Classifier (ECT) and diffusion training: configs, losses, held-out evaluation and the entry points."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..adm.networks.configs import ClassifierFlags, ModelFlags
from ..guidance import entropy_from_log_probs
from ..losses import diffusion_loss, ect_terms, q_sample
from ..schedule import Schedule
from .data import ImageDataset, describe, fingerprint, image_folder, mnist5k
from .distributed import init_distributed
from .loop import LossTerms, StepNoise, Task, Trainer, TrainConfig, TrainResult

# small ADM architectures sized for 32x32 single-channel data (MNIST); the data sets image size,
# channels and classes at run time
DEFAULT_CLASSIFIER = ClassifierFlags(
    image_size=32, classifier_width=32, classifier_depth=2, classifier_attention_resolutions="16,8",
    channel_mult="1,2,2", in_channels=1, num_classes=10, num_head_channels=32,
)  # fmt: skip
DEFAULT_UNET = ModelFlags(
    image_size=32, num_channels=64, num_res_blocks=2, attention_resolutions="16,8", channel_mult="1,2,2",
    num_head_channels=32, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, in_channels=1,
    num_classes=10,
)  # fmt: skip


@dataclass(frozen=True)
class ClassifierTrainConfig(TrainConfig):
    """Noise-aware classifier training (ADM's recipe) with the entropy constraint (ECT, Alg. 2)."""

    eta: float = 0.0  # ECT weight η: 0 = cross-entropy; the paper uses 0.2, its release 0.1
    noised: bool = True  # train on x_t ~ q(x_t|x_0) at uniform t; False = clean images at t = 0
    model: ClassifierFlags = DEFAULT_CLASSIFIER  # architecture, as ADM's classifier flags

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a number >= 0 (0 = cross-entropy, the paper's ECT 0.2), got {self.eta}")


@dataclass(frozen=True)
class DiffusionTrainConfig(TrainConfig):
    """Eps-prediction UNet training with L_simple or the hybrid loss (learned sigma), with EMA."""

    lr: float = 1e-4  # AdamW learning rate
    ema_rate: float = 0.9999  # EMA decay of the weights
    ema_warmup: bool = False  # decay min(ema_rate, (1+k)/(10+k)) at update k: no random-init residue (ADM: off)
    lambda_vlb: float = 0.001  # λ of L_hybrid = L_simple + λ L_vlb (learned sigma only)
    v_loss: bool = False  # mse as the error of v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0, for either prediction (ADM: off)
    model: ModelFlags = DEFAULT_UNET  # architecture, as ADM's model flags

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate must be in [0, 1), got {self.ema_rate}")
        if not (math.isfinite(self.lambda_vlb) and self.lambda_vlb >= 0):
            raise ValueError(f"lambda_vlb must be a number >= 0, got {self.lambda_vlb}")


def training_schedule(cfg: TrainConfig) -> Schedule:
    """The forward process of training: every one of the T steps (not respaced)."""
    return Schedule.create(cfg.noise_schedule, cfg.diffusion_steps, "")


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) data sets of a config (held-out may be None)."""
    if cfg.data == "mnist5k":
        train = mnist5k("train", cfg.image_size)
        val = mnist5k("heldout", cfg.image_size) if cfg.val_data == "auto" else None
    else:
        train = image_folder(cfg.data, cfg.image_size, cfg.channels, cfg.labels)
        val = None
    if cfg.val_data not in ("auto", "none"):
        val = image_folder(cfg.val_data, cfg.image_size, cfg.channels, cfg.labels)
        if list(val.class_names) != list(train.class_names):
            raise ValueError(
                f"held-out classes {list(val.class_names)[:10]} differ from the training classes "
                f"{list(train.class_names)[:10]}: class ids would not match"
            )
    return train, val


# ---- classifier ----


def classifier_loss(schedule: Schedule, eta: float, noised: bool):
    """Per-sample ``CE + η (log K − H)`` on x_t at the step's timesteps (ADM's classifier_train + ECT)."""

    def loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, rnd: StepNoise) -> LossTerms:
        if noised:
            t, x = rnd.t, q_sample(x0, rnd.t, rnd.noise, schedule)
        else:
            t, x = torch.zeros_like(rnd.t), x0
        logits = model(x, schedule.model_timesteps(t))
        terms = ect_terms(logits, y)
        total = terms.ce if eta == 0 else terms.ce + eta * terms.kl_uniform
        accuracy = (logits.argmax(dim=-1) == y).float()
        return LossTerms(total, (terms.ce, terms.kl_uniform, accuracy))

    return loss


def _bucket_bounds(num_timesteps: int, buckets: int) -> list[tuple[int, int]]:
    edges = [round(b * num_timesteps / buckets) for b in range(buckets + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _noised_batches(dataset: Dataset, schedule: Schedule, lo: int, hi: int, generator: torch.Generator):
    """Held-out images noised at t ~ U[lo, hi) (lo == hi == 0: clean, t = 0), in batches of 256."""
    for x0, y in DataLoader(dataset, batch_size=256):
        if hi == 0:
            yield x0, torch.zeros(len(x0), dtype=torch.long), y
            continue
        t = torch.randint(lo, hi, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        yield q_sample(x0, t, noise, schedule), t, y


def classifier_evaluation(schedule: Schedule, buckets: int, seed: int):
    """Top-1/top-5 accuracy and mean predictive entropy on held-out data, per noise-level bucket of t.

    The first row is clean images (t = 0, no noise); then ``buckets`` equal ranges of t. Noise comes
    from a generator seeded with ``seed`` at every evaluation, so rows are comparable across steps.
    """

    @torch.no_grad()
    def evaluate(model: nn.Module, dataset: Dataset, device: torch.device) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        rows = []
        for lo, hi in [(0, 0)] + _bucket_bounds(schedule.num_original_timesteps, buckets):
            n = top1 = top5 = entropy = 0.0
            for x, t, y in _noised_batches(dataset, schedule, lo, hi, g):
                logits = model(x.to(device), schedule.model_timesteps(t.to(device))).float()
                y = y.to(device)
                k = min(5, logits.shape[1])
                top1 += (logits.argmax(-1) == y).sum().item()
                top5 += (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum().item()
                entropy += entropy_from_log_probs(logits.log_softmax(-1)).sum().item()
                n += len(y)
            bucket = "clean" if hi == 0 else f"{lo}-{hi - 1}"
            rows.append({"t": bucket, "top1": top1 / n, "top5": top5 / n, "entropy": entropy / n, "images": int(n)})
        return rows

    return evaluate


def build_classifier(cfg: ClassifierTrainConfig, dataset) -> tuple[nn.Module, ClassifierFlags]:
    """The classifier of ``cfg.model`` with image size, channels and classes taken from the data."""
    flags = dataclasses.replace(
        cfg.model, image_size=cfg.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes
    )
    return flags.build(), flags


def train_classifier(
    config: ClassifierTrainConfig,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
) -> TrainResult:
    """Train a noise-aware classifier (ECT when ``config.eta > 0``), on one process or under torchrun.

    Args:
        config: the run's configuration.
        model: any ``nn.Module(x, t) -> (B, K)`` logits; default: ADM's EncoderUNetModel of ``config.model``.
        train_set, val_set: data sets yielding (image in [-1, 1], label); default: from ``config.data``.
    Returns:
        :class:`TrainResult`; weights, logs and checkpoints are under ``config.out_dir``.
    """
    return _train(config, "classifier", model, train_set, val_set)


# ---- diffusion ----


def diffusion_objective(schedule: Schedule, learn_sigma: bool, class_cond: bool, lambda_vlb: float,
                        prediction: str = "eps", v_loss: bool = False):  # fmt: skip
    """Per-sample L_simple (or L_hybrid with learned sigma) at the step's timesteps and noise."""

    def loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, rnd: StepNoise) -> LossTerms:
        kwargs = {"y": y} if class_cond else {}
        terms = diffusion_loss(
            model, x0, rnd.t, rnd.noise, schedule, kwargs, learn_sigma, lambda_vlb, prediction, v_loss
        )
        vb = terms.vb if terms.vb is not None else torch.zeros_like(terms.mse)
        return LossTerms(terms.loss, (terms.mse, vb))

    return loss


def diffusion_evaluation(schedule: Schedule, buckets: int, seed: int, learn_sigma: bool, class_cond: bool,
                         prediction: str = "eps"):  # fmt: skip
    """Held-out L_simple (and vb with learned sigma) per noise-level bucket of t."""

    @torch.no_grad()
    def evaluate(model: nn.Module, dataset: Dataset, device: torch.device) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        rows = []
        for lo, hi in _bucket_bounds(schedule.num_original_timesteps, buckets):
            n = mse = vb = 0.0
            for x0, y in DataLoader(dataset, batch_size=256):
                t = torch.randint(lo, hi, (len(x0),), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                kwargs = {"y": y.to(device)} if class_cond else {}
                terms = diffusion_loss(
                    model, x0.to(device), t.to(device), noise.to(device), schedule, kwargs, learn_sigma,
                    prediction=prediction,
                )
                mse += terms.mse.sum().item()
                vb += terms.vb.sum().item() if terms.vb is not None else 0.0
                n += len(x0)
            rows.append({"t": f"{lo}-{hi - 1}", "mse": mse / n, "vb": vb / n, "images": int(n)})
        return rows

    return evaluate


def build_unet(cfg: DiffusionTrainConfig, dataset) -> tuple[nn.Module, ModelFlags]:
    """The UNet of ``cfg.model`` with image size, channels, classes and schedule taken from the run."""
    flags = dataclasses.replace(
        cfg.model,
        image_size=cfg.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        noise_schedule=cfg.noise_schedule,
        diffusion_steps=cfg.diffusion_steps,
    )
    return flags.build(), flags


def train_diffusion(
    config: DiffusionTrainConfig,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
) -> TrainResult:
    """Train a diffusion UNet with ADM's losses and an EMA, on one process or under torchrun.

    Args:
        config: the run's configuration (``config.model.learn_sigma`` selects the hybrid loss,
            ``config.model.class_cond`` a class-conditional UNet, ``config.model.predict_xstart`` /
            ``predict_v`` an x0- / v-prediction network instead of an eps-model).
        model: any ``nn.Module(x, t[, y=])`` eps-model; default: ADM's UNetModel of ``config.model``.
    Returns:
        :class:`TrainResult` (EMA weights in ``result.ema`` and ``out_dir/ema.safetensors``).
    """
    return _train(config, "diffusion", model, train_set, val_set)


def _reject_fp16_weights(config) -> None:
    """ADM's fp16 flags store float16 weights; training takes --precision instead."""
    for flag in ("use_fp16", "classifier_use_fp16"):
        if getattr(config.model, flag, False):
            raise ValueError(
                f"--{flag} true stores float16 weights, which AdamW would update without a master copy; "
                "train with --precision fp16 (autocast and a gradient scaler) instead"
            )


def _train(config, kind: str, model, train_set, val_set) -> TrainResult:
    _reject_fp16_weights(config)
    dist = init_distributed(config.device)
    config.validate(dist.world_size)  # before any data is read or folder made
    if train_set is None:
        train_set, default_val = load_datasets(config)
        val_set = default_val if val_set is None else val_set
    if dist.is_main and isinstance(train_set, ImageDataset):
        print(describe(train_set), flush=True)
    schedule = training_schedule(config)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    run_config = dataclasses.asdict(config)
    contents = {"train": fingerprint(train_set), "held_out": fingerprint(val_set)}
    if contents["train"] is not None:  # the run's identity includes its data's contents (checked on resume)
        run_config["data_contents"] = contents
    if kind == "classifier":
        if model is None:
            model, flags = build_classifier(config, train_set)
            run_config["model"] = dataclasses.asdict(flags)
        task = Task(
            "classifier",
            classifier_loss(schedule, config.eta, config.noised),
            ("ce", "ect", "acc"),
            classifier_evaluation(schedule, config.eval_buckets, config.seed),
        )
    else:
        flags = config.model
        if model is None:
            model, flags = build_unet(config, train_set)
            run_config["model"] = dataclasses.asdict(flags)
        task = Task(
            "diffusion",
            diffusion_objective(schedule, flags.learn_sigma, flags.class_cond, config.lambda_vlb, flags.prediction,
                                config.v_loss),  # fmt: skip
            ("mse", "vb"),
            diffusion_evaluation(
                schedule, config.eval_buckets, config.seed, flags.learn_sigma, flags.class_cond, flags.prediction
            ),
            ema_rate=config.ema_rate,
            ema_warmup=config.ema_warmup,
        )
    return Trainer(config, task, model, train_set, val_set, dist, run_config).run()

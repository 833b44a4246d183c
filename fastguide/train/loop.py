"""The training engine shared by classifier and diffusion training.

One optimisation step on a global batch of B images split over W ranks:

1. The global batch is the next block of a seeded permutation (``DistributedSampler``, ``set_epoch``);
   rank r holds rows r, r+W, r+2W, ... of it.
2. All randomness of the step (timesteps, noise, flips) is drawn for the whole global batch from one
   generator that every rank holds in the same state; each rank keeps its rows. So a sample's noise
   does not depend on the number of ranks, and 1 process and W processes train on the same data.
3. Microbatches accumulate gradients (``no_sync`` until the last); DDP averages over ranks.
4. Checkpoints carry everything needed to continue bit for bit: weights, EMA, optimizer, grad
   scaler, step, epoch and position in the epoch, the shared generator and every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..files import atomic_write, folder_lock, remove_temporaries, temporary_name
from .data import random_flip
from .checkpoint import load_latest_checkpoint, read_checkpoint, remove_stale, write_checkpoint
from .distributed import DistState, kill_if_asked

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KILL_AT_STEP = "FASTGUIDE_KILL_AT_STEP"  # fault injection for tests: "STEP:RANK", first attempt only


@dataclass(frozen=True)
class TrainConfig:
    """What every training run needs (the task configs add their own fields)."""

    out_dir: str = "fastguide-run"  # checkpoints, logs and final weights
    data: str = "mnist5k"  # "mnist5k" or an image folder
    val_data: str = "auto"  # held-out data: "auto" (mnist5k's held-out split for mnist5k), "none", or a folder
    labels: str = "auto"  # image-folder labels: auto | subfolders | prefix | none
    channels: int = 3  # image channels of folder data (mnist5k has 1)
    image_size: int = 32  # images are resized and center-cropped to this size
    random_flip: bool = False  # random horizontal flips (ADM flips natural images; digits must not be)
    batch_size: int = 64  # global batch over all ranks
    microbatch: int = -1  # per-rank microbatch for gradient accumulation; -1 = the whole rank batch
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    anneal_lr: bool = False  # decay the learning rate linearly to 0 over the run
    iterations: int = 1000  # optimisation steps in total
    seed: int = 0  # seeds initialisation, data order and noise
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a grad scaler)
    noise_schedule: str = "linear"  # beta schedule of the forward process
    diffusion_steps: int = 1000  # T
    log_interval: int = 50  # steps between log lines
    eval_interval: int = 500  # steps between held-out evaluations (0 = only at the end)
    save_interval: int = 500  # steps between checkpoints (a checkpoint is always written at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    eval_buckets: int = 10  # noise-level buckets of t for validation
    eval_samples: int = -1  # held-out images in each evaluation, the first ones (-1 = all; a smoke run: fewer)
    resume: str = "auto"  # "auto": continue from out_dir's latest checkpoint; "none"; or a run/checkpoint folder
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # data-loader worker processes
    progress: bool = True  # progress bar on rank 0
    flush_denormal: bool = True  # CPU: treat denormal floats as zero (several times faster; fastguide.cpu)
    allow_change: str = ""  # on resume: comma list of settings to change deliberately (recorded in config.json)

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the first bad field."""
        positive = ("batch_size", "iterations", "log_interval", "save_interval", "keep_checkpoints", "image_size")
        for name in positive + ("eval_buckets", "diffusion_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {sorted(PRECISIONS)}")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the {world_size} ranks")
        rank_batch = self.batch_size // world_size
        if self.microbatch != -1 and not 1 <= self.microbatch <= rank_batch:
            raise ValueError(f"microbatch {self.microbatch} must be -1 or in 1..{rank_batch} (the per-rank batch)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.eval_samples == 0 or self.eval_samples < -1:
            raise ValueError(f"eval_samples must be -1 (all) or >= 1, got {self.eval_samples}")
        for name in ("eval_interval", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        from .data import LABEL_MODES

        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {' | '.join(LABEL_MODES)}, got {self.labels!r}")
        if self.labels != "auto" and self.data == "mnist5k" and self.val_data in ("auto", "none"):
            raise ValueError(f"labels {self.labels!r} applies to image-folder data, and data is mnist5k (labelled)")
        settings = {f.name for f in dataclasses.fields(self)} | {"data_contents"}  # the data's files, recorded
        unknown = [k for k in _names(self.allow_change) if k not in settings]
        if unknown:
            raise ValueError(f"allow_change names {unknown[0]!r}, which is not a setting")


# settings that do not change what a resumed run computes: they may differ on resume
RESUMABLE = frozenset({"out_dir", "resume", "iterations", "log_interval", "eval_interval", "save_interval",
                       "keep_checkpoints", "eval_buckets", "eval_samples", "device", "num_workers", "progress", "allow_change"})  # fmt: skip


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def resume_changes(earlier: dict, now: dict, allowed: list[str], defaults: dict | None = None) -> dict[str, dict]:
    """The settings (flattened: ``model.num_channels``) that differ between a checkpoint's run configuration and
    this run's, beyond :data:`RESUMABLE`: ``{name: {"from": old, "to": new}}``. ValueError naming the first
    change not in ``allowed`` (a top-level name allows its sub-settings too)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if k == "changes" and not prefix:
                continue
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    if "data_contents" not in earlier:  # a run from before the data's contents were recorded
        now = {k: v for k, v in now.items() if k != "data_contents"}
    a, b = flat(json.loads(json.dumps(earlier, default=str))), flat(json.loads(json.dumps(now, default=str)))
    defaults = defaults or {}
    changes = {k: {"from": a.get(k), "to": b.get(k)} for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k) and k.split(".")[0] not in RESUMABLE
               and not (k not in a and k in defaults and b.get(k) == defaults[k])}  # a setting added since: its default  # fmt: skip
    for k, change in changes.items():
        if k not in allowed and k.split(".")[0] not in allowed:
            raise ValueError(
                f"resuming would change {k} from {change['from']!r} to {change['to']!r}, which the checkpoint's "
                f"run did not use; give --allow_change {k.split('.')[0]} to change it deliberately (it is "
                "recorded in config.json), or use another --out_dir")  # fmt: skip
    return changes


class LossTerms(NamedTuple):
    """Per-sample results of a task's loss on one microbatch."""

    loss: torch.Tensor  # (b,) what is minimised
    metrics: tuple[torch.Tensor, ...]  # (b,) each, named by the task's metric_names


class StepNoise(NamedTuple):
    """The randomness of one step for this rank's rows."""

    t: torch.Tensor  # (b,) int64 timesteps
    noise: torch.Tensor  # (b, C, H, W) standard normal
    flip: torch.Tensor  # (b,) bool


class Task(NamedTuple):
    """What distinguishes classifier from diffusion training."""

    name: str  # "classifier" or "diffusion"
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, StepNoise], LossTerms]
    metric_names: tuple[str, ...]  # names of LossTerms.metrics, for the log
    evaluate: Callable[[nn.Module, Dataset, torch.device], list[dict]] | None  # held-out metrics rows
    ema_rate: float | None = None  # keep an EMA of the weights
    ema_warmup: bool = False  # decay min(ema_rate, (1 + k) / (10 + k)) at update k (ADM has none)


class TrainResult(NamedTuple):
    model: nn.Module  # the trained (unwrapped) model
    ema: dict[str, torch.Tensor] | None  # EMA weights, if kept
    step: int  # optimisation steps done
    out_dir: Path  # where checkpoints and logs are


class _Position(NamedTuple):
    epoch: int
    batch: int  # batches done in this epoch


class BatchStream:
    """This rank's batches: DistributedSampler order per epoch, from a resumable position."""

    def __init__(self, dataset: Dataset, dist: DistState, rank_batch: int, seed: int, num_workers: int):
        self.dataset, self.rank_batch, self.num_workers = dataset, rank_batch, num_workers
        self.sampler = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = len(self.sampler) // rank_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} images, fewer than one global batch of "
                f"{rank_batch * dist.world_size}"
            )

    def iterate(self, start: _Position):
        """Yield (position after the batch, images, labels) forever, starting at ``start``."""
        epoch, first = start
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            batches = [order[i * self.rank_batch : (i + 1) * self.rank_batch] for i in range(self.batches_per_epoch)]
            # its own generator: a loader otherwise draws its base seed from the global RNG, which the
            # checkpoint saves, and a mid-epoch resume would shift every later dropout mask
            loader = DataLoader(
                self.dataset, batch_sampler=batches[first:], num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(epoch),
            )  # fmt: skip
            for k, (x, y) in enumerate(loader, start=first + 1):
                yield _Position(epoch, k) if k < self.batches_per_epoch else _Position(epoch + 1, 0), x, y
            epoch, first = epoch + 1, 0


def draw_step_noise(
    generator: torch.Generator, global_batch: int, image_shape: Sequence[int], num_timesteps: int, dist: DistState
) -> StepNoise:
    """Draw the step's randomness for all ``global_batch`` rows and keep this rank's (rows r::W)."""
    t = torch.randint(0, num_timesteps, (global_batch,), generator=generator)
    noise = torch.randn((global_batch, *image_shape), generator=generator)
    flip = torch.rand(global_batch, generator=generator) < 0.5
    rows = slice(dist.rank, None, dist.world_size)
    return StepNoise(t[rows], noise[rows], flip[rows])


def _to(noise: StepNoise, device: torch.device) -> StepNoise:
    return StepNoise(*(v.to(device) for v in noise))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


LOGS = ("train.jsonl", "eval.jsonl")  # the run's logs under out_dir, one JSON object per line


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _drop_rows(path: Path, drop: Callable[[dict], bool]) -> None:
    """Rewrite a .jsonl log (atomically) without the rows for which ``drop(row)`` is true, and without
    lines that are not a JSON object (a line cut short by a crash while it was appended), with a warning."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept, unreadable = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            unreadable += bool(line.strip())
        elif not drop(row):
            kept.append(line)
    if unreadable:
        warnings.warn(f"{str(path)!r}: dropped {unreadable} line(s) that are not a JSON object (cut short by a crash?)")
    if len(kept) != len(lines):
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _step_of(row: dict) -> int:
    step = row.get("step", 0)
    return step if isinstance(step, int) else 0


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


class Trainer:
    """Runs a :class:`Task` on a model and a dataset under a :class:`TrainConfig`."""

    def __init__(
        self,
        config: TrainConfig,
        task: Task,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None,
        dist: DistState,
        run_config: dict | None = None,
    ):
        config.validate(dist.world_size)
        self.cfg, self.task, self.dist = config, task, dist
        self.out_dir = Path(config.out_dir)
        self.run_config = run_config if run_config is not None else asdict(config)
        self.train_set, self.val_set = train_set, val_set
        self.model = model.to(dist.device)
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
            if dist.distributed
            else self.model
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=config.precision == "fp16")
        self.ema = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()} if task.ema_rate is not None else None
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        # dropout and other in-model randomness: distinct per rank, reproducible
        torch.manual_seed(config.seed + 1 + dist.rank)
        self.rank_batch = config.batch_size // dist.world_size
        self.stream = BatchStream(train_set, dist, self.rank_batch, config.seed, config.num_workers)
        self.step, self.position = 0, _Position(0, 0)
        x0, _ = train_set[0]
        self.image_shape = tuple(x0.shape)

    # ---- checkpoints ----

    def _checkpoint(self) -> tuple[Path, dict, dict] | None:
        """(folder, weights, state) to resume from, or None to start at step 0."""
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            return self._agreed_latest(self.out_dir)
        path = Path(r)
        found = self._agreed_latest(path)
        if found is None and (path / "state.pt").is_file():
            found = (path, *read_checkpoint(path))
        if found is None:
            raise ValueError(f"--resume {r!r}: no checkpoint found there")
        return found

    def _agreed_latest(self, root: Path) -> tuple[Path, dict, dict] | None:
        """load_latest_checkpoint on rank 0, which may pass over damaged checkpoints (and warns once);
        every other rank reads the checkpoint rank 0 chose, so that all resume from the same step."""
        if not self.dist.distributed:
            return load_latest_checkpoint(root)
        found, error = None, None
        if self.dist.is_main:
            try:
                found = load_latest_checkpoint(root)
            except ValueError as err:
                error = str(err)
        name, error = self.dist.all_gather_object((None if found is None else str(found[0]), error))[0]
        if error is not None:
            raise ValueError(error)
        if self.dist.is_main or name is None:
            return found
        return Path(name), *read_checkpoint(name)

    def restore(self) -> None:
        found = self._checkpoint()
        if found is None:
            self._forget_logs_after(0)
            return
        path, weights, state = found
        earlier = path / "config.json"
        if earlier.is_file():  # the run's identity: a resume with other settings is refused, or recorded
            before = json.loads(earlier.read_text())
            defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
            changes = resume_changes(before, self.run_config, _names(self.cfg.allow_change), defaults)
            history = list(before.get("changes", []))
            if changes:
                history.append({"step": int(state["step"]), **changes})
            if history:
                self.run_config = {**self.run_config, "changes": history}
        try:
            self.model.load_state_dict(weights["model"], strict=True)
        except RuntimeError as err:
            from ..adm.networks.checkpoint import describe_mismatch

            problem = describe_mismatch(self.model, weights["model"], True) or " ".join(str(err).split())[:300]
            raise ValueError(f"checkpoint {str(path)!r} is of another network than this run's: {problem}") from None
        if self.ema is not None:
            if "ema" not in weights:
                raise ValueError(f"checkpoint {str(path)!r} has no EMA weights")
            self.ema = {k: v.to(self.dist.device) for k, v in weights["ema"].items()}
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # the optimizer state brings back its own; a changed lr is this run's
            group["lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.position = _Position(int(state["epoch"]), int(state["batch"]))
        self.generator.set_state(state["generator"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank], self.dist.device)
        else:
            warnings.warn(
                f"checkpoint was written by {len(rngs)} ranks, this run has {self.dist.world_size}: "
                "in-model randomness (dropout) is re-seeded, so the run will not match an uninterrupted one"
            )
        self._forget_logs_after(self.step)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _forget_logs_after(self, step: int) -> None:
        """Drop the log rows of steps after ``step`` (written before an interruption, or by an earlier run in
        this out_dir): they are about to be written again."""
        if self.dist.is_main:
            for name in LOGS:
                _drop_rows(self.out_dir / name, lambda row: _step_of(row) > step)

    def save(self) -> None:
        rngs = self.dist.all_gather_object(_rng_state(self.dist.device))
        if self.dist.is_main:
            state = {
                "step": self.step,
                "epoch": self.position.epoch,
                "batch": self.position.batch,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "generator": self.generator.get_state(),
                "rng": rngs,
            }
            weights = {"model": self.model.state_dict()}
            if self.ema is not None:
                weights["ema"] = self.ema
            write_checkpoint(
                self.out_dir / "checkpoints", self.step, weights, state, self.run_config, self.cfg.keep_checkpoints
            )
        self.dist.barrier()

    # ---- one step ----

    def _autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def train_step(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step on this rank's batch; returns the sums of (loss, *metrics) over it."""
        cfg, dev = self.cfg, self.dist.device
        if cfg.anneal_lr:
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * (1 - self.step / cfg.iterations)
        noise = _to(draw_step_noise(self.generator, cfg.batch_size, self.image_shape, cfg.diffusion_steps, self.dist), dev)
        x0, y = x0.to(dev), y.to(dev)
        if cfg.random_flip:
            x0 = random_flip(x0, noise.flip)
        mb = self.rank_batch if cfg.microbatch == -1 else cfg.microbatch
        sums = torch.zeros(1 + len(self.task.metric_names), device=dev, dtype=torch.float64)
        self.opt.zero_grad(set_to_none=True)
        for start in range(0, len(x0), mb):
            rows = slice(start, start + mb)
            last = start + mb >= len(x0)
            sync = contextlib.nullcontext() if last or not self.dist.distributed else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    terms = self.task.loss(self.ddp, x0[rows], y[rows], StepNoise(*(v[rows] for v in noise)))
                loss = terms.loss.float().mean() * (len(terms.loss) / len(x0))
                self.scaler.scale(loss).backward()
            parts = torch.stack([terms.loss.detach().float().sum()] + [m.detach().float().sum() for m in terms.metrics])
            sums += parts.double()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self._update_ema()
        return sums

    @torch.no_grad()
    def _update_ema(self) -> None:
        rate = self.task.ema_rate
        if self.task.ema_warmup:  # early updates forget the random initial weights quickly
            rate = min(rate, (1 + self.step) / (10 + self.step))
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate)
            else:
                self.ema[k].copy_(v)

    # ---- the run ----

    def _evaluate(self) -> None:
        if self.task.evaluate is None or self.val_set is None:
            return
        if self.dist.is_main:
            data = self.val_set
            if 0 < self.cfg.eval_samples < len(data):
                data = torch.utils.data.Subset(data, range(self.cfg.eval_samples))
            if self.cfg.progress:  # it can take minutes: say what it does
                print(f"held-out evaluation at step {self.step}: {len(data)} images x {self.cfg.eval_buckets} noise "
                      "buckets (--eval_samples N: fewer images)", flush=True)  # fmt: skip
            self.model.eval()
            rows = self.task.evaluate(self.model, data, self.dist.device)
            self.model.train()
            # the final evaluation of a run started again after it had finished replaces the earlier one
            _drop_rows(self.out_dir / "eval.jsonl", lambda row: _step_of(row) == self.step)
            for row in rows:
                _append_jsonl(self.out_dir / "eval.jsonl", {"step": self.step, **row})
        self.dist.barrier()

    def _log(self, sums: torch.Tensor, images: int, seconds: float, bar) -> None:
        self.dist.all_reduce_sum(sums)
        means = (sums / images).tolist()
        row = {"step": self.step, "loss": means[0], **dict(zip(self.task.metric_names, means[1:]))}
        row["lr"] = self.opt.param_groups[0]["lr"]
        row["images_per_s"] = images / max(seconds, 1e-9)
        if self.dist.is_main:
            _append_jsonl(self.out_dir / "train.jsonl", row)
            text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            if bar is not None:
                bar.write(text)
            else:
                print(text, flush=True)

    def run(self) -> TrainResult:
        from ..cpu import flush_denormals

        with flush_denormals(self.cfg.flush_denormal and self.dist.device.type == "cpu"):
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_dir():  # before out_dir is made
            raise ValueError(f"--resume {cfg.resume!r}: no such folder (a run's out_dir or one of its checkpoints)")
        with contextlib.ExitStack() as lock:
            error = None
            if self.dist.is_main:  # one run per out_dir, for as long as it runs (the kernel drops it on any exit)
                self.out_dir.mkdir(parents=True, exist_ok=True)
                try:
                    lock.enter_context(folder_lock(self.out_dir, "fastguide training run"))
                    self._remove_temporaries()
                except ValueError as err:
                    error = str(err)
            error = self.dist.all_gather_object(error)[0]
            if error is not None:  # every rank says it
                raise ValueError(error)
            return self._train()

    def _remove_temporaries(self) -> None:
        """Rank 0, holding out_dir's lock: what a killed run left half-written (its files' temporaries, and
        the checkpoints folder's ``.tmp-*``)."""
        names = ("model.safetensors", "ema.safetensors", "config.json", *LOGS)
        remove_temporaries(self.out_dir, re.compile("|".join(temporary_name(n).pattern for n in names)))
        remove_stale(self.out_dir / "checkpoints")

    def _train(self) -> TrainResult:
        cfg = self.cfg
        self.restore()
        self.model.train()
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.step, desc=f"train {self.task.name}", unit="step")
        batches = self.stream.iterate(self.position)
        sums = torch.zeros(1 + len(self.task.metric_names), device=self.dist.device, dtype=torch.float64)
        images, tick = 0, time.perf_counter()
        while self.step < cfg.iterations:
            kill_if_asked(KILL_AT_STEP, self.step, self.dist.rank)
            position, x0, y = next(batches)
            sums += self.train_step(x0, y)
            images += cfg.batch_size
            self.step, self.position = self.step + 1, position
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.iterations:
                self._log(sums, images, time.perf_counter() - tick, bar)
                sums.zero_()
                images, tick = 0, time.perf_counter()
            if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step != cfg.iterations:
                self._evaluate()
            if self.step % cfg.save_interval == 0 or self.step == cfg.iterations:
                self.save()
        if bar is not None:
            bar.close()
        self._evaluate()
        self._export()
        return TrainResult(self.model, self.ema, self.step, self.out_dir)

    def _export(self) -> None:
        if self.dist.is_main:
            save_weights(self.out_dir / "model.safetensors", self.model.state_dict())
            if self.ema is not None:
                save_weights(self.out_dir / "ema.safetensors", self.ema)
            text = json.dumps(self.run_config, indent=1, default=str)
            atomic_write(self.out_dir / "config.json", lambda tmp: tmp.write_text(text))
        self.dist.barrier()


"""``fastguide adm-sample``: ADM's scripts/classifier_sample.py with fastguide's sampler, on one process or
under torchrun.

It takes ADM's flags (MODEL_FLAGS, CLASSIFIER_FLAGS, SAMPLE_FLAGS, with ADM's defaults and types), the EDS
release's ``--use_entropy_scale`` and fastguide's ``--policy``, loads ADM checkpoints (``.pt``, read
weights-only, or ``.safetensors``) and writes ADM's ``samples_{N}x{H}x{W}x{C}.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` labels).

Sample i has its own seed (``--seed`` + i) and its own label (drawn from ``[--seed, i]``), and batch b is
samples ``[b·B, (b+1)·B)``: what a batch holds does not depend on the number of ranks. Rank r samples
batches r, r + W, r + 2W, ... and writes each as a shard (atomically) in ``OUT/.adm-sample-shards``; a
restarted job skips the shards that exist; rank 0 merges them into the ``.npz`` when all are there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..files import remove_temporaries, temporary_name

SHARDS = ".adm-sample-shards"
PLAN = "adm-sample.json"
DEFAULT_OUT = "fastguide-adm-out"
KILL_AFTER_BATCHES = "FASTGUIDE_KILL_AFTER_BATCHES"  # fault injection for tests: "N:RANK", first attempt only


def add_adm_sample_command(sub) -> None:
    from ..adm.flags import ADM_FLAGS
    from .args import add_fast_path_arguments
    from ..guidance import POLICIES
    from ..solvers import SOLVERS

    p = sub.add_parser(
        "adm-sample", allow_abbrev=False,
        help="ADM's classifier_sample.py: ADM flags and checkpoints, ADM's .npz; shards under torchrun.",
        description="Classifier-guided sampling with ADM's flags (MODEL_FLAGS, CLASSIFIER_FLAGS, SAMPLE_FLAGS of "
        "guided-diffusion's README, ADM's defaults) and checkpoints. Under torchrun each rank samples its own "
        "batches; the output does not depend on the number of ranks, and a restarted job continues.",
    )  # fmt: skip
    seen = set()
    for group, flags in ADM_FLAGS.items():
        g = p.add_argument_group(f"ADM {group} flags (ADM's defaults)")
        for name, default in flags.items():
            if name in seen:  # image_size: the UNet's and the classifier's, as in ADM
                continue
            seen.add(name)
            kind = "bool" if isinstance(default, bool) else type(default).__name__
            g.add_argument(f"--{name}", default=None, metavar=kind.upper(), help=f"default: {default!r}")
    p.add_argument("--policy", default="auto", choices=["auto", *sorted(POLICIES)],
                   help="guidance policy, its strength --classifier_scale (default: auto = eds with "
                   "--use_entropy_scale True, else ADM's constant scale)")  # fmt: skip
    p.add_argument("--method", default="auto", choices=["auto", *SOLVERS],
                   help="sampler: auto = ADM's (--use_ddim), or "
                   f"{' / '.join(f'{n} ({s.label})' for n, s in SOLVERS.items() if s.multistep)} on the chain "
                   "--timestep_respacing gives, e.g. 15 (default: auto)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: this rank's GPU if there is one (default: auto)")  # fmt: skip
    add_fast_path_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(_run=run_adm_sample)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that decides the samples (written to OUT/adm-sample.json; a restart must match it)."""

    flags: dict  # the ADM flags, all of them
    policy: str  # the resolved policy name
    seed: int
    precision: str
    method: str  # the resolved sampler: ddim, ddpm, dpmpp2m or unipc
    inputs: dict = dataclasses.field(default_factory=dict)  # sha256 of each checkpoint's contents, by flag

    @property
    def batches(self) -> list[range]:
        n, b = self.flags["num_samples"], self.flags["batch_size"]
        return [range(i, min(i + b, n)) for i in range(0, n, b)]


def plan_of(args):
    """(Plan, AdmFlags, policy) from the command line, checked; ValueError names the bad value."""
    from ..adm.flags import ADM_FLAGS, parse_flags
    from ..files import require_file
    from ..generate import build_policy

    names = dict.fromkeys(n for g in ADM_FLAGS.values() for n in g)
    given = [token for name in names if getattr(args, name) is not None for token in (f"--{name}", getattr(args, name))]
    flags = parse_flags(given)
    s, m = flags.sample, flags.model
    if s.num_samples < 1:
        raise ValueError(f"--num_samples must be positive, got {s.num_samples}")
    if s.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {s.batch_size}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed {args.seed} is not in [0, 2**63)")
    if args.seed + s.num_samples - 1 >= 2**63:
        raise ValueError(f"--seed {args.seed} with --num_samples {s.num_samples}: the last sample's seed "
                         f"{args.seed + s.num_samples - 1} is not below 2**63")  # fmt: skip
    name = args.policy if args.policy != "auto" else ("eds" if s.use_entropy_scale else "constant")
    if s.use_entropy_scale and name != "eds":
        raise ValueError(f"--use_entropy_scale True asks for EDS, but --policy is {args.policy}")
    policy = build_policy(name, None if name == "none" else s.classifier_scale)
    if not s.model_path:
        raise ValueError("--model_path is required (the UNet's checkpoint, .pt or .safetensors)")
    require_file(s.model_path, "--model_path")
    if name != "none":
        if not s.classifier_path:
            raise ValueError("--classifier_path is required for guided sampling (or --policy none)")
        require_file(s.classifier_path, "--classifier_path")
    m.schedule()  # checks the schedule and respacing flags
    if flags.classifier.image_size != m.image_size:
        raise ValueError(f"--image_size is {m.image_size} for the UNet but {flags.classifier.image_size} for the classifier")
    all_flags = {**dataclasses.asdict(m), **dataclasses.asdict(flags.classifier), **dataclasses.asdict(s)}
    method = args.method if args.method != "auto" else ("ddim" if s.use_ddim else "ddpm")
    if args.method in ("ddim", "ddpm") and (args.method == "ddim") != s.use_ddim:
        raise ValueError(f"--method {args.method} contradicts --use_ddim {s.use_ddim}; give one of them")
    inputs = {"model_path": _sha256(s.model_path)}
    if name != "none":
        inputs["classifier_path"] = _sha256(s.classifier_path)
    return Plan(all_flags, name, args.seed, args.precision, method, inputs), flags, policy


def _sha256(path: str) -> str:
    """The file's contents' SHA-256: a run's identity (a resume with other weights at the same path is refused)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def labels_of(plan: Plan, num_classes: int) -> list[int]:
    """Sample i's label: uniform over the classes from numpy's generator seeded with [seed, i]."""
    return [int(np.random.default_rng([plan.seed, i]).integers(num_classes)) for i in range(plan.flags["num_samples"])]


def _shard(folder: Path, b: int) -> Path:
    return folder / f"batch_{b:06d}.npz"


def _read_shard(folder: Path, b: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Batch b's (images, labels) if its shard is there and whole (a shard is renamed into place only when
    written), else None."""
    from ..evaluation import read_npz

    if not _shard(folder, b).is_file():
        return None
    try:
        arrays = read_npz(_shard(folder, b), "shard")
    except ValueError as err:  # cut short, a flipped byte, empty: sampled again
        warnings.warn(f"{err}; batch {b} is sampled again", stacklevel=2)
        return None
    images, labels = arrays.get("arr_0"), arrays.get("arr_1")
    if images is None or labels is None or images.shape[:1] != (size,) or labels.shape != (size,):
        warnings.warn(f"shard {_shard(folder, b)} does not hold batch {b}'s {size} samples; it is sampled again",
                      stacklevel=2)  # fmt: skip
        return None
    return images, labels


def run_adm_sample(args) -> None:
    from ..adm.networks.checkpoint import load_checkpoint
    from ..files import check_disk_space, check_output_folder, folder_lock
    from ..generate import save_npz
    from ..images import to_uint8
    from ..config import SamplerConfig
    from ..sampler import GuidedSampler
    from ..train.distributed import init_distributed, kill_if_asked

    plan, flags, policy = plan_of(args)
    config = SamplerConfig(method=plan.method, clip_denoised=flags.sample.clip_denoised,
                           compile=args.compile, precision=args.precision,
                           planned_samples=flags.sample.num_samples)  # fmt: skip (the run's, whatever the ranks)
    out = check_output_folder(args.out)
    m = flags.model
    check_disk_space(out, 2 * flags.sample.num_samples * m.in_channels * m.image_size**2,
                     f"--num_samples {flags.sample.num_samples}", "the shards, then the .npz")  # fmt: skip
    dist = init_distributed(args.device)
    say = (lambda *a: None) if args.quiet else (lambda text: print(f"adm-sample rank {dist.rank}: {text}", flush=True))
    lock = contextlib.ExitStack()
    try:
        unet = load_checkpoint(m.build(), flags.sample.model_path)
        if m.use_fp16:
            unet.convert_to_fp16()
        classifier = None
        if plan.policy != "none":
            classifier = load_checkpoint(flags.classifier.build(), flags.sample.classifier_path)
            if flags.classifier.classifier_use_fp16:
                classifier.convert_to_fp16()
            classifier = classifier.to(dist.device).eval()
        unet = m.eps_model(unet.to(dist.device).eval())
        sampler = GuidedSampler(unet, classifier, m.schedule(), policy, config)
        # the networks are built and their checkpoints loaded and matched before any file is written
        shards = out / SHARDS
        status = None
        if dist.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                # one run per folder, for as long as it runs; then a killed run's temporaries can go
                lock.enter_context(folder_lock(out, "fastguide adm-sample"))
                _remove_temporaries(out, shards, plan)
                status = _prepare(out, shards, plan)
            except ValueError as err:  # every rank says it (and none waits for rank 0)
                status = f"error: {err}"
        status = dist.all_gather_object(status)[0]
        if status.startswith("error: "):
            raise ValueError(status[len("error: "):])
        if status == "done":
            say(f"{out} already holds this run's samples; nothing to do")
            return
        labels = labels_of(plan, m.num_classes if m.class_cond else flags.classifier.num_classes)
        mine = [(b, batch) for b, batch in enumerate(plan.batches) if b % dist.world_size == dist.rank]
        written = 0
        for b, batch in mine:
            if _read_shard(shards, b, len(batch)) is not None:
                continue
            result = sampler.sample([labels[i] for i in batch], seeds=[plan.seed + i for i in batch], device=dist.device)
            images = to_uint8(result.images).cpu().numpy()
            save_npz(_shard(shards, b), images, np.asarray([labels[i] for i in batch], dtype=np.int64))
            written += 1
            say(f"batch {b + 1}/{len(plan.batches)} written")
            kill_if_asked(KILL_AFTER_BATCHES, written, dist.rank)
        dist.barrier()
        if dist.is_main:
            path = _merge(out, shards, plan)
            say(f"wrote {path}")
        dist.barrier()
    finally:
        lock.close()
        dist.close()


def _remove_temporaries(out: Path, shards: Path, plan: Plan) -> None:
    """Rank 0, holding the folder's lock: the temporary files a killed run left (the merged .npz's and the
    plan's in ``out``, the shards' in ``shards``)."""
    final, plan_tmp = temporary_name(_final_path(out, plan).name), temporary_name(PLAN)
    remove_temporaries(out, re.compile(f"{final.pattern}|{plan_tmp.pattern}"))
    remove_temporaries(shards, re.compile(r"\.batch_\d{6}\.[0-9a-f]{12}\.npz"))  # _shard's, as atomic_write names them


def _prepare(out: Path, shards: Path, plan: Plan) -> str:
    """Rank 0, before sampling: write the plan, or check that an earlier attempt's matches it. Returns
    "done" when the output of this very plan is already there, else "todo"."""
    from ..files import atomic_write

    text = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
    path = out / PLAN
    if path.is_file():
        earlier = json.loads(path.read_text())
        if "method" not in earlier:  # written before --method existed: ADM's --use_ddim chose
            earlier["method"] = "ddim" if earlier.get("flags", {}).get("use_ddim") else "ddpm"
        if earlier != json.loads(text):
            changed = sorted(k for k in {**earlier.get("flags", {}), **plan.flags}
                             if earlier.get("flags", {}).get(k) != plan.flags.get(k))  # fmt: skip
            changed += [k for k in ("policy", "seed", "precision", "method") if earlier.get(k) != getattr(plan, k)]
            changed += [f"the contents of {k}" for k in sorted({**earlier.get("inputs", {}), **plan.inputs})
                        if earlier.get("inputs", {}).get(k) != plan.inputs.get(k)]  # fmt: skip
            raise ValueError(f"{str(out)!r} holds a run with other settings or inputs ({', '.join(changed)}); "
                             "use another --out")  # fmt: skip
        if _final_path(out, plan).is_file() and not shards.exists():
            return "done"
    out.mkdir(parents=True, exist_ok=True)
    shards.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return "todo"


def _final_path(out: Path, plan: Plan) -> Path:
    f = plan.flags
    return out / f"samples_{f['num_samples']}x{f['image_size']}x{f['image_size']}x{f['in_channels']}.npz"


def _merge(out: Path, shards: Path, plan: Plan) -> Path:
    """Rank 0: every shard, in batch order, into ADM's .npz, a shard at a time (memory holds one); then the
    shards go."""
    from ..generate import save_npz_chunks

    labels, shape = [], None
    for b, batch in enumerate(plan.batches):  # every shard is there and whole before the .npz is begun
        shard = _read_shard(shards, b, len(batch))
        if shard is None:
            raise ValueError(f"shard {_shard(shards, b)} is missing after every rank finished")
        labels.append(shard[1])
        shape = shard[0].shape[1:]
    path = _final_path(out, plan)

    def chunks():
        for b, batch in enumerate(plan.batches):
            shard = _read_shard(shards, b, len(batch))
            if shard is None:
                raise ValueError(f"shard {_shard(shards, b)} changed while the .npz was written")
            yield shard[0]

    save_npz_chunks(path, (sum(map(len, labels)), *shape), chunks(), np.concatenate(labels))
    shutil.rmtree(shards, ignore_errors=True)
    return path

"""Sampling runs as the command line does them: networks by name or path, a policy by name, batches.

:func:`build_policy` turns ``(name, strength)`` into a guidance policy, :func:`load_networks` resolves
the embedded models (or run folders), and :func:`generate` samples any number of images in batches,
each sample from its own seed, and keeps the per-step trace of all of them. Writers for ADM's ``.npz``
live here too; every file is written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .guidance import POLICIES, GuidancePolicy, NoGuidance, classifier_gradient
from .images import to_uint8
from .config import SamplerConfig
from .sampler import GuidedSampler
from .schedule import Schedule
from .solvers import SOLVERS

MODELS = {"cond": "cadm", "uncond": "uadm"}
CLASSIFIERS = {"ect": "classifier_ect", "ce": "classifier_ce"}
DEFAULT_RESPACING = {name: solver.default_respacing for name, solver in SOLVERS.items()}  # the solvers' own


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_policy(name: str, strength: float | None = None, threshold: float | None = None,
                 t_max: int | None = None) -> GuidancePolicy:  # fmt: skip
    """The policy ``name`` (a key of :data:`fastguide.POLICIES`) with strength γ / s / C.

    ``strength`` is γ for ``eds``, the scale s for ``constant``, and c for ``constant-range``,
    ``timestep-aware`` and ``gradient-norm``; ``threshold`` is gradient-norm's M, ``t_max`` the last
    timestep that constant-range's c applies to. Unset values keep the policy's defaults.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown guidance policy {name!r}; expected one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    kwargs = {}
    if strength is not None and cls.strength is None:
        raise ValueError(f"a strength ({strength}) has no effect with the {name!r} policy")
    if strength is not None:
        kwargs[cls.strength] = strength
    for field, value in (("threshold", threshold), ("t_max", t_max)):
        if value is not None:
            if field not in _fields(cls):
                owners = " or ".join(n for n, c in POLICIES.items() if field in _fields(c))
                raise ValueError(f"{field} applies to the {owners} policy only, not {name!r}")
            kwargs[field] = value
    return cls(**kwargs)


def run_dir(spec: str, names: dict[str, str], what: str) -> Path:
    """The folder of an embedded model (a key of ``names``) or of a run folder ``spec``."""
    from .pretrained import embedded_dir

    if spec in names:
        return embedded_dir(names[spec])
    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"{what} {spec!r} is neither one of {sorted(names)} nor a run folder with a config.json")
    return Path(spec)


@dataclass
class Networks:
    """An eps-model, its schedule flags, and a classifier (None when unguided)."""

    model: nn.Module
    classifier: nn.Module | None
    flags: object  # the UNet's ModelFlags (for its noise schedule)


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else as torch.device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def load_networks(model: str = "cond", classifier: str | None = "ect", device: str | torch.device = "cpu") -> Networks:
    """The eps-model and classifier by name (``cond``/``uncond``, ``ect``/``ce``) or run folder."""
    from .pretrained import load_run, run_flags

    unet_path = run_dir(model, MODELS, "model")
    unet = load_run(unet_path)
    clf = load_run(run_dir(classifier, CLASSIFIERS, "classifier")) if classifier is not None else None
    return Networks(unet.to(device), None if clf is None else clf.to(device), run_flags(unet_path))


@dataclass
class Generated:
    """Samples of a run, in sample order, with per-step diagnostics of every sample."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    t: np.ndarray  # (S,) original timestep of each step
    entropy: np.ndarray | None  # (S, N) H(p(y|x_t)) in nats
    scale: np.ndarray | None  # (S, N) guidance scale
    grad_norm: np.ndarray | None  # (S, N) ‖∇ log p(y|x_t)‖ before scaling
    grad_maps: dict[int, np.ndarray]  # step → (M, C, H, W) s·∇ of the first M samples (if asked for)
    x_maps: dict[int, np.ndarray]  # step → (M, C, H, W) x_t of the same samples


def make_sampler(nets: Networks, policy: GuidancePolicy, method: str = "ddim", respacing: str | None = None,
                 eta: float = 0.0, compile: bool | None = None, precision: str = "auto", **options) -> GuidedSampler:  # fmt: skip
    """A sampler of ``nets`` (see :class:`SamplerConfig` for ``compile``, ``precision`` and the ``options``;
    None / "auto": the fast path on CUDA; on the CPU bf16 networks where the CPU has native bf16, compiled where
    the run repays it (``planned_samples``, :mod:`fastguide.cost`))."""
    respacing = DEFAULT_RESPACING[method] if respacing is None and method in DEFAULT_RESPACING else respacing
    schedule: Schedule = nets.flags.schedule(respacing)
    config = SamplerConfig(method=method, eta=eta, compile=compile, precision=precision, **options)
    return GuidedSampler(nets.model, None if isinstance(policy, NoGuidance) else nets.classifier, schedule, policy,
                         config)  # fmt: skip


def generate(
    sampler: GuidedSampler,
    labels: Sequence[int],
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    grad_map_steps: Sequence[int] = (),
    grad_map_samples: int = 0,
    desc: str = "sampling",
    store: str | os.PathLike | None = None,
) -> Generated:
    """Samples ``labels[i]`` from ``seeds[i]``, ``batch_size`` at a time (results do not depend on it).

    With ``grad_map_steps``, the guidance ``s·∇`` and ``x_t`` of the first ``grad_map_samples`` samples at
    those step indices are recomputed from the kept ``x_t`` (the same deterministic classifier call). A
    step that reused the guidance (``guidance_every``) shows the gradient it applied: that of the last
    step that called the classifier; a step without guidance shows zeros.

    With ``store`` (a folder), the images and the per-step traces go batch by batch into ``.npy`` files
    there, memory-mapped: the run holds one batch in memory however many samples it makes, and the
    returned arrays are those maps.
    """
    from tqdm.auto import tqdm

    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    n_steps = sampler.schedule.num_steps
    bar = tqdm(total=len(labels) * n_steps, disable=not progress, desc=desc, unit="img-step", leave=False)
    images, traces = [], []
    sink = _Sink(Path(store), len(labels), n_steps) if store is not None else None
    kept: dict[int, list[torch.Tensor]] = {}
    plan = sampler.guidance_plan() if grad_map_steps and sampler.classifier is not None else []
    source = {}  # map step -> the step whose x_t gave the gradient applied there
    for k in grad_map_steps:
        j = k
        while 0 < j < len(plan) and plan[j] == "reuse":
            j -= 1
        source[k] = j
    wanted = set(grad_map_steps) | set(source.values())
    try:  # the bar is closed (its line cleared) also when an error or Ctrl-C ends the run
        for start in range(0, len(labels), batch_size):
            lab, sd = list(labels[start : start + batch_size]), list(seeds[start : start + batch_size])
            first = max(0, min(grad_map_samples - start, len(lab)))

            def on_step(k, out, record, first=first, n=len(lab)):
                if first and k + 1 in wanted:
                    kept.setdefault(k + 1, []).append(out.x_prev[:first].detach().clone())
                bar.update(n)

            if first and 0 in wanted:
                from .noise import PerSampleNoise

                kept.setdefault(0, []).append(PerSampleNoise(sd[:first], sampler.image_shape, device).initial())
            try:
                result = sampler.sample(lab, seeds=sd, device=device, callback=on_step)  # flushes denormals
            except FloatingPointError as err:  # name the sample by its place in the whole run
                raise FloatingPointError(f"{err} (sample numbers count from sample {start} of this run)") from None
            if sink is not None:  # on disk, the batch's trace kept only for the gradient maps
                sink.put(start, to_uint8(result.images).cpu().numpy(), result.trace)
                traces.append(result.trace if start < grad_map_samples or not traces else None)
            else:
                images.append(to_uint8(result.images).cpu().numpy())
                traces.append(result.trace)
    finally:
        bar.close()
    grad_maps, x_maps = {}, {}
    if kept and sampler.classifier is not None:
        y = torch.as_tensor(list(labels[:grad_map_samples]), device=device)
        xs = {k: torch.cat(parts) for k, parts in kept.items()}
        grads: dict[int, torch.Tensor] = {}  # source step -> ∇ log p(y|x_t) there, one classifier call each
        for k in sorted(source):
            j = source[k]
            if j not in grads:
                t = sampler.schedule.model_timesteps(torch.full((len(xs[j]),), n_steps - 1 - j, device=device))
                grads[j] = classifier_gradient(sampler.classifier, xs[j], t, y).grad
            s = torch.cat([tr.scale[k] for tr in traces if tr is not None])[: len(xs[k])].to(device)
            grad_maps[k] = (s[:, None, None, None] * grads[j]).cpu().numpy()
            x_maps[k] = xs[k].cpu().numpy()

    def stacked(name):
        if sink is not None:
            return sink.traces.get(name)
        cols = [getattr(tr, name) for tr in traces]
        return None if cols[0] is None else torch.cat(cols, dim=1).numpy()

    return Generated(
        images=sink.images if sink is not None else np.concatenate(images),
        labels=np.asarray(list(labels), dtype=np.int64),
        t=traces[0].t.numpy(),
        entropy=stacked("entropy"),
        scale=stacked("scale"),
        grad_norm=stacked("grad_norm"),
        grad_maps=grad_maps,
        x_maps=x_maps,
    )


class _Sink:
    """:func:`generate`'s arrays as memory-mapped ``.npy`` files in ``folder``, made at the first batch."""

    TRACES = ("entropy", "scale", "grad_norm")

    def __init__(self, folder: Path, n: int, n_steps: int):
        self.folder, self.n, self.n_steps = folder, n, n_steps
        self.images: np.ndarray | None = None
        self.traces: dict[str, np.ndarray] = {}

    def _map(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.lib.format.open_memmap(self.folder / f".{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def put(self, start: int, images: np.ndarray, trace) -> None:
        if self.images is None:
            self.images = self._map("images", (self.n, *images.shape[1:]), np.uint8)
            for name in self.TRACES:
                if getattr(trace, name) is not None:
                    self.traces[name] = self._map(name, (self.n_steps, self.n), np.float32)
        self.images[start : start + len(images)] = images
        for name, array in self.traces.items():
            array[:, start : start + len(images)] = getattr(trace, name).numpy()


def save_npz_chunks(path: str | os.PathLike, shape: tuple[int, ...], chunks, labels: np.ndarray | None) -> None:
    """ADM's sample file with ``arr_0`` (uint8, ``shape``) written from ``chunks``, its consecutive rows, one
    at a time (memory holds one chunk however large the file), atomically; ``np.load`` reads it as it reads
    :func:`save_npz`'s. ValueError when the chunks do not make up ``shape``."""
    import zipfile

    def write(tmp: Path):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": tuple(shape)}  # fmt: skip
                np.lib.format.write_array_header_1_0(f, header)
                rows = 0
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"a chunk of {chunk.dtype} {chunk.shape} does not fit uint8 {tuple(shape)}")
                    f.write(np.ascontiguousarray(chunk).tobytes())
                    rows += len(chunk)
                if rows != shape[0]:
                    raise ValueError(f"the chunks hold {rows} rows, not {shape[0]}")
            if labels is not None:
                with archive.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels))

    atomic_write(path, write)


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None) -> None:
    """ADM's sample file: ``arr_0`` uint8 NHWC images, ``arr_1`` labels (class-conditional runs)."""
    arrays = [images] + ([labels] if labels is not None else [])

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez(f, *arrays)

    atomic_write(path, write)

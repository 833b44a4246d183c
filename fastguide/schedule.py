"""Noise schedules and timestep respacing, with ADM's semantics (float64 tables, explicit timestep map).

A :class:`Schedule` is the (possibly respaced) chain the sampler walks: index ``i`` of the respaced
chain is original timestep ``timestep_map[i]``, and the networks always see original timesteps
(optionally rescaled to 0..1000, ADM's ``rescale_timesteps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, scaled so that any T covers the same range as T=1000 (ADM)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: betas from alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of the schedule called ``name`` ("linear" or "cosine") over ``num_timesteps`` steps."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(BETA_SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_timesteps}")
    return BETA_SCHEDULES[name](num_timesteps)


def _parse_int(text: str, respacing: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"unknown respacing {respacing!r}: expected a count ('250'), section counts ('10,15,20') or 'ddimN'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """The original timesteps kept by a respacing, sorted ascending (ADM's ``space_timesteps``).

    ``section_counts`` is either a list of counts, a comma string of counts ("10,15,20": split the
    chain into equal sections and stride each evenly to that many steps), or "ddimN" (the fixed
    integer stride of the DDIM paper that yields exactly N steps). An empty string keeps all steps.

    Raises:
        ValueError: unknown format, a count < 1, or a count that cannot be realised; the message names
            the requested count.
    """
    if isinstance(section_counts, int) and not isinstance(section_counts, bool):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if section_counts == "":
            return list(range(num_timesteps))
        if text == "":  # "" keeps every step (ADM); blanks are more likely a shell variable gone empty
            raise ValueError(f"respacing {section_counts!r} is blank: give '' to keep every step, or e.g. 'ddim25'")
        if text.startswith("ddim"):
            desired = _parse_int(text[len("ddim") :], section_counts)
            if desired < 1:
                raise ValueError(f"respacing {section_counts!r} asks for {desired} steps; need at least 1")
            for stride in range(1, num_timesteps):  # ADM tries strides 1..T-1
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"respacing {section_counts!r}: cannot create exactly {desired} steps from {num_timesteps} "
                "with an integer stride"
            )
        counts = [_parse_int(c, section_counts) for c in text.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("respacing has no section counts")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise ValueError(f"respacing {section_counts!r} asks for {count} steps in section {i}; need at least 1")
        if size < count:
            raise ValueError(
                f"respacing {section_counts!r}: cannot divide a section of {size} steps into {count} steps"
            )
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0  # accumulated (not multiplied) and rounded half to even, exactly as ADM
        for _ in range(count):
            steps.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(steps))


class StepCoefficients(NamedTuple):
    """Named (B, 1, 1, 1) views of the columns of a coefficient matrix (:meth:`Schedule.coefficients`,
    the one form every update takes), for the formulas of :mod:`fastguide.diffusion`.

    Names follow ADM's GaussianDiffusion attributes; all are computed in float64 and cast once to float32.
    """

    alpha_bar: torch.Tensor  # ᾱ_t
    alpha_bar_prev: torch.Tensor  # ᾱ_{t-1} (1 at the first step)
    sqrt_recip_alpha_bar: torch.Tensor  # 1/sqrt(ᾱ_t)
    sqrt_recipm1_alpha_bar: torch.Tensor  # sqrt(1/ᾱ_t - 1)
    posterior_mean_coef1: torch.Tensor  # coefficient of x̂_0 in the posterior mean
    posterior_mean_coef2: torch.Tensor  # coefficient of x_t in the posterior mean
    posterior_variance: torch.Tensor  # β̃_t (fixed small variance)
    posterior_log_variance_clipped: torch.Tensor  # log β̃_t with β̃_1 in place of β̃_0
    log_beta: torch.Tensor  # log β_t (upper end of the learned range)
    fixed_large_variance: torch.Tensor  # β_t with β̃_1 in place of β_0 (ADM's FIXED_LARGE)
    fixed_large_log_variance: torch.Tensor  # its log, taken in float64

    @classmethod
    def of(cls, coefs: torch.Tensor) -> StepCoefficients:
        """The columns of a (B, NUM_COEFS) coefficient matrix as named (B, 1, 1, 1) views."""
        if coefs.dim() != 2 or coefs.shape[1] != len(cls._fields):
            raise ValueError(f"coefs has shape {tuple(coefs.shape)}, expected (B, {len(cls._fields)})")
        return cls(*(coefs[:, i].reshape(-1, 1, 1, 1) for i in range(len(cls._fields))))


_TABLES = StepCoefficients._fields


@dataclass(frozen=True, eq=False)
class Schedule:
    """A (respaced) diffusion chain.

    Build with :meth:`create`. Index ``i`` (0 = least noisy) of the chain corresponds to original
    timestep ``timestep_map[i]``; ``betas`` are the respaced betas derived from the kept ᾱ values.
    """

    betas: np.ndarray  # (N,) float64 betas of the respaced chain
    timestep_map: tuple[int, ...]  # original timestep of each respaced index, ascending
    num_original_timesteps: int  # T of the schedule the networks were trained on
    rescale_timesteps: bool = False  # feed networks t * 1000 / T instead of t
    _tables: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        noise_schedule: str = "linear",
        diffusion_steps: int = 1000,
        timestep_respacing: str | list[int] = "",
        rescale_timesteps: bool = False,
    ) -> Schedule:
        """The schedule ``noise_schedule`` over ``diffusion_steps``, respaced by ``timestep_respacing``."""
        base = named_betas(noise_schedule, diffusion_steps)
        kept = space_timesteps(diffusion_steps, timestep_respacing)
        return cls.respaced(base, kept, rescale_timesteps)

    @classmethod
    def respaced(cls, base_betas: np.ndarray, kept: list[int], rescale_timesteps: bool = False) -> Schedule:
        """Keep original timesteps ``kept``; the new betas come from the kept ᾱ: β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}."""
        alpha_bar = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
        kept = sorted(set(int(k) for k in kept))
        if not kept or kept[0] < 0 or kept[-1] >= len(alpha_bar):
            raise ValueError(f"kept timesteps {kept[:3]}... are outside 0..{len(alpha_bar) - 1}")
        last, betas = 1.0, []
        for k in kept:
            betas.append(1.0 - alpha_bar[k] / last)
            last = alpha_bar[k]
        return cls(np.array(betas, dtype=np.float64), tuple(kept), len(alpha_bar), rescale_timesteps)

    @classmethod
    def from_adm(cls, diffusion) -> Schedule:
        """The chain of an ADM diffusion object (``GaussianDiffusion`` or ``SpacedDiffusion``, duck-typed):
        its ``betas`` (already respaced), ``timestep_map`` (all steps when absent), ``original_num_steps``
        and ``rescale_timesteps``. ADM's own float64 betas are kept, so the tables are ADM's."""
        try:
            betas = np.asarray(diffusion.betas, dtype=np.float64)
        except AttributeError:
            raise TypeError(f"{type(diffusion).__name__} has no betas: not an ADM diffusion object") from None
        timestep_map = getattr(diffusion, "timestep_map", None)
        timestep_map = tuple(range(len(betas))) if timestep_map is None else tuple(int(t) for t in timestep_map)
        original = int(getattr(diffusion, "original_num_steps", len(betas)))
        return cls(betas, timestep_map, original, bool(getattr(diffusion, "rescale_timesteps", False)))

    def __post_init__(self):
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) == 0 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        if len(self.timestep_map) != len(b):
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {len(b)} betas")
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # the first posterior variance is 0; ADM substitutes the second for the log and FIXED_LARGE
        post_var1 = post_var[1] if len(b) > 1 else b[0]
        tables = {
            "alpha_bar": ac,
            "alpha_bar_prev": ac_prev,
            "sqrt_recip_alpha_bar": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alpha_bar": np.sqrt(1.0 / ac - 1),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var1, post_var[1:])),
            "log_beta": np.log(b),
            "fixed_large_variance": np.append(post_var1, b[1:]),
            "fixed_large_log_variance": np.log(np.append(post_var1, b[1:])),
        }
        self._tables.update({k: torch.from_numpy(v) for k, v in tables.items()})
        # every coefficient of every step as one float32 row (cast once from float64), for the fused ops
        self._tables["_matrix"] = torch.stack([self._tables[n] for n in _TABLES], dim=1).float().contiguous()

    @property
    def num_steps(self) -> int:
        """Number of steps of the respaced chain."""
        return len(self.betas)

    def table(self, name: str) -> torch.Tensor:
        """A float64 table of the chain, indexed by respaced index (e.g. ``"alpha_bar"``)."""
        return self._tables[name]

    def coefficients(self, index: torch.Tensor) -> torch.Tensor:
        """(B, NUM_COEFS) float32 coefficient rows at respaced indices ``index`` (B,), columns in
        :class:`StepCoefficients` order, on index's device: the ``coefs`` input of every update
        (:meth:`StepCoefficients.of` names its columns). Taken from the float64 tables and cast to float32
        once, as ADM's ``_extract_into_tensor``."""
        return self._tables["_matrix"][index.detach().to("cpu", torch.long)].to(index.device)

    def original_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Original timesteps (int64) of respaced indices ``index``."""
        table = torch.tensor(self.timestep_map, dtype=torch.long)
        return table[index.detach().to("cpu", torch.long)].to(index.device)

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """What the networks see for respaced indices ``index``: original timesteps, rescaled if asked."""
        t = self.original_timesteps(index)
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_original_timesteps)
        return t

"""Figures: sample grids (a row per class), the per-step trace of entropy / scale / gradient norm
(the paper's Fig. 1 and 3), guidance-gradient maps (Fig. 4) and the ablation sweeps (supplement Fig. 1-2).

Every figure is written through :func:`fastguide.files.atomic_write`. matplotlib is imported
lazily (Agg backend) so that the library itself does not need it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .files import atomic_write
from .generate import Generated


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


GRID_COLUMNS = 64  # samples of each class in the grid at most (the first ones)


def grid_image(images: np.ndarray, labels: np.ndarray, scale: int = 2, pad: int = 2,
               columns: int = GRID_COLUMNS) -> np.ndarray:  # fmt: skip
    """uint8 (rows·(H+pad)+pad, cols·(W+pad)+pad, C) grid: a row per class (ascending), its first ``columns``
    samples in order."""
    classes = sorted(set(labels.tolist()))
    cols = min(columns, max(int((labels == c).sum()) for c in classes))
    n, h, w, c = images.shape
    grid = np.full((len(classes) * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for r, cls in enumerate(classes):
        for j, i in enumerate(np.flatnonzero(labels == cls)[:cols]):
            y0, x0 = pad + r * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, scale: int = 2) -> None:
    """PNG of :func:`grid_image`."""
    from PIL import Image

    grid = grid_image(images, labels, scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _band(ax, t: np.ndarray, row, label: str, color: str) -> None:
    """Median and 10–90% band over the samples of ``row(k)`` at each step k (a row at a time: the traces
    of a long run are memory-mapped)."""
    lo, mid, hi = np.array([np.percentile(row(k), [10, 50, 90]) for k in range(len(t))]).T
    ax.plot(t, mid, color=color, label=f"{label} (median)")
    ax.fill_between(t, lo, hi, color=color, alpha=0.25, label="10-90%")


def save_trace_plot(path: str | os.PathLike, gen: Generated, title: str, num_classes: int) -> None:
    """Entropy H(p(y|x_t)), scale s and ‖∇‖ / ‖s·∇‖ against t over all samples (median and 10–90%)."""
    if gen.entropy is None:
        raise ValueError("the run was unguided: there is no entropy, scale or gradient trace to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")  # no y-label over the next panel
    t = gen.t
    _band(axes[0], t, lambda k: gen.entropy[k], "H(p(y|x_t))", "tab:blue")
    axes[0].axhline(np.log(num_classes), color="gray", ls="--", lw=1, label="log K (uniform)")
    axes[0].set_ylabel("entropy [nats]")
    _band(axes[1], t, lambda k: gen.scale[k], "scale s", "tab:orange")
    axes[1].set_ylabel("guidance scale")
    _band(axes[2], t, lambda k: gen.grad_norm[k], "‖∇ log p(y|x_t)‖", "tab:green")
    _band(axes[2], t, lambda k: gen.grad_norm[k] * np.abs(gen.scale[k]), "‖s·∇‖", "tab:red")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("gradient norm")
    for ax in axes:
        ax.set_xlabel("t")
        ax.set_xlim(t.max(), t.min())  # sampling runs from t = T down to 0
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def save_grad_maps(path: str | os.PathLike, gen: Generated, title: str, baseline: Generated | None = None,
                   baseline_name: str = "baseline") -> None:  # fmt: skip
    """Fig. 4-style gradient maps: per sample, x_t, then |s·∇| of ``baseline`` (same seeds), then |s·∇| of ``gen``.

    A sample's maps share one colour scale, so guidance that vanishes in one run shows as a dark row.
    """
    if not gen.grad_maps:
        raise ValueError("no gradient maps were kept (an unguided run, or no steps asked for)")
    plt = _pyplot()
    steps = sorted(gen.grad_maps)
    m = gen.grad_maps[steps[0]].shape[0]
    runs = ([(baseline_name, baseline)] if baseline is not None else []) + [("this run", gen)]
    rows = 1 + len(runs)
    fig, axes = plt.subplots(rows * m, len(steps), figsize=(1.3 * len(steps), 1.4 * rows * m), squeeze=False)
    for i in range(m):
        maps = {name: [np.abs(g.grad_maps[k][i]).sum(axis=0) for k in steps] for name, g in runs}
        top = max(float(a.max()) for arrays in maps.values() for a in arrays) or 1.0
        for j, k in enumerate(steps):
            axes[rows * i, j].imshow(gen.x_maps[k][i].mean(axis=0), cmap="gray")
            for r, (name, _) in enumerate(runs, start=1):
                axes[rows * i + r, j].imshow(maps[name][j], cmap="inferno", vmin=0, vmax=top)
            if i == 0:
                axes[0, j].set_title(f"t={int(gen.t[k])}", fontsize=8)
        axes[rows * i, 0].set_ylabel(f"x_t, y={int(gen.labels[i])}", fontsize=7)
        for r, (name, _) in enumerate(runs, start=1):
            axes[rows * i + r, 0].set_ylabel(f"|s·∇| {name}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_sweep_plot(path: str | os.PathLike, rows: Sequence[dict], metric_names: Sequence[str], title: str,
                    unguided: dict | None = None) -> None:  # fmt: skip
    """One panel per metric: the metric against each policy's swept strength, a line per policy, and the
    ``unguided`` run's value (the same model and sampler) as a dashed horizontal line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.4), squeeze=False)
    policies = sorted({r["policy"] for r in rows})
    for ax, metric in zip(axes[0], metric_names):
        for policy in policies:
            pts = sorted((r["strength"], r[metric]) for r in rows if r["policy"] == policy and r[metric] != "")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if unguided is not None and np.isfinite(unguided.get(metric, np.nan)):
            ax.axhline(unguided[metric], color="black", ls="--", lw=1, label="unguided")
        ax.set_xscale("log")
        ax.set_xlabel("strength (γ, s or C)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, y=1.04)
    _save(fig, Path(path))

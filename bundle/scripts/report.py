"""Reporting for the evaluation protocol: CSV of all rows, Markdown summary tables, per-setting figures."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.metrics import normalise

__all__ = ["ROW_FIELDS", "write_csv", "markdown_table", "plot_setting_figure"]

ROW_FIELDS = (
    "volume",
    "setting",
    "motion",
    "acceleration",
    "scale",
    "seed",
    "method",
    "psnr",
    "ssim",
    "psnr_head",
    "ssim_head",
    "seconds",
    "peak_rss_mb",
    "rss_increase_mb",
)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write every row (protocol order, :data:`ROW_FIELDS` first, any extra keys after) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(ROW_FIELDS) + [k for r in rows for k in r if k not in ROW_FIELDS]
    fields = list(dict.fromkeys(fields))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _mean_std(values: Sequence[float], fmt: str) -> str:
    """``mean ± std`` (sample std); the mean alone for a single value, where std is undefined."""
    vals = np.asarray(values, dtype=np.float64)
    if np.isinf(vals).any():
        return "inf" if np.isposinf(vals).all() else "n/a"
    if len(vals) < 2:
        return format(vals.mean(), fmt)
    return f"{format(vals.mean(), fmt)} ± {format(vals.std(ddof=1), fmt)}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: PSNR/SSIM mean ± std over volumes per (setting, method), then cost per method.

    Settings and methods keep the order in which they were run; ``n`` is the number of volumes.
    """
    if not rows:
        raise ValueError("no rows to summarise.")
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| setting | method | n | PSNR (dB) | SSIM | PSNR head (dB) | SSIM head |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in settings:
        for m in methods:
            sel = [r for r in rows if r["setting"] == s and r["method"] == m]
            if not sel:
                continue
            cells = [
                _mean_std([r[k] for r in sel], fmt)
                for k, fmt in (("psnr", ".2f"), ("ssim", ".4f"), ("psnr_head", ".2f"), ("ssim_head", ".4f"))
            ]
            lines.append(f"| {s} | {m} | {len(sel)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | runs | wall time per run (s) | peak RSS of the process (MiB, max) | RSS increase (MiB, max) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        seconds = _mean_std([r["seconds"] for r in sel], ".2f")
        peak = max(r["peak_rss_mb"] for r in sel)
        increase = max(r.get("rss_increase_mb", math.nan) for r in sel)
        lines.append(f"| {m} | {len(sel)} | {seconds} | {peak:.0f} | {increase:.0f} |")
    return "\n".join(lines) + "\n"


def plot_setting_figure(
    gt: torch.Tensor,
    degraded_on_grid: torch.Tensor,
    predictions: Mapping[str, torch.Tensor],
    path: str | Path,
    title: str = "",
    axial_index: int | None = None,
    coronal_index: int | None = None,
    error_vmax: float = 0.3,
) -> Path:
    """One PNG: ground truth, degraded input, each method and their absolute errors.

    Rows: axial slice, its absolute error, coronal slice, its absolute error (the coronal view
    shows the thick slices). All panels are on the ground-truth grid, normalised as the metrics
    are (:func:`scripts.metrics.normalise`), shown in RAS with right on the right, anterior and
    superior up, and with the voxel aspect ratio of ``gt`` when it is a MetaTensor.
    """
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    names = ["ground truth", "degraded (nearest)", *predictions]
    volumes = normalise(gt, degraded_on_grid, *predictions.values())
    gt_n = volumes[0][0].numpy()
    shape = gt_n.shape
    k = shape[2] // 2 if axial_index is None else int(axial_index)
    j = shape[1] // 2 if coronal_index is None else int(coronal_index)
    if not (0 <= k < shape[2] and 0 <= j < shape[1]):
        raise ValueError(f"slice indices (coronal {j}, axial {k}) outside the volume shape {shape}.")
    spacing = np.ones(3)
    affine = getattr(gt, "affine", None)
    if affine is not None:
        spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)

    ncol = len(names)
    fig = Figure(figsize=(2.4 * ncol + 1.0, 10.5), layout="constrained")
    axes = fig.subplots(4, ncol, squeeze=False)
    for c, (name, vol) in enumerate(zip(names, volumes, strict=True)):
        v = vol[0].numpy()
        err = np.abs(v - gt_n)
        views = (
            (v[:, :, k], err[:, :, k], spacing[1] / spacing[0], f"axial z={k}"),
            (v[:, j, :], err[:, j, :], spacing[2] / spacing[0], f"coronal y={j}"),
        )
        for r, (img, e, aspect, label) in enumerate(views):
            ax_img, ax_err = axes[2 * r, c], axes[2 * r + 1, c]
            ax_img.imshow(img.T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect)
            ax_img.set_title(f"{name}\n{label}" if r == 0 else label, fontsize=8)
            if c == 0:
                ax_err.text(0.5, 0.5, f"|error|\n0 to {error_vmax:g}", ha="center", va="center", fontsize=9)
                ax_err.set_frame_on(False)
            else:
                im = ax_err.imshow(e.T, cmap="magma", vmin=0, vmax=error_vmax, origin="lower", aspect=aspect)
                ax_err.set_title(f"slice MAE {float(e.mean()):.4f}", fontsize=7)
            for a in (ax_img, ax_err):
                a.set_xticks([])
                a.set_yticks([])
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.5, label="|error| (normalised)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

"""Image-quality metrics of the evaluation protocol: PSNR and 3D SSIM, whole volume and head mask.

Every method is scored the same way, against the ground truth on the ground-truth grid:

1. **One normalisation.** Both volumes are divided by the ground truth's 99.5th percentile (over
   all voxels) and clipped to ``[0, 1]``. The percentile, not the maximum, so that a few bright
   voxels (vessels, fat, noise spikes) do not compress the range; the clip, so that PSNR and SSIM
   see the same data range (1) for every volume and every method.
2. **PSNR** is MONAI's :class:`~monai.metrics.PSNRMetric` with ``max_val=1``.
3. **SSIM** is MONAI's 3D SSIM (:func:`~monai.metrics.regression.compute_ssim_and_cs`, the function
   behind :class:`~monai.metrics.SSIMMetric`) with MONAI's defaults: Gaussian window of 11 voxels,
   sigma 1.5, ``data_range=1``, ``k1=0.01``, ``k2=0.03``. The whole-volume value is the mean of the
   SSIM map, exactly what ``SSIMMetric`` returns.
4. **Head mask** (:func:`head_mask`): the region that matters, so that the large, easy background
   does not dominate the scores. PSNR inside the mask uses the masked voxels only; SSIM inside the
   mask averages the SSIM map over the mask, cropped like the map (the convolution is "valid", so
   map voxel ``i`` is the window centred on image voxel ``i + (win_size - 1) // 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms import FillHoles, GaussianSmooth
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import ensure_tuple_rep
from scipy import ndimage

__all__ = [
    "NORMALISATION_PERCENTILE",
    "HEAD_MASK_THRESHOLD",
    "HEAD_MASK_SIGMA",
    "normalise",
    "head_mask",
    "evaluate_reconstruction",
]

NORMALISATION_PERCENTILE = 99.5
HEAD_MASK_THRESHOLD = 0.1
HEAD_MASK_SIGMA = 2.0  # voxels
_AFFINE_ATOL = 1e-4  # mm; grids that differ by less are the same grid


def _as_volume(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Plain float32 ``(C, X, Y, Z)`` tensor, detached, after checking rank and finiteness."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if t.ndim != 4:
        raise ValueError(f"{name} must be a channel-first 3D volume (C, X, Y, Z), got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {n_bad} non-finite values (NaN or inf); expected finite intensities.")
    return t


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    """Same rank, shape and (for two MetaTensors) affine: the metrics compare voxel to voxel."""
    pred_t, gt_t = _as_volume(pred, "pred"), _as_volume(gt, "gt")
    if pred_t.shape != gt_t.shape:
        raise ValueError(
            f"pred and gt must be on the same grid: got shapes {tuple(pred_t.shape)} and "
            f"{tuple(gt_t.shape)}; resample the reconstruction onto the ground-truth grid first."
        )
    if isinstance(pred, MetaTensor) and isinstance(gt, MetaTensor):
        a_pred, a_gt = pred.affine.to(torch.float64), gt.affine.to(torch.float64)
        if not torch.allclose(a_pred, a_gt, atol=_AFFINE_ATOL):
            raise ValueError(
                "pred and gt have the same shape but different affines (different world grids):\n"
                f"pred.affine=\n{a_pred.numpy()}\ngt.affine=\n{a_gt.numpy()}"
            )


def normalise(gt: torch.Tensor, *others: torch.Tensor, q: float = NORMALISATION_PERCENTILE) -> tuple[torch.Tensor, ...]:
    """Divide ``gt`` and ``others`` by the ``q``-th percentile of ``gt`` and clip to ``[0, 1]``.

    The one normalisation of the protocol (module docstring). Returns ``(gt_n, *others_n)`` as
    plain float32 tensors. Raises ``ValueError`` when the percentile is not positive (an empty or
    negative ground truth has no meaningful scale).
    """
    gt_t = _as_volume(gt, "gt")
    ref = float(percentile(gt_t, q))
    if not ref > 0:
        raise ValueError(
            f"the ground truth's {q}th percentile is {ref}; expected a positive intensity scale "
            "(is the volume empty or all negative?)."
        )
    out = [(gt_t / ref).clamp_(0.0, 1.0)]
    for i, o in enumerate(others):
        out.append((_as_volume(o, f"volume {i}") / ref).clamp_(0.0, 1.0))
    return tuple(out)


def head_mask(gt: torch.Tensor, threshold: float = HEAD_MASK_THRESHOLD, sigma: float = HEAD_MASK_SIGMA) -> torch.Tensor:
    """Deterministic head mask of a ground-truth volume, boolean ``(1, X, Y, Z)``.

    Normalise ``gt`` (:func:`normalise`), average its channels, smooth with a Gaussian of
    ``sigma`` voxels (so background noise and thin dark gaps do not fragment the mask), keep
    voxels ``> threshold``, keep the largest 26-connected component (drops noise specks and
    detached objects) and fill enclosed holes (ventricles, sinuses) with MONAI's ``FillHoles``.

    The largest component uses ``scipy.ndimage.label``: MONAI's
    ``get_largest_connected_component_mask`` needs scikit-image, which is not a dependency here.
    """
    (gt_n,) = normalise(gt)
    smooth = GaussianSmooth(sigma=sigma)(gt_n.mean(dim=0, keepdim=True))
    fg = (torch.as_tensor(smooth) > threshold)[0].numpy()
    labels, n = ndimage.label(fg, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        raise ValueError(f"head mask is empty: no voxel of the smoothed, normalised ground truth exceeds {threshold}.")
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = labels == counts.argmax()
    filled = FillHoles(applied_labels=1)(largest[None].astype(np.uint8))
    return torch.as_tensor(np.asarray(filled) > 0)


def _valid_crop(mask: torch.Tensor, win_size: Sequence[int]) -> torch.Tensor:
    """Crop ``(C, X, Y, Z)`` like a valid convolution with ``win_size``: voxel i of the map is the
    window centred on voxel ``i + (w - 1) // 2`` of the image."""
    slices = [slice(None)]
    for n, w in zip(mask.shape[1:], win_size, strict=True):
        lo = (w - 1) // 2
        slices.append(slice(lo, n - (w - 1 - lo)))
    return mask[tuple(slices)]


def evaluate_reconstruction(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor | None = None,
    win_size: int | Sequence[int] = 11,
    kernel_sigma: float | Sequence[float] = 1.5,
) -> dict[str, float]:
    """Score ``pred`` against ``gt`` on the same grid; returns ``psnr``, ``ssim``, ``psnr_head``, ``ssim_head``.

    Args:
        pred: reconstruction, channel-first ``(C, X, Y, Z)`` tensor or MetaTensor.
        gt: ground truth with the same shape (and, for two MetaTensors, the same affine).
        mask: head mask, boolean, broadcastable to ``(1, X, Y, Z)``; computed with
            :func:`head_mask` when ``None``. Pass it in to score many predictions of one volume.
        win_size, kernel_sigma: SSIM Gaussian window (MONAI's defaults).

    PSNR is in dB with peak 1 after :func:`normalise`; ``inf`` when the volumes are identical.
    Raises ``ValueError`` for different shapes or affines, non-finite values, an empty mask or a
    volume smaller than the SSIM window.
    """
    _check_pair(pred, gt)
    gt_n, pred_n = normalise(gt, pred)
    spatial = tuple(gt_n.shape[1:])
    win = ensure_tuple_rep(win_size, 3)
    sig = ensure_tuple_rep(kernel_sigma, 3)
    if any(n < w for n, w in zip(spatial, win, strict=True)):
        raise ValueError(f"volume spatial shape {spatial} is smaller than the SSIM window {win}.")
    if mask is None:
        mask = head_mask(gt)
    mask = torch.as_tensor(mask).to(device="cpu", dtype=torch.bool)
    if mask.ndim == 3:
        mask = mask[None]
    if mask.shape[1:] != gt_n.shape[1:]:
        raise ValueError(f"mask spatial shape {tuple(mask.shape[1:])} differs from the volumes' {spatial}.")
    mask = mask.expand_as(gt_n)
    if not mask.any():
        raise ValueError("head mask is empty; expected at least one voxel inside the head.")

    psnr_metric = PSNRMetric(max_val=1.0)
    psnr = float(psnr_metric(pred_n[None], gt_n[None]).item())
    psnr_head = float(psnr_metric(pred_n[mask][None, None], gt_n[mask][None, None]).item())

    ssim_map, _ = compute_ssim_and_cs(
        pred_n[None], gt_n[None], spatial_dims=3, kernel_size=win, kernel_sigma=sig, data_range=1.0
    )
    ssim_map = ssim_map[0]
    mask_c = _valid_crop(mask, win)
    if not mask_c.any():
        raise ValueError("head mask has no voxel left after cropping the SSIM border; the mask is too small.")
    ssim = float(ssim_map.mean().item())
    ssim_head = float(ssim_map[mask_c].mean().item())
    return {"psnr": psnr, "ssim": ssim, "psnr_head": psnr_head, "ssim_head": ssim_head}

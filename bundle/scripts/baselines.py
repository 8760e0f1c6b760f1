"""Classical baselines: the zero-filled thick-slice magnitude interpolated onto the fine grid.

These are what any user tries first, so every learned method is reported against them on exactly
the same inputs. The degraded volume is the zero-filled reconstruction (inverse DFT of the
measured k-space, unmeasured lines left at zero) that ``SimulateAcquisition`` returns; its affine
places each thick slice at the world centre of the slab it averages. Interpolation goes through
world coordinates with MONAI's :class:`~monai.transforms.SpatialResample` (target affine + shape),
so nothing here assumes a particular slab geometry. When the in-plane grids coincide, as for the
simulated acquisitions, the target in-plane positions land on source voxel centres and the
resampling is interpolation along the slice axis only.

Outside the first and last thick-slice centres the value is clamped to the end slice
(``padding_mode="border"``; MONAI maps it to scipy's ``"nearest"`` on the spline path), which is
the honest extrapolation: nothing was measured there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

__all__ = ["resample_to_grid", "linear_baseline", "bspline_baseline", "nearest_on_grid"]


def resample_to_grid(
    image: MetaTensor,
    target_affine: torch.Tensor | np.ndarray,
    target_shape: Sequence[int],
    mode: str | int,
    padding_mode: str = "border",
) -> MetaTensor:
    """Resample a channel-first MetaTensor onto ``(target_affine, target_shape)`` through world coordinates.

    ``mode`` is a MONAI interpolation mode: ``"bilinear"`` (trilinear in 3D, torch backend),
    ``"nearest"``, or an integer spline order (scipy ``map_coordinates`` with prefiltering, so 3
    is the interpolating cubic B-spline). The result is float32 with ``affine == target_affine``.
    """
    if not isinstance(image, MetaTensor):
        raise TypeError(
            f"image must be a MetaTensor with its affine (got {type(image).__name__}); the baselines "
            "resample through world coordinates."
        )
    if image.ndim != 4:
        raise ValueError(f"image must be channel-first (C, X, Y, Z), got shape {tuple(image.shape)}.")
    target_affine = torch.as_tensor(np.asarray(target_affine), dtype=torch.float64)
    if target_affine.shape != (4, 4):
        raise ValueError(f"target_affine must be a 4x4 matrix, got shape {tuple(target_affine.shape)}.")
    target_shape = tuple(int(s) for s in target_shape)
    if len(target_shape) != 3 or min(target_shape) < 1:
        raise ValueError(f"target_shape must be three positive sizes (X, Y, Z), got {target_shape}.")
    out = SpatialResample(mode=mode, padding_mode=padding_mode, dtype=torch.float64)(
        image, dst_affine=target_affine, spatial_size=target_shape
    )
    return out


def linear_baseline(
    degraded: MetaTensor,
    acquisition: dict | None,
    target_affine: torch.Tensor | np.ndarray,
    target_shape: Sequence[int],
) -> MetaTensor:
    """Zero-filled + linear interpolation along the slice axis (registered as ``"linear"``)."""
    return resample_to_grid(degraded, target_affine, target_shape, mode="bilinear")


def bspline_baseline(
    degraded: MetaTensor,
    acquisition: dict | None,
    target_affine: torch.Tensor | np.ndarray,
    target_shape: Sequence[int],
) -> MetaTensor:
    """Zero-filled + cubic B-spline interpolation along the slice axis (registered as ``"bspline"``)."""
    return resample_to_grid(degraded, target_affine, target_shape, mode=3)


def nearest_on_grid(
    degraded: MetaTensor, target_affine: torch.Tensor | np.ndarray, target_shape: Sequence[int]
) -> MetaTensor:
    """The degraded input shown on the target grid as it was measured: nearest thick slice, for figures."""
    return resample_to_grid(degraded, target_affine, target_shape, mode="nearest")

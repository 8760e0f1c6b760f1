"""Input checks shared by the degradation transforms, so bad input fails early with a clear message."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

SPATIAL_AXES = (0, 1, 2)


def as_volume(img, name: str = "image") -> MetaTensor:
    """Return ``img`` as a floating-point channel-first 3D MetaTensor, or raise a clear ValueError.

    Never modifies ``img``: integer data is converted to float32 in a new tensor and a plain
    tensor or array gets an identity affine.
    """
    if isinstance(img, np.ndarray):
        img = torch.as_tensor(img)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, MetaTensor or numpy array, got {type(img).__name__}.")
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    if img.ndim != 4:
        raise ValueError(
            f"{name} must be a channel-first 3D volume of shape (C, X, Y, Z); got shape "
            f"{tuple(img.shape)} with {img.ndim} dimensions."
        )
    if min(img.shape) < 1:
        raise ValueError(f"{name} is empty: shape {tuple(img.shape)}.")
    if not torch.is_floating_point(img):
        img = img.to(torch.float32)
    non_finite = int((~torch.isfinite(img.as_tensor())).sum())
    if non_finite:
        raise ValueError(f"{name} contains {non_finite} non-finite values (NaN or Inf); expected finite intensities.")
    return img


def check_axis(axis, name: str = "slice_axis") -> int:
    """Validate a spatial axis index of a (C, X, Y, Z) volume (0, 1 or 2)."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or int(axis) not in SPATIAL_AXES:
        raise ValueError(f"{name} must be a spatial axis 0, 1 or 2 of a (C, X, Y, Z) volume; got {axis!r}.")
    return int(axis)


def in_plane_axes(slice_axis: int) -> tuple[int, int]:
    """The two spatial axes spanning a slice, in increasing order."""
    return tuple(a for a in SPATIAL_AXES if a != slice_axis)  # type: ignore[return-value]


def resolve_pe_axis(slice_axis: int, pe_axis) -> int:
    """The phase-encode axis: the given one, or by default the first in-plane axis."""
    slice_axis = check_axis(slice_axis)
    if pe_axis is None:
        return in_plane_axes(slice_axis)[0]
    pe_axis = check_axis(pe_axis, "pe_axis")
    if pe_axis == slice_axis:
        raise ValueError(f"pe_axis ({pe_axis}) must be an in-plane axis, not the slice axis ({slice_axis}).")
    return pe_axis


def voxel_spacing(img: MetaTensor) -> torch.Tensor:
    """Spacing (mm) of the three spatial axes, from the affine's column norms."""
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    return torch.linalg.norm(affine[:3, :3], dim=0)


def with_acquisition_meta(img: MetaTensor, **params) -> MetaTensor:
    """Record acquisition parameters in ``img.meta["acquisition"]`` without touching other copies."""
    acquisition = dict(img.meta.get("acquisition", {}))
    acquisition.update(params)
    img.meta["acquisition"] = acquisition
    return img

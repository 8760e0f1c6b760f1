"""Thick-slice 2D multi-slice acquisition simulated from a finer volume.

Slab ``k`` covers the fine-voxel interval ``[k * scale - 0.5, (k + 1) * scale - 0.5]`` (in fine
voxel-index units, voxel ``i`` spanning ``[i - 0.5, i + 0.5]``), so slabs are contiguous with no
gap and ``floor(n / scale)`` whole slabs fit. The thick slice is the slab's profile-weighted
average and sits at the slab centre ``(k + 0.5) * scale - 0.5``; the output affine encodes exactly
that, so resampling the thick volume into the fine grid puts every slab back where it was.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from .validation import as_volume, check_axis, with_acquisition_meta

PROFILES = ("boxcar", "gaussian")


def check_scale(scale) -> float:
    """Slice spacing as a multiple of the input spacing; must be a finite number >= 1."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number >= 1, got {scale!r}.") from None
    if not math.isfinite(scale) or scale < 1.0:
        raise ValueError(f"scale must be >= 1 (slice spacing as a multiple of the input spacing), got {scale}.")
    return scale


def slab_weights(n_fine: int, scale: float, profile: str = "boxcar") -> torch.Tensor:
    """Weights ``(n_thick, n_fine)`` mapping fine voxels to thick slices; each row sums to 1.

    ``boxcar`` weights every fine voxel by its overlap with the slab (exact for fractional
    scales); ``gaussian`` uses a Gaussian slice profile whose FWHM equals the slice thickness,
    integrated over each fine voxel.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}.")
    n_thick = math.floor(n_fine / scale + 1e-9)
    if n_thick < 1:
        raise ValueError(
            f"the slice axis has {n_fine} voxels, fewer than one slab of thickness scale={scale}; "
            "expected at least `scale` voxels along the slice axis."
        )
    if profile == "boxcar":
        return boxcar_slab_weights(n_thick, n_fine, scale)
    k = torch.arange(n_thick, dtype=torch.float64)[:, None]
    i = torch.arange(n_fine, dtype=torch.float64)[None, :]
    centre = (k + 0.5) * scale - 0.5
    sigma = scale / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    cdf = lambda x: 0.5 * (1.0 + torch.erf(x / (sigma * math.sqrt(2.0))))  # noqa: E731
    weights = cdf(i + 0.5 - centre) - cdf(i - 0.5 - centre)
    return weights / weights.sum(dim=1, keepdim=True)


def boxcar_slab_weights(n_thick: int, n_fine: int, scale: float) -> torch.Tensor:
    """Boxcar weights ``(n_thick, n_fine)``: each fine voxel's overlap with slab ``k`` (``[k, k + 1) * scale``).

    Rows sum to 1. TorchScript-compatible: stage 3's slab consistency in the exported pipeline uses it.
    """
    k = torch.arange(n_thick, dtype=torch.float64)[:, None]
    i = torch.arange(n_fine, dtype=torch.float64)[None, :]
    lo, hi = k * scale - 0.5, (k + 1) * scale - 0.5
    weights = (torch.minimum(hi, i + 0.5) - torch.maximum(lo, i - 0.5)).clamp(min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def thick_slice_affine(affine: torch.Tensor, slice_axis: int, scale: float) -> torch.Tensor:
    """Affine of the thick-slice grid: thick index ``t`` is fine index ``t * scale + (scale - 1) / 2``."""
    index_map = torch.eye(4, dtype=torch.float64)
    index_map[slice_axis, slice_axis] = scale
    index_map[slice_axis, 3] = (scale - 1.0) / 2.0
    return torch.as_tensor(affine, dtype=torch.float64) @ index_map


class ThickSliceAcquisition(Transform):
    """Simulate a 2D multi-slice acquisition with slices ``scale`` times thicker than the input.

    Args:
        scale: slice spacing (= thickness) as a multiple of the input spacing along ``slice_axis``;
            any float >= 1.
        slice_axis: spatial axis (0, 1 or 2) of the channel-first ``(C, X, Y, Z)`` input.
        profile: slice profile, ``"boxcar"`` (default) or ``"gaussian"`` (FWHM = thickness).

    The output is a MetaTensor with ``floor(n / scale)`` slices, the input's metadata and an
    affine placing each slice at its slab centre; ``meta["acquisition"]`` records the parameters.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, scale: float, slice_axis: int = 2, profile: str = "boxcar") -> None:
        self.scale = check_scale(scale)
        self.slice_axis = check_axis(slice_axis)
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}.")
        self.profile = profile

    def __call__(self, img) -> MetaTensor:
        img = as_volume(img)
        axis = self.slice_axis + 1  # channel first
        weights = slab_weights(img.shape[axis], self.scale, self.profile).to(img.device, img.dtype)
        data = torch.movedim(img.as_tensor(), axis, -1) @ weights.T
        data = torch.movedim(data, -1, axis).contiguous()
        affine = thick_slice_affine(img.affine, self.slice_axis, self.scale)
        out = MetaTensor(data, meta=dict(img.meta))
        out.affine = affine
        return with_acquisition_meta(out, scale=self.scale, slice_axis=self.slice_axis, slice_profile=self.profile)


class ThickSliceAcquisitiond(MapTransform):
    """Dictionary version of :class:`ThickSliceAcquisition`."""

    backend = ThickSliceAcquisition.backend

    def __init__(
        self,
        keys: KeysCollection,
        scale: float,
        slice_axis: int = 2,
        profile: str = "boxcar",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ThickSliceAcquisition(scale, slice_axis, profile)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d

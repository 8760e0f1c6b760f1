"""Cartesian undersampling of each slice's k-space along the phase-encode axis.

The line pattern comes from MONAI's fastMRI masks (:class:`monai.apps.reconstruction.transforms.
array.RandomKspaceMask` and ``EquispacedKspaceMask``): a fully sampled centre of
``center_fraction`` of the lines plus random or equispaced lines up to ``1 / acceleration`` of
them. The default centre fraction is ``0.32 / acceleration`` (fastMRI: 8% at R=4, 4% at R=8).
One mask is drawn per volume and shared by all slices, as one phase-encode table is for a real
2D multi-slice series.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends

from ..kspace import fft2c, ifft2c
from .base import DelegatingRandomizabled
from .motion import KSPACE_POSTFIX
from .validation import as_volume, check_axis, in_plane_axes, resolve_pe_axis, with_acquisition_meta

PATTERNS = {"random": RandomKspaceMask, "equispaced": EquispacedKspaceMask}
MASK_POSTFIX = "mask"


def check_acceleration(acceleration) -> float:
    acceleration = float(acceleration)
    if not math.isfinite(acceleration) or acceleration < 1.0:
        raise ValueError(f"acceleration must be a number >= 1 (1 = fully sampled), got {acceleration}.")
    return acceleration


def default_center_fraction(acceleration: float) -> float:
    """fastMRI's pairing of acceleration and fully sampled centre: 0.08 at R=4, 0.04 at R=8."""
    return min(1.0, 0.32 / acceleration)


class KspaceUndersampling(Randomizable, Transform):
    """Undersample every slice's k-space along the phase-encode axis and return the zero-filled magnitude.

    Args:
        acceleration: undersampling factor R (1 keeps every line).
        center_fraction: fully sampled fraction of central lines; default ``0.32 / R``.
        pattern: ``"random"`` or ``"equispaced"`` (MONAI's fastMRI masks).
        slice_axis: spatial axis along which slices are stacked.
        pe_axis: in-plane phase-encode axis; default the first in-plane axis.

    ``__call__(img, kspace=None)`` samples ``kspace`` when given (for example the composite
    k-space of :class:`KspaceMotion`, which keeps its phase) or else the k-space of ``img``.
    After a call, ``self.kspace`` holds the measured (masked) complex k-space and ``self.mask``
    the boolean mask (module convention of :mod:`scripts.kspace`).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        acceleration: float = 4.0,
        center_fraction: float | None = None,
        pattern: str = "random",
        slice_axis: int = 2,
        pe_axis: int | None = None,
    ) -> None:
        self.acceleration = check_acceleration(acceleration)
        self.center_fraction = (
            default_center_fraction(self.acceleration) if center_fraction is None else float(center_fraction)
        )
        if not 0.0 < self.center_fraction <= 1.0:
            raise ValueError(f"center_fraction must be in (0, 1], got {center_fraction}.")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {tuple(PATTERNS)}, got {pattern!r}.")
        self.pattern = pattern
        self.slice_axis = check_axis(slice_axis)
        self.pe_axis = resolve_pe_axis(self.slice_axis, pe_axis)
        self._mask_maker = PATTERNS[pattern]([self.center_fraction], [self.acceleration], spatial_dims=1)
        self._lines: np.ndarray | None = None
        self.kspace: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def randomize(self, num_lines: int) -> None:
        """Draw the 1D line mask for ``num_lines`` phase-encode lines."""
        if self.acceleration == 1.0:
            self._lines = np.ones(num_lines, dtype=bool)
            return
        self._mask_maker.set_random_state(state=self.R)  # draw from this transform's stream
        self._mask_maker(torch.zeros(1, num_lines, 2))  # MONAI draws the mask on a dummy k-space
        self._lines = self._mask_maker.mask.reshape(-1).numpy() > 0

    def __call__(self, img, kspace: torch.Tensor | None = None, randomize: bool = True) -> MetaTensor:
        img = as_volume(img)
        plane_dims = tuple(a + 1 for a in in_plane_axes(self.slice_axis))
        pe_dim = self.pe_axis + 1
        if kspace is None:
            kspace = fft2c(img.as_tensor(), plane_dims)
        elif tuple(kspace.shape) != tuple(img.shape) or not torch.is_complex(kspace):
            raise ValueError(
                f"kspace must be a complex tensor of the image's shape {tuple(img.shape)}, "
                f"got {'complex' if torch.is_complex(kspace) else kspace.dtype} of shape {tuple(kspace.shape)}."
            )
        if randomize:
            self.randomize(img.shape[pe_dim])
        if self._lines is None or self._lines.shape[0] != img.shape[pe_dim]:
            raise RuntimeError("KspaceUndersampling: call randomize(num_lines) for this volume before randomize=False.")
        mask_shape = [1] * img.ndim
        mask_shape[pe_dim] = img.shape[pe_dim]
        self.mask = torch.as_tensor(self._lines, device=img.device).reshape(mask_shape)
        self.kspace = torch.where(self.mask, kspace, torch.zeros((), dtype=kspace.dtype, device=kspace.device))
        zero_filled = ifft2c(self.kspace, plane_dims).abs().to(img.dtype)
        out = MetaTensor(zero_filled, meta=dict(img.meta))
        out.affine = img.affine
        return with_acquisition_meta(
            out,
            slice_axis=self.slice_axis,
            pe_axis=self.pe_axis,
            acceleration=self.acceleration,
            center_fraction=self.center_fraction if self.acceleration > 1 else 1.0,
            sampling_pattern=self.pattern,
            realised_acceleration=float(self._lines.size / self._lines.sum()),
        )


class KspaceUndersamplingd(DelegatingRandomizabled):
    """Dictionary version of :class:`KspaceUndersampling`.

    Samples ``{key}_kspace`` when present (as written by :class:`KspaceMotiond`), else the image's
    own k-space; writes the measured k-space back to ``{key}_kspace`` and the mask to
    ``{key}_mask``. All keys share one mask per call.
    """

    backend = KspaceUndersampling.backend

    def __init__(
        self,
        keys: KeysCollection,
        acceleration: float = 4.0,
        center_fraction: float | None = None,
        pattern: str = "random",
        slice_axis: int = 2,
        pe_axis: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = KspaceUndersampling(acceleration, center_fraction, pattern, slice_axis, pe_axis)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            img = as_volume(d[key], str(key))
            if first:
                self.randomize(img.shape[self.transform.pe_axis + 1])
                first = False
            d[key] = self.transform(img, kspace=d.get(f"{key}_{KSPACE_POSTFIX}"), randomize=False)
            d[f"{key}_{KSPACE_POSTFIX}"] = self.transform.kspace
            d[f"{key}_{MASK_POSTFIX}"] = self.transform.mask
        return d

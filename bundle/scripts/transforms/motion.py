"""Rigid patient motion during the k-space acquisition of each 2D slice, and between slices.

Every slice's phase-encode lines are acquired in ``num_segments`` segments (``sequential``:
contiguous blocks of k-space; ``interleaved``: every ``num_segments``-th line). During each
segment the slice sits under its own in-plane rigid transform (rotation about the field-of-view
centre, then translation); the k-space lines of a segment come from the slice in that pose, and
the composite k-space gives the corrupted slice (ghosting and blurring). The segment that
acquires the centre of k-space is the slice's reference pose, so the slice appears where the
patient was at that moment.

Severity ``s`` is the maximum displacement as a fraction of the field of view (FOV): each
translation component is at most ``s * FOV`` along its axis, and a rotation is at most the
angle that moves no point of the FOV (its corners) further than ``s * min(FOV)``. Poses are drawn
uniformly within those bounds. ``inter_slice`` is a separate severity, with the same bounds, for
the reference pose of every slice (rigid misalignment between slices; 0 keeps them aligned).
Both at 0 return the input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends

from ..kspace import fft2c, ifft2c
from .base import DelegatingRandomizabled
from .validation import as_volume, check_axis, in_plane_axes, resolve_pe_axis, voxel_spacing, with_acquisition_meta

ORDERINGS = ("sequential", "interleaved")
KSPACE_POSTFIX = "kspace"


def check_severity(severity, name: str = "motion severity") -> float:
    severity = float(severity)
    if not math.isfinite(severity) or not 0.0 <= severity <= 0.5:
        raise ValueError(f"{name} must be a fraction of the field of view in [0, 0.5], got {severity}.")
    return severity


def segment_lines(num_lines: int, num_segments: int, ordering: str) -> list[np.ndarray]:
    """Indices of the phase-encode lines (k-space order) acquired in each segment."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}.")
    if not 1 <= num_segments <= num_lines:
        raise ValueError(f"num_segments must be between 1 and the {num_lines} phase-encode lines, got {num_segments}.")
    lines = np.arange(num_lines)
    if ordering == "sequential":
        return np.array_split(lines, num_segments)
    return [lines[j::num_segments] for j in range(num_segments)]


def rigid_resample(slices: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
    """Move each 2D slice by a rigid transform in physical units.

    ``slices`` is ``(N, A, B)``; ``angle`` (radians) is ``(N,)``; ``shift`` (mm along A, B) and
    ``fov`` (mm) are ``(N, 2)`` and ``(2,)``. The moved image is ``I(R^-1 (p - t))`` with ``p``
    measured from the FOV centre; bicubic interpolation, zero outside the FOV.
    """
    n, size_a, size_b = slices.shape
    dtype, device = slices.dtype, slices.device
    half_fov = (fov / 2).to(device, dtype)
    # pixel centres in normalised [-1, 1] coordinates (align_corners=False), then in mm
    norm_a = (2 * torch.arange(size_a, device=device, dtype=dtype) + 1) / size_a - 1
    norm_b = (2 * torch.arange(size_b, device=device, dtype=dtype) + 1) / size_b - 1
    grid_a, grid_b = torch.meshgrid(norm_a * half_fov[0], norm_b * half_fov[1], indexing="ij")
    cos, sin = torch.cos(angle).to(dtype)[:, None, None], torch.sin(angle).to(dtype)[:, None, None]
    rel_a = grid_a[None] - shift[:, 0, None, None].to(dtype)
    rel_b = grid_b[None] - shift[:, 1, None, None].to(dtype)
    src_a = (cos * rel_a + sin * rel_b) / half_fov[0]  # R^-1 applied, back to normalised units
    src_b = (-sin * rel_a + cos * rel_b) / half_fov[1]
    grid = torch.stack((src_b, src_a), dim=-1)  # grid_sample wants (x=B, y=A)
    moved = F.grid_sample(slices[:, None], grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return moved[:, 0]


def max_rotation(fov: torch.Tensor, severity: float) -> float:
    """Largest rotation (radians) that moves no FOV corner further than ``severity * min(FOV)``."""
    half_diagonal = float(torch.linalg.norm(fov / 2))
    ratio = min(1.0, severity * float(fov.min()) / (2 * half_diagonal))
    return 2 * math.asin(ratio)


class KspaceMotion(Randomizable, Transform):
    """Corrupt each 2D slice of a multi-slice volume by rigid motion between k-space segments.

    Args:
        severity: maximum displacement as a fraction of the field of view (0.03 = 3%).
        slice_axis: the spatial axis (0, 1, 2) along which the slices are stacked.
        pe_axis: the in-plane phase-encode axis; default the first in-plane axis.
        num_segments: number of k-space segments (shots) per slice, each with its own pose.
        ordering: ``"sequential"`` (contiguous blocks of lines) or ``"interleaved"``.
        inter_slice: severity of the misalignment between slices (fraction of the FOV).

    Returns the magnitude of the corrupted slices as a MetaTensor with the input's geometry.
    After a call, ``self.kspace`` holds the composite complex k-space (module convention of
    :mod:`scripts.kspace`), which :class:`KspaceUndersampling` can sample without losing phase.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        severity: float,
        slice_axis: int = 2,
        pe_axis: int | None = None,
        num_segments: int = 8,
        ordering: str = "sequential",
        inter_slice: float = 0.0,
    ) -> None:
        self.severity = check_severity(severity)
        self.inter_slice = check_severity(inter_slice, "inter_slice severity")
        self.slice_axis = check_axis(slice_axis)
        self.pe_axis = resolve_pe_axis(self.slice_axis, pe_axis)
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}.")
        if int(num_segments) < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}.")
        self.num_segments = int(num_segments)
        self.ordering = ordering
        self.kspace: torch.Tensor | None = None
        self._segment_poses: np.ndarray | None = None
        self._slice_poses: np.ndarray | None = None

    def randomize(self, num_slices: int) -> None:
        """Draw unit poses in [-1, 1] (rotation, shift A, shift B) per segment and per slice."""
        self._segment_poses = self.R.uniform(-1.0, 1.0, size=(num_slices, self.num_segments, 3))
        self._slice_poses = self.R.uniform(-1.0, 1.0, size=(num_slices, 3))

    def __call__(self, img, randomize: bool = True) -> MetaTensor:
        img = as_volume(img)
        slice_dim = self.slice_axis + 1
        plane_dims = tuple(a + 1 for a in in_plane_axes(self.slice_axis))
        num_slices = img.shape[slice_dim]
        if randomize:
            self.randomize(num_slices)
        if self._segment_poses is None or self._segment_poses.shape[0] != num_slices:
            raise RuntimeError("KspaceMotion: call randomize(num_slices) for this volume before randomize=False.")
        if self.severity == 0.0 and self.inter_slice == 0.0:
            self.kspace = fft2c(img.as_tensor(), plane_dims)
            return with_acquisition_meta(img.clone(), **self._meta())

        # (C, S, A, B): slices first after the channel, in-plane axes in increasing order
        slices = torch.movedim(img.as_tensor(), slice_dim, 1)
        channels, _, size_a, size_b = slices.shape
        spacing = voxel_spacing(img)[list(in_plane_axes(self.slice_axis))]
        fov = spacing * torch.tensor([size_a, size_b], dtype=torch.float64)
        pe_dim = 2 if self.pe_axis == in_plane_axes(self.slice_axis)[0] else 3
        lines = segment_lines(slices.shape[pe_dim], self.num_segments, self.ordering)

        angles, shifts = self._segment_motion(lines, fov)
        flat = slices.reshape(channels * num_slices, size_a, size_b)
        complex_dtype = torch.complex128 if flat.dtype == torch.float64 else torch.complex64
        kspace = torch.empty(slices.shape, dtype=complex_dtype, device=flat.device)
        for segment, segment_lines_idx in enumerate(lines):
            angle = angles[:, segment].repeat(channels)
            shift = shifts[:, segment].repeat(channels, 1)
            moved = rigid_resample(flat, angle.to(flat.device), shift.to(flat.device), fov)
            segment_kspace = fft2c(moved.reshape(slices.shape), (2, 3))
            index = torch.as_tensor(segment_lines_idx, device=flat.device)
            kspace.index_copy_(pe_dim, index, segment_kspace.index_select(pe_dim, index))
        corrupted = ifft2c(kspace, (2, 3)).abs().to(img.dtype)
        self.kspace = torch.movedim(kspace, 1, slice_dim).contiguous()
        out = MetaTensor(torch.movedim(corrupted, 1, slice_dim).contiguous(), meta=dict(img.meta))
        out.affine = img.affine
        return with_acquisition_meta(out, **self._meta())

    def _segment_motion(self, lines: list[np.ndarray], fov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles ``(S, J)`` and shifts ``(S, J, 2)`` in mm of every slice and segment.

        The segment holding the k-space centre takes the slice's reference pose; the others are
        that pose composed with their own: ``p -> R_s (R_j p + t_j) + t_s``.
        """
        num_lines = sum(len(segment) for segment in lines)
        centre_segment = next(j for j, segment in enumerate(lines) if num_lines // 2 in segment)
        segment_poses = torch.as_tensor(self._segment_poses, dtype=torch.float64).clone()
        segment_poses[:, centre_segment] = 0.0
        slice_poses = torch.as_tensor(self._slice_poses, dtype=torch.float64)
        segment_angle = segment_poses[..., 0] * max_rotation(fov, self.severity)
        segment_shift = segment_poses[..., 1:] * (self.severity * fov)
        slice_angle = slice_poses[:, 0:1] * max_rotation(fov, self.inter_slice)
        slice_shift = slice_poses[:, None, 1:] * (self.inter_slice * fov)
        cos, sin = torch.cos(slice_angle), torch.sin(slice_angle)
        rotated_shift = torch.stack(
            (
                cos * segment_shift[..., 0] - sin * segment_shift[..., 1],
                sin * segment_shift[..., 0] + cos * segment_shift[..., 1],
            ),
            dim=-1,
        )
        return slice_angle + segment_angle, rotated_shift + slice_shift

    def _meta(self) -> dict:
        return {
            "slice_axis": self.slice_axis,
            "pe_axis": self.pe_axis,
            "motion": self.severity,
            "inter_slice_motion": self.inter_slice,
            "motion_segments": self.num_segments,
            "motion_ordering": self.ordering,
        }


class KspaceMotiond(DelegatingRandomizabled):
    """Dictionary version of :class:`KspaceMotion`; the composite k-space goes to ``{key}_kspace``.

    All keys see the same motion (one draw per call).
    """

    backend = KspaceMotion.backend

    def __init__(
        self,
        keys: KeysCollection,
        severity: float,
        slice_axis: int = 2,
        pe_axis: int | None = None,
        num_segments: int = 8,
        ordering: str = "sequential",
        inter_slice: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = KspaceMotion(severity, slice_axis, pe_axis, num_segments, ordering, inter_slice)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            img = as_volume(d[key], str(key))
            if first:
                self.randomize(img.shape[self.transform.slice_axis + 1])
                first = False
            d[key] = self.transform(img, randomize=False)
            d[f"{key}_{KSPACE_POSTFIX}"] = self.transform.kspace
        return d

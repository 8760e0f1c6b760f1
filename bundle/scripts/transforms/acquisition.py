"""The whole simulated acquisition in its physical order: thick slices, per-slice k-space motion, undersampling.

:class:`SimulateAcquisition` is the deterministic preset used by the evaluation protocol (the
same input and seed always give the same degraded volume); :class:`RandSimulateAcquisition`
draws the severity for training (motion 0-6%, R in {1, 2, 4, 8}, scale 2-8 by default).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends

from ..flags import as_bool
from .base import DelegatingRandomizabled
from .motion import KSPACE_POSTFIX, ORDERINGS, KspaceMotion, check_severity
from .thick_slice import PROFILES, ThickSliceAcquisition, check_scale
from .undersampling import MASK_POSTFIX, PATTERNS, KspaceUndersampling, check_acceleration
from .validation import check_axis, in_plane_axes, resolve_pe_axis

THICK_POSTFIX = "thick"


@dataclass(frozen=True)
class AcquisitionParameters:
    """Everything that defines one simulated 2D multi-slice acquisition."""

    scale: float = 5.0
    motion: float = 0.0
    acceleration: float = 1.0
    slice_axis: int = 2
    pe_axis: int | None = None
    profile: str = "boxcar"
    num_segments: int = 8
    ordering: str = "sequential"
    inter_slice: float = 0.0
    pattern: str = "random"
    center_fraction: float | None = None

    def __post_init__(self) -> None:
        check_scale(self.scale)
        check_severity(self.motion)
        check_severity(self.inter_slice, "inter_slice severity")
        check_acceleration(self.acceleration)
        resolve_pe_axis(check_axis(self.slice_axis), self.pe_axis)
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}.")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {self.ordering!r}.")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {tuple(PATTERNS)}, got {self.pattern!r}.")


def simulate_acquisition(
    img, params: AcquisitionParameters, rng: np.random.RandomState
) -> tuple[MetaTensor, torch.Tensor, torch.Tensor, MetaTensor]:
    """Degrade ``img``; return the zero-filled magnitude, the measured k-space, the mask and the clean thick slices.

    The clean thick slices (no motion, fully sampled) are the natural target of in-plane restoration.
    """
    thick = ThickSliceAcquisition(params.scale, params.slice_axis, params.profile)(img)
    motion = KspaceMotion(
        params.motion, params.slice_axis, params.pe_axis, params.num_segments, params.ordering, params.inter_slice
    )
    moved = motion.set_random_state(state=rng)(thick)
    undersampling = KspaceUndersampling(
        params.acceleration, params.center_fraction, params.pattern, params.slice_axis, params.pe_axis
    )
    degraded = undersampling.set_random_state(state=rng)(moved, kspace=motion.kspace)
    return degraded, undersampling.kspace, undersampling.mask, thick


class SimulateAcquisition(Transform):
    """Deterministic acquisition preset: the same input always gives the same degraded volume.

    Args: those of :class:`AcquisitionParameters` (``scale``, ``motion`` severity as a fraction of
    the field of view, ``acceleration`` R, ``slice_axis``, ``pe_axis``, slice ``profile``,
    ``num_segments``, segment ``ordering``, ``inter_slice`` misalignment severity, mask ``pattern``,
    ``center_fraction``) and ``seed``, from which the motion and the mask are drawn afresh on every call.

    After a call, ``self.kspace``, ``self.mask`` and ``self.thick`` hold the measured k-space, the
    mask and the clean thick-slice volume, and the output's ``meta["acquisition"]`` records every parameter.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, seed: int = 0, **params) -> None:
        self.params = AcquisitionParameters(**params)
        self.seed = int(seed)
        self.kspace: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.thick: MetaTensor | None = None

    def __call__(self, img) -> MetaTensor:
        rng = np.random.RandomState(self.seed)
        out, self.kspace, self.mask, self.thick = simulate_acquisition(img, self.params, rng)
        return out


class RandSimulateAcquisition(Randomizable, Transform):
    """Acquisition with random severity for training.

    Args:
        scale_range: slice spacing multiple drawn uniformly from this range.
        motion_range: motion severity (fraction of the FOV) drawn uniformly from this range.
        accelerations: acceleration drawn uniformly from these values.
        still_prob: probability of no motion at all. A uniform draw from ``motion_range`` almost
            never gives exactly 0, yet a still patient is the common case, and a network that never
            sees one learns to alter clean slices.
        clean_prob: probability of a fully clean acquisition (no motion, R = 1), whose slices the
            networks take as measurements; stage 3 is then the only stage at work, and its
            training needs a good share of them.
        random_pe_axis: draw the phase-encode axis from the two in-plane axes (``pe_axis`` of
            ``params`` is then ignored). Scanners encode either way, so motion ghosts and aliasing
            can run along either axis of a slice; a network that only ever sees one loses much of
            its gain on the other.
        params: the fixed :class:`AcquisitionParameters` (slice axis, profile, segments, ...).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        scale_range: Sequence[float] = (2.0, 8.0),
        motion_range: Sequence[float] = (0.0, 0.06),
        accelerations: Sequence[float] = (1, 2, 4, 8),
        still_prob: float = 0.0,
        clean_prob: float = 0.0,
        random_pe_axis: bool = False,
        **params,
    ) -> None:
        for name, prob in (("still_prob", still_prob), ("clean_prob", clean_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {prob}.")
        self.still_prob = float(still_prob)
        self.clean_prob = float(clean_prob)
        self.random_pe_axis = as_bool(random_pe_axis, "random_pe_axis")  # the bundle CLI passes 'false' as a string
        self.scale_range = tuple(check_scale(s) for s in scale_range)
        self.motion_range = tuple(check_severity(m, "motion_range") for m in motion_range)
        self.accelerations = tuple(check_acceleration(a) for a in accelerations)
        if len(self.scale_range) != 2 or len(self.motion_range) != 2 or not self.accelerations:
            raise ValueError("scale_range and motion_range must be (low, high) pairs and accelerations non-empty.")
        self.base = AcquisitionParameters(**params)
        self.params = self.base
        self.kspace: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.thick: MetaTensor | None = None

    def randomize(self, data=None) -> None:
        self.params = replace(
            self.base,
            scale=float(self.R.uniform(*self.scale_range)),
            motion=float(self.R.uniform(*self.motion_range)),
            acceleration=float(self.accelerations[self.R.randint(len(self.accelerations))]),
        )
        # drawn only when enabled, so that configs without it keep their random stream
        if self.still_prob > 0 and self.R.random_sample() < self.still_prob:
            self.params = replace(self.params, motion=0.0)
        if self.clean_prob > 0 and self.R.random_sample() < self.clean_prob:
            self.params = replace(self.params, motion=0.0, acceleration=1.0)
        if self.random_pe_axis:
            self.params = replace(self.params, pe_axis=in_plane_axes(self.base.slice_axis)[self.R.randint(2)])

    def __call__(self, img, randomize: bool = True) -> MetaTensor:
        if randomize:
            self.randomize()
        out, self.kspace, self.mask, self.thick = simulate_acquisition(img, self.params, self.R)
        return out


def _store_acquisition(d: dict, key: Hashable, transform, keep_thick: bool) -> None:
    d[f"{key}_{KSPACE_POSTFIX}"] = transform.kspace
    # the array form keeps the mask broadcastable (singleton read-out axis); a sample is stored with
    # the k-space's shape, so that samples phase-encoded along different axes collate into a batch
    d[f"{key}_{MASK_POSTFIX}"] = transform.mask.expand(transform.kspace.shape)
    if keep_thick:
        d[f"{key}_{THICK_POSTFIX}"] = transform.thick


class SimulateAcquisitiond(MapTransform):
    """Dictionary version of :class:`SimulateAcquisition`; adds ``{key}_kspace`` and ``{key}_mask``.

    With ``keep_thick``, also ``{key}_thick``: the clean thick slices (training target of stages 1-2).
    """

    backend = SimulateAcquisition.backend

    def __init__(
        self,
        keys: KeysCollection,
        seed: int = 0,
        keep_thick: bool = False,
        allow_missing_keys: bool = False,
        **params,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SimulateAcquisition(seed=seed, **params)
        self.keep_thick = keep_thick

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
            _store_acquisition(d, key, self.transform, self.keep_thick)
        return d


class RandSimulateAcquisitiond(DelegatingRandomizabled):
    """Dictionary version of :class:`RandSimulateAcquisition`; all keys share one draw per call.

    Adds ``{key}_kspace``, ``{key}_mask`` and, with ``keep_thick``, ``{key}_thick`` (clean thick slices).
    """

    backend = RandSimulateAcquisition.backend

    def __init__(
        self,
        keys: KeysCollection,
        scale_range: Sequence[float] = (2.0, 8.0),
        motion_range: Sequence[float] = (0.0, 0.06),
        accelerations: Sequence[float] = (1, 2, 4, 8),
        still_prob: float = 0.0,
        clean_prob: float = 0.0,
        random_pe_axis: bool = False,
        keep_thick: bool = False,
        allow_missing_keys: bool = False,
        **params,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = RandSimulateAcquisition(
            scale_range, motion_range, accelerations, still_prob, clean_prob, random_pe_axis, **params
        )
        self.keep_thick = keep_thick

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        self.randomize()
        d = dict(data)
        state = self.transform.R.get_state()
        for key in self.key_iterator(d):
            self.transform.R.set_state(state)  # every key sees the same motion and mask
            d[key] = self.transform(d[key], randomize=False)
            _store_acquisition(d, key, self.transform, self.keep_thick)
        return d

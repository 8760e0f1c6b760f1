"""Checks that a DICOM series is one evenly spaced stack of parallel slices before it is loaded.

DICOM readers build a volume's affine from the first slice's position and one slice step (ITK/GDCM
and MONAI's readers; the Deploy SDK from the first and last positions). A series with a missing,
duplicated or unevenly placed slice, or a folder mixing two series, still loads, with every slice
after the gap silently misplaced. Reconstruction across thick slices would then blend the wrong
anatomy, so such input is refused here, before any work, with what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

# DICOM stores positions as decimal strings (at most 16 characters); steps agreeing to 1% (and to
# 0.01 mm) are one spacing.
RELATIVE_STEP_TOLERANCE = 0.01
ABSOLUTE_STEP_TOLERANCE_MM = 0.01


def _vector(dataset: pydicom.Dataset, keyword: str, length: int, source: str) -> np.ndarray:
    value = getattr(dataset, keyword, None)
    if value is None or len(value) != length:
        raise ValueError(f"'{source}': a slice has no valid {keyword}; expected {length} numbers in every image.")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def slice_positions(datasets: Sequence[pydicom.Dataset], source: str) -> np.ndarray:
    """Each slice's position (mm) along the normal of the first slice's plane, in the given order.

    Raises ValueError when the slices are not parallel (ImageOrientationPatient differs).
    """
    if not datasets:
        raise ValueError(f"'{source}' holds no DICOM images.")
    orientation = _vector(datasets[0], "ImageOrientationPatient", 6, source)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = []
    for dataset in datasets:
        if not np.allclose(_vector(dataset, "ImageOrientationPatient", 6, source), orientation, atol=1e-4):
            raise ValueError(
                f"'{source}': the slices are not parallel (ImageOrientationPatient differs between images); "
                "expected one stack of parallel slices."
            )
        positions.append(float(_vector(dataset, "ImagePositionPatient", 3, source) @ normal))
    return np.asarray(positions)


def check_even_spacing(positions: Sequence[float], source: str) -> float:
    """The slice step (mm) of ``positions``, in any order; ValueError unless they are evenly spaced."""
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    if ordered.size < 2:
        raise ValueError(f"'{source}' holds {ordered.size} slice; expected a stack of at least 2 slices.")
    steps = np.diff(ordered)
    step = float(np.median(steps))
    duplicates = np.flatnonzero(steps <= ABSOLUTE_STEP_TOLERANCE_MM)
    if duplicates.size:
        first = int(duplicates[0])
        raise ValueError(
            f"'{source}': slices {first + 1} and {first + 2} of {ordered.size} share the position "
            f"{ordered[first]:.3f} mm along the slice normal; expected one image per slice position "
            "(a repeated or multi-echo series?)."
        )
    off = np.flatnonzero(np.abs(steps - step) > max(RELATIVE_STEP_TOLERANCE * step, ABSOLUTE_STEP_TOLERANCE_MM))
    if off.size:
        first = int(off[0])
        raise ValueError(
            f"'{source}': the slices are not evenly spaced: the step is {step:.3f} mm but {steps[first]:.3f} mm "
            f"between slices {first + 1} and {first + 2} of {ordered.size} ({off.size} uneven step(s)); "
            "a missing slice or a series with gaps? Expected one evenly spaced stack."
        )
    return step


def check_series_folder(folder: Path, files: Sequence[Path]) -> float:
    """The slice step of the DICOM ``files`` of ``folder``; ValueError unless they are one evenly spaced series."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    series = sorted({str(getattr(h, "SeriesInstanceUID", "")) for h in headers})
    if len(series) > 1:
        raise ValueError(
            f"'{folder}' holds {len(series)} DICOM series (SeriesInstanceUID {', '.join(series[:3])}"
            f"{', ...' if len(series) > 3 else ''}); expected one series per folder."
        )
    return check_even_spacing(slice_positions(headers, str(folder)), str(folder))

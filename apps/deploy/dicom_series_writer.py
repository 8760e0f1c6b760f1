"""Write a float volume as a new MR Image Storage series that overlays the series it was derived from.

Pure pydicom and numpy, so it runs in any environment (the Deploy app wraps it in an SDK operator; the
tests use it directly). Geometry comes from the volume's affine in DICOM patient coordinates (LPS);
:func:`ras_to_lps` converts a MONAI/NIfTI (RAS) affine. Intensities are stored as 16-bit integers with
one RescaleSlope/RescaleIntercept for the whole series, chosen so that ``pixel * slope + intercept``
reproduces the float values within half a quantisation step.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

# Attributes copied unchanged from the source series: the Patient, Patient Study and General Study
# modules (the new series belongs to the same patient and study), the Frame of Reference (so viewers
# place it on the source), and the series and MR acquisition context it was derived from.
COPIED_ATTRIBUTES = (
    "SpecificCharacterSet",
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Patient Study
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    # Frame of Reference
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # General Series and equipment context
    "PatientPosition",
    "BodyPartExamined",
    "Laterality",
    "Manufacturer",
    "InstitutionName",
    # MR Image module: how the source was acquired
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "SequenceName",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "EchoTrainLength",
    "FlipAngle",
    "MagneticFieldStrength",
    "ImagingFrequency",
    "ImagedNucleus",
)

# Rows of an affine: converts between RAS (NIfTI, MONAI) and LPS (DICOM, ITK) patient coordinates.
RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """The same voxel-to-world map in DICOM's LPS patient coordinates (the flip is its own inverse)."""
    return RAS_LPS_FLIP @ np.asarray(affine, dtype=np.float64)


@dataclass(frozen=True)
class Quantisation:
    """16-bit stored values and the rescale that maps them back: ``value = pixels * slope + intercept``."""

    pixels: np.ndarray
    slope: float
    intercept: float
    slope_ds: str
    intercept_ds: str


def quantise(volume: np.ndarray) -> Quantisation:
    """Map ``volume`` onto 0..65535 with one slope and intercept, exact in their DS (decimal string) form.

    The slope and intercept are rounded to what a 16-character DICOM decimal string holds first, and
    the pixels are computed from those rounded values, so a reader that applies the stored strings
    gets the float values back within half a step (``slope / 2``). The slope spans 65534 steps: the
    spare step absorbs the rounding of the strings, so the maximum never clips.
    """
    volume = np.asarray(volume, dtype=np.float64)
    if not np.isfinite(volume).all():
        raise ValueError("the volume holds NaN or infinite values; they cannot be stored in DICOM.")
    low, high = float(volume.min()), float(volume.max())
    intercept_ds = format_number_as_ds(low)
    intercept = float(intercept_ds)
    span = high - intercept
    slope_ds = format_number_as_ds(span / 65534) if span > 0 else "1"
    if float(slope_ds) <= 0:  # a span too small for a decimal string: the values are one constant
        slope_ds = "1"
    slope = float(slope_ds)
    pixels = np.clip(np.rint((volume - intercept) / slope), 0, 65535).astype(np.uint16)
    return Quantisation(pixels, slope, intercept, slope_ds, intercept_ds)


@dataclass(frozen=True)
class PlaneGeometry:
    """DICOM Image Plane attributes of slice ``k`` of a volume indexed (column, row, slice)."""

    orientation: list[float]
    pixel_spacing: list[float]
    slice_spacing: float
    affine: np.ndarray

    def position(self, k: int) -> list[float]:
        return [float(v) for v in self.affine[:3, :3] @ np.array([0.0, 0.0, k]) + self.affine[:3, 3]]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def plane_geometry(affine_lps: np.ndarray) -> PlaneGeometry:
    """Image Plane geometry of a volume whose axes 0, 1, 2 are DICOM columns, rows and slices.

    Voxel ``(i, j, k)`` is pixel (row ``j``, column ``i``) of slice ``k``, so the affine's first column
    is the row direction times the column spacing, the second the column direction times the row
    spacing (PixelSpacing is row spacing first), and the third the step between slice positions.
    """
    affine = np.asarray(affine_lps, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"expected a finite 4x4 affine, got {affine.tolist()}.")
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    if (steps <= 0).any():
        raise ValueError(f"the affine has a zero-length axis: {affine.tolist()}.")
    row_dir, col_dir, slice_dir = (affine[:3, i] / steps[i] for i in range(3))
    if abs(row_dir @ col_dir) > 1e-4:
        raise ValueError("the affine's in-plane axes are not orthogonal; DICOM image planes need them to be.")
    if abs(np.cross(row_dir, col_dir) @ slice_dir) < 1e-4:
        raise ValueError("the affine's slice axis lies in the image plane.")
    return PlaneGeometry(
        orientation=[float(v) for v in (*row_dir, *col_dir)],
        pixel_spacing=[float(steps[1]), float(steps[0])],
        slice_spacing=float(steps[2]),
        affine=affine,
    )


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _window(volume: np.ndarray) -> tuple[str, str]:
    """A display window over the 0.5-99.5th percentiles, so viewers open the series readable."""
    low, high = np.percentile(volume, [0.5, 99.5])
    return _ds((low + high) / 2), _ds(max(high - low, 1e-6))


def build_mr_series(
    volume: np.ndarray,
    affine_lps: np.ndarray,
    source: Dataset,
    series_description: str,
    derivation_description: str = "",
    series_number: int | None = None,
) -> list[Dataset]:
    """One MR Image Storage dataset per slice ``volume[:, :, k]`` of a new series derived from ``source``.

    Args:
        volume: float values indexed (column, row, slice).
        affine_lps: voxel index to DICOM patient coordinates (mm, LPS).
        source: one instance of the source series; its patient, study, frame of reference and
            acquisition attributes are copied.
        series_description: SeriesDescription of the new series (64 characters at most).
        derivation_description: how the volume was derived (DerivationDescription).
        series_number: SeriesNumber; default the source's plus 1000.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}.")
    if len(series_description) > 64:
        raise ValueError(f"SeriesDescription is limited to 64 characters, got {len(series_description)}.")
    geometry = plane_geometry(affine_lps)
    stored = quantise(volume)
    centre, width = _window(volume)
    if series_number is None:
        series_number = int(source.get("SeriesNumber", 0) or 0) + 1000
    series_uid = generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    normal = geometry.normal

    datasets = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        for keyword in COPIED_ATTRIBUTES:
            if keyword in source:
                ds.add(copy.deepcopy(source.data_element(keyword)))
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "MR"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        if derivation_description:
            ds.DerivationDescription = derivation_description[:1024]
        ds.InstanceNumber = k + 1
        position = geometry.position(k)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
        ds.SliceLocation = _ds(float(np.dot(normal, position)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = stored.intercept_ds
        ds.RescaleSlope = stored.slope_ds
        ds.RescaleType = "US"
        ds.WindowCenter, ds.WindowWidth = centre, width
        ds.PixelData = np.ascontiguousarray(stored.pixels[:, :, k].T).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    return datasets


def write_mr_series(datasets: Sequence[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Save ``datasets`` as ``IM_0001.dcm``, ... (by InstanceNumber) in ``folder``, which must be empty or new."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"'{folder}' is not empty; the series is written into an empty folder only.")
    paths = []
    for ds in datasets:
        path = folder / f"IM_{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

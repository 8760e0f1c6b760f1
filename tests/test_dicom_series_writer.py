"""The DICOM series writer of the Deploy app (pure pydicom), read back with pydicom and ITK."""

import sys
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "deploy"))

from dicom_series_writer import (  # noqa: E402
    build_mr_series,
    plane_geometry,
    quantise,
    ras_to_lps,
    write_mr_series,
)

SOURCE = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # a real MR image: patient, study, frame of reference


def oblique_affine(spacing=(0.8, 0.9, 2.5), origin=(-30.0, 12.0, 40.0)):
    """An LPS affine rotated about two axes, with non-square pixels (so a row/column swap shows)."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def itk_affine(image) -> np.ndarray:
    direction = np.asarray(image.GetDirection())
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing()))
    affine[:3, 3] = np.asarray(image.GetOrigin())
    return affine


def test_quantise_reproduces_the_values_within_half_a_step():
    rng = np.random.default_rng(0)
    for volume in (rng.normal(300, 120, (9, 7, 5)), rng.uniform(-1e-3, 2e-3, (4, 4, 4)), np.full((3, 3, 3), 7.25)):
        q = quantise(volume)
        assert q.pixels.dtype == np.uint16
        assert len(q.slope_ds) <= 16 and len(q.intercept_ds) <= 16
        assert float(q.slope_ds) == q.slope and float(q.intercept_ds) == q.intercept
        restored = q.pixels * q.slope + q.intercept
        assert np.abs(restored - volume).max() <= q.slope / 2 * (1 + 1e-6) + 1e-12 * np.abs(volume).max()
    nan = np.zeros((2, 2, 2))
    nan[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantise(nan)


def test_ras_to_lps_flips_the_first_two_world_axes():
    ras = np.array([[1.0, 0, 0, 10], [0, 2, 0, 20], [0, 0, 3, 30], [0, 0, 0, 1]])
    lps = ras_to_lps(ras)
    assert np.allclose(lps[:3, 3], [-10, -20, 30]) and np.allclose(np.diag(lps), [-1, -2, 3, 1])
    assert np.allclose(ras_to_lps(lps), ras)


def test_plane_geometry_follows_the_dicom_conventions():
    affine = oblique_affine()
    geometry = plane_geometry(affine)
    assert np.allclose(geometry.orientation[:3], affine[:3, 0] / 0.8)  # along a row: voxel axis 0
    assert np.allclose(geometry.orientation[3:], affine[:3, 1] / 0.9)  # down a column: voxel axis 1
    assert np.allclose(geometry.pixel_spacing, [0.9, 0.8])  # row spacing first
    assert np.isclose(geometry.slice_spacing, 2.5)
    assert np.allclose(geometry.position(3), affine[:3, 3] + 3 * affine[:3, 2])
    skewed = affine.copy()
    skewed[:3, 1] += 0.3 * skewed[:3, 0]
    with pytest.raises(ValueError, match="not orthogonal"):
        plane_geometry(skewed)
    flat = affine.copy()
    flat[:3, 2] = affine[:3, 0]
    with pytest.raises(ValueError, match="slice axis lies in the image plane"):
        plane_geometry(flat)


def test_series_reads_back_with_itk_and_pydicom(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 150.0, (11, 8, 6)).astype(np.float32)  # (columns, rows, slices)
    affine = oblique_affine()
    datasets = build_mr_series(volume, affine, SOURCE, "PR-INR reconstruction", "test derivation", series_number=7)
    paths = write_mr_series(datasets, tmp_path / "series")
    assert [p.name for p in paths] == [f"IM_{k:04d}.dcm" for k in range(1, 7)]

    image = itk.imread(str(tmp_path / "series"), itk.F)  # ITK sorts the files by position and reads in LPS
    assert np.allclose(itk_affine(image), affine, atol=1e-5)
    restored = itk.array_from_image(image).transpose(2, 1, 0)
    half_step = float(datasets[0].RescaleSlope) / 2 * 1.001 + 1e-3  # ITK computes in float32
    assert restored.shape == volume.shape
    assert np.abs(restored - volume).max() <= half_step

    read = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(read):
        assert ds.SOPClassUID == MRImageStorage and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.SeriesNumber == 7
        assert ds.SeriesDescription == "PR-INR reconstruction" and ds.DerivationDescription == "test derivation"
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], affine[:3, 3] + k * affine[:3, 2], atol=1e-4)
        assert np.isclose(float(ds.SliceThickness), 2.5) and np.isclose(float(ds.SpacingBetweenSlices), 2.5)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(values - volume[:, :, k].T).max() <= half_step
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID"):
            assert ds.get(keyword) == SOURCE.get(keyword), keyword
    assert len({ds.SeriesInstanceUID for ds in read}) == 1
    assert read[0].SeriesInstanceUID != SOURCE.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in read} | {SOURCE.SOPInstanceUID}) == len(read) + 1


def test_bad_volumes_and_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="3D volume"):
        build_mr_series(np.zeros((4, 4)), np.eye(4), SOURCE, "x")
    with pytest.raises(ValueError, match="64 characters"):
        build_mr_series(np.zeros((2, 2, 2)), np.eye(4), SOURCE, "x" * 65)
    datasets = build_mr_series(np.zeros((2, 2, 2)), np.eye(4), SOURCE, "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "other.dcm").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        write_mr_series(datasets, tmp_path / "taken")

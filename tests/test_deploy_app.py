"""The MONAI Deploy app (apps/deploy) end to end, run in its own environment on the real DICOM series.

The app runs once for the module, at 2 mm to keep it quick, and its output is compared with one run
of the bundle CLI (this environment) on the same series: the DICOM output is read back with pydicom
and ITK, and its geometry is checked in DICOM patient coordinates (LPS) against the input series
and the bundle's NIfTI (RAS). Bad inputs fail before any inference, so those runs are cheap.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import app_python
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundle"
APP = REPO_ROOT / "apps" / "deploy" / "app.py"
SERIES_NAME = "vs_seg_001_t1_4p5mm"
SPACING = 2.0
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

pytestmark = pytest.mark.slow


def run_app(input_folder, output_folder, *options):
    """Run the app as a user of its environment would: ``python apps/deploy/app.py -i -o -m``."""
    command = [str(app_python("deploy")), str(APP), "-i", str(input_folder), "-o", str(output_folder)]
    command += ["-m", str(BUNDLE_DIR), *map(str, options)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def folder_digest(folder: Path) -> str:
    """Names, sizes, modification times and contents of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def series_affine(datasets) -> np.ndarray:
    """Voxel (column, row, slice) to LPS patient coordinates of a series, from its own DICOM attributes."""
    first = datasets[0]
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:])
    normal = np.cross(row_dir, col_dir)
    datasets = sorted(datasets, key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    first_position = np.array(datasets[0].ImagePositionPatient, float)
    last_position = np.array(datasets[-1].ImagePositionPatient, float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = (last_position - first_position) / (len(datasets) - 1)
    affine[:3, 3] = first_position
    return affine


def itk_affine(image) -> np.ndarray:
    """Voxel (column, row, slice) to LPS patient coordinates of an ITK image."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()) @ np.diag(np.asarray(image.GetSpacing()))
    affine[:3, 3] = np.asarray(image.GetOrigin())
    return affine


def world(affine, index):
    return (np.asarray(affine) @ np.r_[np.asarray(index, float), 1.0])[:3]


def read_series(folder: Path):
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


@pytest.fixture(scope="module")
def series(shared_data) -> Path:
    return shared_data / "dicom" / SERIES_NAME


@pytest.fixture(scope="module")
def app_run(series, tmp_path_factory):
    """One end-to-end run of the app; the input folder's digest before and after."""
    output = tmp_path_factory.mktemp("deploy_out")
    before = folder_digest(series)
    result = run_app(series, output, "--target-spacing", SPACING)
    return result, output, before, folder_digest(series)


@pytest.fixture(scope="module")
def bundle_nifti(series, tmp_path_factory):
    """The bundle CLI's reconstruction of the same series with the same parameters."""
    output = tmp_path_factory.mktemp("bundle_out")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_DIR / "configs/inference.json")]
    command += ["--bundle_root", str(BUNDLE_DIR), "--input_image", str(series), "--output_dir", str(output)]
    command += ["--target_spacing", str(SPACING)]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_DIR))
    done = subprocess.run(command, cwd=BUNDLE_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return nib.load(str(output / f"{SERIES_NAME}_recon.nii.gz"))


@pytest.fixture(scope="module")
def result(app_run) -> Path:
    done, output, _, _ = app_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return output / f"{SERIES_NAME}_recon"


def test_app_writes_one_complete_result_folder(app_run, result):
    _, output, _, _ = app_run
    assert [p.name for p in output.iterdir()] == [result.name]  # no staging folder left behind
    assert sorted(p.name for p in result.iterdir()) == ["dicom", f"{SERIES_NAME}_recon.nii.gz"]
    assert len(list((result / "dicom").iterdir())) == 40 * 4.5 / SPACING


def test_input_folder_is_untouched(app_run):
    _, _, before, after = app_run
    assert before == after


def test_output_is_a_new_mr_series_in_the_input_study(series, result):
    source = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    output = read_series(result / "dicom")
    assert len({ds.SeriesInstanceUID for ds in output}) == 1
    assert output[0].SeriesInstanceUID != source.SeriesInstanceUID
    sop_uids = {ds.SOPInstanceUID for ds in output}
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.iterdir()}
    assert len(sop_uids) == len(output) and not sop_uids & source_uids
    assert sorted(ds.InstanceNumber for ds in output) == list(range(1, len(output) + 1))
    for ds in output:
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "PR-INR reconstruction" in ds.SeriesDescription
        assert ds.DerivationDescription.endswith(f"of series {source.SeriesInstanceUID}")
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientSex",
            "PatientAge",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "StudyDescription",
            "FrameOfReferenceUID",
        ):
            assert ds.get(keyword) == source.get(keyword), keyword
        assert np.allclose([float(v) for v in ds.PixelSpacing], [SPACING, SPACING])
        assert np.isclose(float(ds.SliceThickness), SPACING) and np.isclose(float(ds.SpacingBetweenSlices), SPACING)
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0


def test_output_geometry_overlays_the_input_in_patient_coordinates(series, result, bundle_nifti):
    output_datasets = read_series(result / "dicom")
    output_affine = series_affine(output_datasets)
    input_datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.iterdir()]
    input_affine = series_affine(input_datasets)
    shape = (output_datasets[0].Columns, output_datasets[0].Rows, len(output_datasets))
    assert shape == bundle_nifti.shape

    # the same grid as the bundle's NIfTI, once its RAS affine is taken to LPS
    expected = RAS_TO_LPS @ bundle_nifti.affine
    corners = np.array(list(np.ndindex(2, 2, 2))) * (np.array(shape) - 1)
    for corner in [*corners, (np.array(shape) - 1) / 2]:
        assert np.allclose(world(output_affine, corner), world(expected, corner), atol=1e-3)

    # ITK reads both series in LPS: the output lies on the input's planes and tiles its slabs exactly
    output_image = itk.imread(str(result / "dicom"), itk.F)
    input_image = itk.imread(str(series), itk.F)
    assert np.allclose(itk_affine(output_image), output_affine, atol=1e-4)
    output_first = world(itk_affine(output_image), [0, 0, -0.5])
    output_last = world(itk_affine(output_image), [0, 0, shape[2] - 0.5])
    input_first = world(itk_affine(input_image), [0, 0, -0.5])
    input_last = world(itk_affine(input_image), [0, 0, 40 - 0.5])
    normal = input_affine[:3, 2] / np.linalg.norm(input_affine[:3, 2])
    assert np.isclose(np.dot(output_first - input_first, normal), 0, atol=1e-3)
    assert np.isclose(np.dot(output_last - input_last, normal), 0, atol=1e-3)
    assert np.allclose(np.asarray(output_image.GetDirection()), np.asarray(input_image.GetDirection()), atol=1e-6)
    # in plane, the output's first voxel centre is the input's, and its field of view covers the input's
    assert np.allclose(world(output_affine, [0, 0, 0])[:2], world(input_affine, [0, 0, 0])[:2], atol=1e-3)
    input_extent = 512 * float(input_datasets[0].PixelSpacing[0])
    assert 0 <= shape[0] * SPACING - input_extent <= SPACING


def test_output_values_match_the_bundle_nifti(result, bundle_nifti):
    expected = bundle_nifti.get_fdata(dtype=np.float32)
    nifti_copy = nib.load(str(result / f"{SERIES_NAME}_recon.nii.gz"))
    assert np.allclose(nifti_copy.affine, bundle_nifti.affine, atol=1e-5)
    assert nifti_copy.get_data_dtype() == np.float32
    assert np.allclose(nifti_copy.get_fdata(dtype=np.float32), expected, rtol=1e-5, atol=1e-4)

    datasets = read_series(result / "dicom")
    half_step = float(datasets[0].RescaleSlope) / 2
    assert half_step < 1e-4 * np.abs(expected).max()  # 16-bit steps: far finer than the image's contrast
    by_position = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    pydicom_values = np.stack(
        [ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in by_position], axis=-1
    )
    assert np.abs(pydicom_values - expected).max() <= half_step * 1.001 + 1e-4
    itk_values = itk.array_from_image(itk.imread(str(result / "dicom"), itk.F)).transpose(2, 1, 0)
    assert itk_values.shape == expected.shape
    assert np.abs(itk_values - expected).max() <= half_step * 1.001 + 1e-3  # ITK rescales in float32


def test_non_square_pixels_keep_their_spacing_on_each_axis(series, tmp_path):
    """PixelSpacing is (row spacing, column spacing): the spacing along a row is the second value."""
    stretched = tmp_path / "series"
    stretched.mkdir()
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [0.5, 0.41015625]
        ds.save_as(stretched / path.name)
    done = run_app(stretched, tmp_path / "out", "--target-spacing", 4)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    output = read_series(tmp_path / "out" / "series_recon" / "dicom")
    input_image = itk.imread(str(stretched), itk.F)
    assert np.allclose(np.asarray(input_image.GetSpacing())[:2], [0.41015625, 0.5])
    extents = np.array([output[0].Columns, output[0].Rows]) * 4.0 - 512 * np.array([0.41015625, 0.5])
    assert (extents >= 0).all() and (extents <= 4).all(), extents
    output_affine = series_affine(output)
    assert np.allclose(world(output_affine, [0, 0, 0])[:2], world(itk_affine(input_image), [0, 0, 0])[:2], atol=1e-3)


def _assert_fails_cleanly(done, output: Path, message: str):
    assert done.returncode != 0
    assert message in done.stderr, (done.stdout + done.stderr)[-4000:]
    assert "reconstructing scan" not in done.stdout + done.stderr  # failed before any inference
    assert not output.exists() or not any(output.iterdir()), sorted(output.iterdir())


def test_folder_without_mr_series_fails_clearly(tmp_path):
    ct_only = tmp_path / "ct_only"
    ct_only.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), ct_only / "ct.dcm")  # a real CT image
    done = run_app(ct_only, tmp_path / "out")
    _assert_fails_cleanly(done, tmp_path / "out", "no MR series to reconstruct in the input: found CT")


def test_the_apps_own_output_is_not_taken_as_input(result, tmp_path):
    done = run_app(result / "dicom", tmp_path / "out")
    _assert_fails_cleanly(done, tmp_path / "out", "no MR series to reconstruct in the input: found MR 'PR-INR")


@pytest.mark.parametrize("damage", ["not_dicom", "truncated"])
def test_broken_file_among_good_ones_fails_clearly(series, tmp_path, damage):
    broken = tmp_path / "series"
    shutil.copytree(series, broken)
    victim = sorted(broken.iterdir())[17]
    if damage == "not_dicom":
        victim.write_bytes(b"this is not a DICOM file\n" * 10)
    else:
        victim.write_bytes(victim.read_bytes()[:200_000])  # pixel data cut short, as by a failed transfer
    done = run_app(broken, tmp_path / "out", "--target-spacing", SPACING)
    _assert_fails_cleanly(done, tmp_path / "out", f"1 of 40 files in '{broken}' are not readable DICOM images")
    assert f"'{victim.name}'" in done.stderr


def test_existing_result_is_never_replaced(series, app_run, result):
    _, output, _, _ = app_run
    before = folder_digest(result)
    done = run_app(series, output, "--target-spacing", SPACING)
    assert done.returncode != 0 and "already exists" in done.stderr
    assert folder_digest(result) == before and [p.name for p in output.iterdir()] == [result.name]


def test_series_with_a_missing_slice_fails_clearly(series, tmp_path):
    """The SDK would spread the remaining slices over the series' extent; the app refuses the gap instead."""
    gapped = tmp_path / "series"
    shutil.copytree(series, gapped)
    height = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in gapped.iterdir()}
    middle = sorted(height, key=height.get)[20]  # an axial series: the slice position is its height
    middle.unlink()
    done = run_app(gapped, tmp_path / "out", "--target-spacing", SPACING)
    _assert_fails_cleanly(done, tmp_path / "out", "the slices are not evenly spaced: the step is 4.500 mm but 9.000 mm")

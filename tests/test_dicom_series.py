"""DICOM series checks: a folder reaches the reconstruction only as one evenly spaced stack."""

import shutil

import numpy as np
import pydicom
import pytest

from scripts.dicom_series import check_even_spacing, check_series_folder, slice_positions
from scripts.inference import find_scans

SERIES = "vs_seg_001_t1_4p5mm"


@pytest.fixture
def series_copy(shared_data, tmp_path):
    """A writable copy of the real thick-slice series, its files sorted along the slice normal."""
    folder = tmp_path / SERIES
    shutil.copytree(shared_data / "dicom" / SERIES, folder)
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    order = np.argsort(slice_positions(headers, str(folder)))
    return folder, [files[i] for i in order]


def _edit(path, **values):
    dataset = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)


def test_real_series_passes_with_its_slice_step(shared_data):
    folder = shared_data / "dicom" / SERIES
    assert check_series_folder(folder, sorted(folder.iterdir())) == pytest.approx(4.5, abs=1e-3)
    assert find_scans(folder) == [{"image": str(folder)}]


def test_even_spacing_in_any_order_and_its_failures():
    assert check_even_spacing([10.0, 0.0, 5.0, 15.0], "s") == pytest.approx(5.0)
    uneven = r"not evenly spaced: the step is 5.000 mm but 10.000 mm between slices 2 and 3 of 4"
    with pytest.raises(ValueError, match=uneven):
        check_even_spacing([0.0, 5.0, 15.0, 20.0], "s")
    with pytest.raises(ValueError, match="slices 2 and 3 of 4 share the position 5.000 mm"):
        check_even_spacing([0.0, 5.0, 5.0, 10.0], "s")
    with pytest.raises(ValueError, match="expected a stack of at least 2 slices"):
        check_even_spacing([3.0], "s")


def test_missing_slice_is_refused_before_loading(series_copy):
    folder, files = series_copy
    files[20].unlink()
    gap = r"not evenly spaced: the step is 4.500 mm but 9.000 mm between slices 20 and 21 of 39"
    with pytest.raises(ValueError, match=gap):
        find_scans(folder)


def test_duplicated_slice_is_refused(series_copy):
    folder, files = series_copy
    shutil.copy(files[7], folder / "copy_of_slice_8.dcm")
    with pytest.raises(ValueError, match="share the position"):
        find_scans(folder)


def test_folder_with_two_series_is_refused(series_copy):
    folder, files = series_copy
    for path in files[::2]:
        _edit(path, SeriesInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(ValueError, match=r"holds \d+ DICOM series .* expected one series per folder"):
        find_scans(folder)


def test_tilted_slice_is_refused(series_copy):
    folder, files = series_copy
    orientation = [float(v) for v in pydicom.dcmread(files[5]).ImageOrientationPatient]
    tilted = np.asarray(orientation[:3]) + np.asarray([0.0, 0.1, 0.0])
    _edit(files[5], ImageOrientationPatient=[*(tilted / np.linalg.norm(tilted)), *orientation[3:]])
    with pytest.raises(ValueError, match="not parallel"):
        find_scans(folder)

"""Inference: scan discovery, input checks, output geometry and the bundle CLI on NIfTI and DICOM."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import LoadImage

from scripts.inference import (
    CheckScand,
    ReconstructionInferer,
    SaveReconstructiond,
    check_outputs,
    find_scans,
    isotropic_affine,
    output_path,
    slice_geometry,
)
from scripts.networks import PRINRPipeline

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE_DIR / "sample_data" / "icbm152_t1_thick5_motion3_r4.nii.gz"


def write_nifti(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)), str(path))
    return path


def run_bundle(*args, cwd=BUNDLE_DIR):
    """Run the bundle's inference config as a user would; returns the completed process."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_DIR / "configs/inference.json")]
    command += ["--bundle_root", str(BUNDLE_DIR), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_DIR))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def voxel_centre_extent(affine, shape, axis):
    """World coordinates of the first and last voxel centres along ``axis``."""
    first, last = np.zeros(4), np.zeros(4)
    first[3] = last[3] = 1
    last[axis] = shape[axis] - 1
    return np.asarray(affine) @ first, np.asarray(affine) @ last


# --- geometry --------------------------------------------------------------------------------


def test_slice_axis_is_the_largest_spacing():
    assert slice_geometry(torch.diag(torch.tensor([0.4, 0.4, 4.5, 1.0])))[0] == 2
    assert slice_geometry(torch.diag(torch.tensor([-5.0, 1.0, 1.0, 1.0])))[0] == 0
    assert slice_geometry(torch.eye(4))[0] == 2  # ties: the last axis


def test_isotropic_affine_tiles_the_acquired_slabs():
    affine = torch.tensor([[0, 0, -5.0, 30], [0.9, 0, 0, -10], [0, -0.9, 0, 4], [0, 0, 0, 1]], dtype=torch.float64)
    out = isotropic_affine(affine, slice_axis=2, scale=5.0)
    assert torch.allclose(torch.linalg.norm(out[:3, :3], dim=0), torch.tensor([0.9, 0.9, 1.0], dtype=torch.float64))
    # output voxel j = 5 k + 2 is exactly the centre of thick slice k
    for k in (0, 3):
        thick = affine @ torch.tensor([1.0, 2.0, k, 1.0], dtype=torch.float64)
        fine = out @ torch.tensor([1.0, 2.0, 5 * k + 2, 1.0], dtype=torch.float64)
        assert torch.allclose(thick, fine)
    # the first output voxel's outer face is the first slab's outer face
    slab_face = affine @ torch.tensor([0, 0, -0.5, 1.0], dtype=torch.float64)
    voxel_face = out @ torch.tensor([0, 0, -0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(slab_face, voxel_face)


def test_inferer_keeps_orientation_and_overlays_a_non_ras_input():
    torch.manual_seed(0)
    network = PRINRPipeline().eval()
    # sagittal thick slices (axis 0, 4 mm) in an LPS-like orientation
    affine = torch.tensor([[-4.0, 0, 0, 60], [0, -1.0, 0, 80], [0, 0, 1.0, -40], [0, 0, 0, 1]], dtype=torch.float64)
    image = MetaTensor(torch.rand(1, 1, 6, 21, 17) * 100, affine=affine)
    out = ReconstructionInferer(acceleration=1.0)(image, network)
    assert out.shape == (1, 1, 24, 21, 17)
    out_affine = out.affine[0] if out.affine.ndim == 3 else out.affine
    assert nib.aff2axcodes(out_affine.numpy()) == nib.aff2axcodes(affine.numpy()) == ("L", "P", "S")
    assert torch.allclose(torch.linalg.norm(out_affine[:3, :3], dim=0), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(out_affine, isotropic_affine(affine, 0, 4.0))
    assert torch.isfinite(out).all()


def test_inferer_resamples_in_plane_to_a_requested_spacing():
    torch.manual_seed(0)
    network = PRINRPipeline().eval()
    affine = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 1, 40, 30, 5), affine=affine)
    out = ReconstructionInferer(target_spacing=1.0)(image, network)
    out_affine = out.affine[0] if out.affine.ndim == 3 else out.affine
    assert out.shape == (1, 1, 20, 16, 15)  # MONAI Spacing keeps the extent, rounding half to even
    assert torch.allclose(torch.linalg.norm(out_affine[:3, :3], dim=0), torch.ones(3, dtype=torch.float64))


# --- inputs and outputs ----------------------------------------------------------------------


def test_find_scans(tmp_path):
    nifti = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
    assert find_scans(nifti) == [{"image": str(nifti)}]
    assert find_scans(tmp_path) == [{"image": str(nifti)}]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_scans(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty; expected a DICOM series"):
        find_scans(empty)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not DICOM"):
        find_scans(empty)
    with pytest.raises(ValueError, match="not a NIfTI file"):
        find_scans(empty / "notes.txt")


def test_check_scan_rejects_bad_volumes():
    check = CheckScand("image")
    with pytest.raises(ValueError, match="2D image"):
        check({"image": MetaTensor(torch.zeros(1, 8, 8))})
    with pytest.raises(ValueError, match="holds 3 volumes"):
        check({"image": MetaTensor(torch.zeros(3, 8, 8, 8))})
    nan = torch.zeros(1, 8, 8, 8)
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        check({"image": MetaTensor(nan)})
    out = check({"image": MetaTensor(torch.ones(1, 4, 4, 4, dtype=torch.int16))})
    assert out["image"].dtype == torch.float32


def test_save_is_atomic_and_never_overwrites(tmp_path):
    affine = torch.diag(torch.tensor([0.9, 0.9, 1.1, 1.0], dtype=torch.float64))
    pred = MetaTensor(torch.rand(1, 5, 6, 7), affine=affine, meta={"filename_or_obj": "/data/scan_01.nii.gz"})
    SaveReconstructiond("pred", tmp_path)({"pred": pred})
    target = tmp_path / "scan_01_recon.nii.gz"
    saved = nib.load(str(target))
    assert saved.get_data_dtype() == np.float32 and saved.shape == (5, 6, 7)
    assert np.allclose(saved.affine, affine.numpy()) and np.allclose(saved.get_fdata(), pred[0].numpy(), atol=1e-6)
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        SaveReconstructiond("pred", tmp_path)({"pred": pred * 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan_01_recon.nii.gz"]
    for overwrite in (False, "false", "False"):
        with pytest.raises(FileExistsError, match="--overwrite true"):
            check_outputs([{"image": "/data/scan_01.nii.gz"}], tmp_path, overwrite=overwrite)
    check_outputs([{"image": "/data/scan_01.nii.gz"}], tmp_path, overwrite="true")
    assert output_path("/dicom/series_7", tmp_path) == tmp_path / "series_7_recon.nii.gz"


# --- the bundle CLI --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sample_out")
    result = run_bundle("--output_dir", output_dir)
    return result, output_dir


@pytest.mark.slow
def test_cli_reconstructs_the_embedded_sample(sample_run):
    result, output_dir = sample_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = nib.load(str(output_dir / "icbm152_t1_thick5_motion3_r4_recon.nii.gz"))
    source = nib.load(str(SAMPLE))
    assert out.shape == (160, 192, 160) and out.get_data_dtype() == np.float32
    assert np.allclose(out.header.get_zooms(), (1.0, 1.0, 1.0))
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(source.affine)
    # the isotropic grid tiles the acquired slabs exactly: same in-plane grid, same slab extent
    assert np.allclose(out.affine[:3, :2], source.affine[:3, :2]) and np.allclose(
        out.affine[:2, 3], source.affine[:2, 3]
    )
    assert np.isclose(out.affine[2, 3] - 0.5, source.affine[2, 3] - 2.5)
    data = out.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    for stage in ("reconstructing", "saved", "peak resident memory"):
        assert stage in result.stderr + result.stdout


@pytest.mark.slow
def test_cli_does_not_overwrite_unless_asked(sample_run):
    _, output_dir = sample_run
    target = output_dir / "icbm152_t1_thick5_motion3_r4_recon.nii.gz"
    before = target.read_bytes()
    for flags in ([], ["--overwrite", "false"]):  # the CLI passes "false" as a string
        refused = run_bundle("--output_dir", output_dir, *flags)
        assert refused.returncode != 0 and "already exists" in refused.stderr
        assert target.read_bytes() == before
    allowed = run_bundle("--output_dir", output_dir, "--overwrite", "true", "--target_spacing", "2.0")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert nib.load(str(target)).shape == (80, 96, 80)


@pytest.mark.slow
def test_cli_gives_the_same_result_for_dicom_and_nifti_of_one_scan(shared_data, tmp_path):
    series = shared_data / "dicom" / "vs_seg_001_t1_4p5mm"
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(series))
    nifti = tmp_path / "vs_seg_001_t1_4p5mm.nii.gz"
    writer = NibabelWriter(output_dtype=np.float32)
    writer.set_data_array(image, channel_dim=0)
    writer.set_metadata({"affine": image.affine, "original_affine": image.affine}, resample=False)
    writer.write(str(nifti), verbose=False)

    outputs = {}
    for name, source in (("dicom", series), ("nifti", nifti)):
        output_dir = tmp_path / name
        result = run_bundle("--input_image", source, "--output_dir", output_dir, "--target_spacing", "2.0")
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = nib.load(str(output_dir / "vs_seg_001_t1_4p5mm_recon.nii.gz"))
    dicom, nifti_out = outputs["dicom"], outputs["nifti"]
    assert dicom.shape == nifti_out.shape and dicom.shape[2] == 40 * 4.5 / 2
    assert np.allclose(dicom.affine, nifti_out.affine, atol=1e-4)
    assert np.allclose(dicom.header.get_zooms(), (2.0, 2.0, 2.0), atol=1e-3)
    assert np.allclose(dicom.get_fdata(), nifti_out.get_fdata(), rtol=1e-4, atol=1e-3)
    # the reconstruction overlays the series: its slab extent along the slice axis is the input's
    first, last = voxel_centre_extent(image.affine.numpy(), image.shape[1:], 2)
    out_first, out_last = voxel_centre_extent(dicom.affine, dicom.shape, 2)
    assert np.isclose(out_first[2] - 1.0, first[2] - 2.25, atol=1e-3)
    assert np.isclose(out_last[2] + 1.0, last[2] + 2.25, atol=1e-3)


def _bad_inputs(tmp_path):
    flat = write_nifti(tmp_path / "flat2d.nii.gz", np.ones((16, 16)), np.eye(4))
    four_d = write_nifti(tmp_path / "series4d.nii.gz", np.ones((8, 8, 4, 3)), np.eye(4))
    nan_volume = np.ones((12, 12, 4))
    nan_volume[3, 3, 1] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", nan_volume, np.diag([1, 1, 4, 1]))
    empty = tmp_path / "empty_dicom"
    empty.mkdir()
    return {
        "missing": (tmp_path / "nope.nii.gz", "does not exist"),
        "2d": (flat, "expected a 3D volume"),
        "4d": (four_d, "expected a single 3D volume"),
        "empty dicom folder": (empty, "is empty"),
        "nan": (nan, "NaN or infinite"),
    }


@pytest.mark.slow
def test_cli_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    for name, (source, message) in _bad_inputs(tmp_path).items():
        output_dir = tmp_path / f"out_{name.replace(' ', '_')}"
        result = run_bundle("--input_image", source, "--output_dir", output_dir)
        assert result.returncode != 0, name
        assert message in result.stderr, (name, result.stderr[-2000:])
        assert not output_dir.exists() or not any(output_dir.iterdir()), name

"""Evaluation metrics: the numbers every table in the project is built from."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import SSIMMetric

from scripts.metrics import evaluate_reconstruction, head_mask, normalise


def _unit_range_volume(shape=(24, 24, 24), seed=0) -> torch.Tensor:
    """Values in [0.2, 0.8] plus a 1.0 block (> 0.5 % of voxels), so the 99.5th percentile is exactly 1."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.2, 0.8, size=(1, *shape)).astype(np.float32)
    v[:, :6, :6, :6] = 1.0  # 216 voxels of 13824 = 1.6 %
    return torch.from_numpy(v)


def test_psnr_of_a_constant_offset_is_the_closed_form():
    gt = _unit_range_volume()
    scores = evaluate_reconstruction(gt - 0.1, gt)
    # MSE = 0.01 on a peak of 1 -> 20 dB, on the whole volume and inside any mask
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert scores["psnr_head"] == pytest.approx(20.0, abs=1e-3)


def test_psnr_head_only_counts_voxels_in_the_mask():
    gt = _unit_range_volume()
    mask = torch.zeros_like(gt, dtype=torch.bool)
    mask[:, 4:20, 4:20, 4:16] = True
    pred = torch.where(mask, gt - 0.1, gt)
    scores = evaluate_reconstruction(pred, gt, mask=mask)
    fraction = float(mask.float().mean())
    assert scores["psnr_head"] == pytest.approx(20.0, abs=1e-3)
    assert scores["psnr"] == pytest.approx(20.0 - 10 * math.log10(fraction), abs=1e-3)


def test_scores_do_not_depend_on_the_intensity_unit():
    gt = _unit_range_volume()
    pred = gt + 0.05 * torch.from_numpy(np.random.default_rng(1).standard_normal(gt.shape).astype(np.float32))
    pred = pred.clamp(0, 1)
    a = evaluate_reconstruction(pred, gt)
    b = evaluate_reconstruction(pred * 812.0, gt * 812.0)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4)


def test_identical_volumes_have_ssim_one_and_infinite_psnr():
    gt = _unit_range_volume() * 300.0
    scores = evaluate_reconstruction(gt.clone(), gt)
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ssim_head"] == pytest.approx(1.0, abs=1e-6)
    assert scores["psnr"] == math.inf and scores["psnr_head"] == math.inf


def test_whole_volume_ssim_is_monai_ssim_metric():
    gt = _unit_range_volume(shape=(20, 22, 24))
    noise = torch.from_numpy(np.random.default_rng(2).standard_normal(gt.shape).astype(np.float32))
    pred = (gt + 0.1 * noise).clamp(0, 1)
    expected = SSIMMetric(spatial_dims=3, data_range=1.0)(pred[None], gt[None]).item()
    assert evaluate_reconstruction(pred, gt)["ssim"] == pytest.approx(expected, abs=1e-6)


def test_ssim_head_uses_the_mask_cropped_like_the_valid_ssim_map():
    gt = _unit_range_volume(shape=(40, 24, 24))
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal(gt.shape).astype(np.float32))
    pred = gt.clone()
    pred[:, 20:] = (gt[:, 20:] + 0.2 * noise[:, 20:]).clamp(0, 1)  # errors only where x >= 20
    mask = torch.zeros_like(gt, dtype=torch.bool)
    mask[:, :15] = True  # 11-voxel windows centred at x <= 14 never reach x = 20
    scores = evaluate_reconstruction(pred, gt, mask=mask)
    assert scores["ssim_head"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ssim"] < 0.9


def test_normalisation_divides_by_the_gt_percentile_and_clips():
    rng = np.random.default_rng(4)
    gt = torch.from_numpy(rng.uniform(0, 500, size=(1, 10, 10, 10)).astype(np.float32))
    pred = torch.linspace(-100.0, 2000.0, 1000).reshape(1, 10, 10, 10)
    gt_n, pred_n = normalise(gt, pred)
    p995 = np.percentile(gt.numpy(), 99.5)
    np.testing.assert_allclose(gt_n.numpy(), np.clip(gt.numpy() / p995, 0, 1), rtol=1e-6)
    assert float(pred_n.min()) == 0.0 and float(pred_n.max()) == 1.0
    assert float((gt_n == 1.0).float().mean()) == pytest.approx(0.005, abs=1e-3)


def test_head_mask_covers_an_ellipsoid_fills_its_cavity_and_drops_specks():
    shape = (48, 56, 44)
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    ellipsoid = (x / 18) ** 2 + (y / 22) ** 2 + (z / 16) ** 2 <= 1
    cavity = (x / 10) ** 2 + (y / 12) ** 2 + (z / 8) ** 2 <= 1  # dark "ventricle", enclosed by a 6-8 voxel shell
    vol = 0.02 * np.random.default_rng(5).random(shape)  # background noise
    vol[ellipsoid] = 1.0
    vol[cavity] = 0.0
    vol[1:4, 1:4, 1:4] = 1.0  # bright detached speck in a corner
    mask = head_mask(torch.from_numpy(vol[None].astype(np.float32)))
    assert mask.shape == (1, *shape) and mask.dtype == torch.bool
    m = mask[0].numpy()
    assert m[ellipsoid].mean() > 0.99
    assert m[cavity].all()
    assert not m[:5, :5, :5].any()
    grown = (x / 21) ** 2 + (y / 25) ** 2 + (z / 19) ** 2 <= 1  # 3 voxels of slack
    assert not m[~grown].any()


def test_mismatched_shapes_are_rejected():
    gt = _unit_range_volume()
    with pytest.raises(ValueError, match="same grid"):
        evaluate_reconstruction(gt[:, :, :, :-1], gt)


def test_mismatched_affines_are_rejected():
    gt = MetaTensor(_unit_range_volume(), affine=torch.eye(4))
    shifted = torch.eye(4)
    shifted[2, 3] = 2.0
    pred = MetaTensor(_unit_range_volume(), affine=shifted)
    with pytest.raises(ValueError, match="different affines"):
        evaluate_reconstruction(pred, gt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad):
    gt = _unit_range_volume()
    pred = gt.clone()
    pred[0, 3, 3, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_reconstruction(pred, gt)


def test_volume_without_channel_axis_is_rejected():
    gt = _unit_range_volume()
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        evaluate_reconstruction(gt[0], gt[0])

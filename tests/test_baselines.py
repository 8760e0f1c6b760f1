"""Classical baselines: geometry of the resampling and the interpolation they claim to be."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.baselines import bspline_baseline, linear_baseline, nearest_on_grid, resample_to_grid

SCALE = 5
FINE_SHAPE = (6, 7, 40)  # 8 thick slices of 5 fine ones
N_THICK = FINE_SHAPE[2] // SCALE
BASELINES = {"linear": linear_baseline, "bspline": bspline_baseline}


def _fine_affine() -> torch.Tensor:
    """Oblique, anisotropic, off-origin grid: the baselines must only rely on world coordinates."""
    angle = np.deg2rad(17.0)
    c, s, c2, s2 = np.cos(angle), np.sin(angle), np.cos(angle / 2), np.sin(angle / 2)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 1.2])
    affine[:3, 3] = [-10.0, 5.0, -30.0]
    return torch.as_tensor(affine)


def _thick(values: np.ndarray, fine_affine: torch.Tensor) -> MetaTensor:
    """Thick-slice MetaTensor with SimulateAcquisition's geometry: slice t sits at fine index 5t + 2."""
    affine = fine_affine.clone()
    affine[:3, 2] = fine_affine[:3, 2] * SCALE
    affine[:3, 3] = fine_affine[:3, 3] + fine_affine[:3, 2] * (SCALE - 1) / 2
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=affine)


def _centres() -> np.ndarray:
    return SCALE * np.arange(N_THICK) + (SCALE - 1) / 2


def _random_thick(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, *FINE_SHAPE[:2], N_THICK))


@pytest.mark.parametrize("name", list(BASELINES))
def test_output_is_on_the_target_grid(name):
    fine = _fine_affine()
    out = BASELINES[name](_thick(_random_thick(), fine), None, fine, FINE_SHAPE)
    assert isinstance(out, MetaTensor)
    assert tuple(out.shape) == (1, *FINE_SHAPE)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.affine.numpy(), fine.numpy(), atol=1e-9)


@pytest.mark.parametrize("name", [*BASELINES, "nearest"])
def test_thick_slice_overlays_the_centre_of_its_slab(name):
    fine, values = _fine_affine(), _random_thick(1)
    thick = _thick(values, fine)
    if name == "nearest":
        out = nearest_on_grid(thick, fine, FINE_SHAPE).numpy()
    else:
        out = BASELINES[name](thick, None, fine, FINE_SHAPE).numpy()
    centre_idx = _centres().astype(int)  # 2, 7, 12, ...
    np.testing.assert_allclose(out[..., centre_idx], values, atol=1e-5)


def test_nearest_repeats_each_thick_slice_over_its_whole_slab():
    fine, values = _fine_affine(), _random_thick(2)
    out = nearest_on_grid(_thick(values, fine), fine, FINE_SHAPE).numpy()
    np.testing.assert_allclose(out, np.repeat(values, SCALE, axis=-1), atol=1e-6)


def test_linear_is_exact_for_a_ramp_along_the_slice_axis_and_clamps_the_ends():
    fine = _fine_affine()
    offsets = np.random.default_rng(3).random((1, *FINE_SHAPE[:2], 1))
    values = offsets + 0.25 * _centres()  # linear in the fine slice index
    out = linear_baseline(_thick(values, fine), None, fine, FINE_SHAPE).numpy()
    z = np.arange(FINE_SHAPE[2])
    first, last = int(_centres()[0]), int(_centres()[-1])
    interior = slice(first, last + 1)
    np.testing.assert_allclose(out[..., interior], (offsets + 0.25 * z)[..., interior], atol=1e-5)
    np.testing.assert_allclose(out[..., :first], np.broadcast_to(values[..., :1], out[..., :first].shape), atol=1e-5)
    np.testing.assert_allclose(out[..., last:], np.broadcast_to(values[..., -1:], out[..., last:].shape), atol=1e-5)


def test_resampling_is_interpolation_along_the_slice_axis_only():
    """In-plane grids coincide, so every output line is the 1D interpolation of its own thick line."""
    fine, values = _fine_affine(), _random_thick(4)
    thick = _thick(values, fine)
    source_z = (np.arange(FINE_SHAPE[2]) - (SCALE - 1) / 2) / SCALE  # fine index -> thick index
    linear = linear_baseline(thick, None, fine, FINE_SHAPE).numpy()
    bspline = bspline_baseline(thick, None, fine, FINE_SHAPE).numpy()
    for i in range(FINE_SHAPE[0]):
        for j in range(FINE_SHAPE[1]):
            line = values[0, i, j]
            np.testing.assert_allclose(linear[0, i, j], np.interp(source_z, np.arange(N_THICK), line), atol=1e-5)
            expected = ndimage.map_coordinates(line, [source_z], order=3, mode="nearest")
            np.testing.assert_allclose(bspline[0, i, j], expected, atol=1e-5)


def test_bspline_reproduces_a_quadratic_better_than_linear():
    """Away from the ends the cubic spline is near exact on a quadratic; linear errs by f''/2 d (h - d).

    The edge-replicating boundary ("border" -> scipy "nearest") perturbs the spline coefficients by a
    factor ~0.27 per thick slice from each end, so "interior" starts 3 thick slices in.
    """
    n_thick = 12
    shape = (2, 3, SCALE * n_thick)
    fine = _fine_affine()
    centres = SCALE * np.arange(n_thick) + (SCALE - 1) / 2
    values = np.broadcast_to(((centres - 30.0) / 10.0) ** 2, (1, *shape[:2], n_thick)).copy()
    thick = _thick(values, fine)
    truth = ((np.arange(shape[2]) - 30.0) / 10.0) ** 2
    interior = slice(int(centres[3]), int(centres[-4]) + 1)
    err_linear = np.abs(linear_baseline(thick, None, fine, shape).numpy()[..., interior] - truth[interior]).max()
    err_bspline = np.abs(bspline_baseline(thick, None, fine, shape).numpy()[..., interior] - truth[interior]).max()
    # f'' = 0.02 per voxel^2; worst fine voxel is 2 or 3 voxels from a centre (h = 5): 0.01 * 2 * 3
    assert err_linear == pytest.approx(0.06, abs=1e-4)
    assert err_bspline < err_linear / 10


def test_bad_inputs_are_rejected_with_clear_errors():
    fine = _fine_affine()
    thick = _thick(_random_thick(), fine)
    with pytest.raises(TypeError, match="MetaTensor"):
        linear_baseline(thick.as_tensor(), None, fine, FINE_SHAPE)
    with pytest.raises(ValueError, match="4x4"):
        resample_to_grid(thick, fine[:3], FINE_SHAPE, mode="bilinear")
    with pytest.raises(ValueError, match="three positive sizes"):
        resample_to_grid(thick, fine, FINE_SHAPE[:2], mode="bilinear")

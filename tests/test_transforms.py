"""Degradation transforms: physics, geometry, randomness and input validation."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_whole_phase_encode_lines
from monai.data import MetaTensor, list_data_collate
from monai.transforms import SpatialResample

from scripts.kspace import fft2c, ifft2c
from scripts.transforms import (
    KspaceMotion,
    KspaceMotiond,
    KspaceUndersampling,
    KspaceUndersamplingd,
    RandSimulateAcquisition,
    RandSimulateAcquisitiond,
    SimulateAcquisition,
    SimulateAcquisitiond,
    ThickSliceAcquisition,
    ThickSliceAcquisitiond,
)
from scripts.transforms.motion import max_rotation, rigid_resample, segment_lines
from scripts.transforms.thick_slice import slab_weights


def phantom(shape=(40, 36, 30), spacing=(1.0, 1.2, 0.9), seed=0) -> MetaTensor:
    """A smooth head-like ellipsoid with texture, on an oblique-free but non-trivial affine."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = sum((g / r) ** 2 for g, r in zip(grids, (0.8, 0.75, 0.85), strict=True))
    volume = (radius < 1).astype(np.float32) * (1.0 + 0.3 * np.sin(6 * grids[0]) * np.cos(5 * grids[1]))
    volume += 0.02 * rng.random(shape, dtype=np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20.0, 15.0, -7.5)
    data = torch.as_tensor(volume, dtype=torch.float32)[None]
    return MetaTensor(data, affine=torch.as_tensor(affine), meta={"filename_or_obj": "x.nii"})


# --- k-space ---------------------------------------------------------------------------------


def test_kspace_round_trip_and_centring():
    image = torch.rand(2, 17, 12, 5, dtype=torch.float64)
    kspace = fft2c(image, (1, 2))
    assert torch.allclose(ifft2c(kspace, (1, 2)).real, image, atol=1e-12)
    # DC sits at n // 2 and equals sum / sqrt(N) for the orthonormal transform
    dc = kspace[:, 17 // 2, 12 // 2, :]
    assert torch.allclose(dc.real, image.sum(dim=(1, 2)) / math.sqrt(17 * 12), atol=1e-10)
    # energy is preserved
    assert torch.allclose((kspace.abs() ** 2).sum(), (image**2).sum())


def test_full_sampling_is_exact_round_trip():
    img = phantom()
    transform = KspaceUndersampling(acceleration=1)
    out = transform(img)
    assert bool(transform.mask.all())
    assert torch.allclose(out, img, atol=1e-5)


# --- thick slices ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slice_boxcar_values_shape_and_affine(axis):
    img = phantom()
    out = ThickSliceAcquisition(scale=4, slice_axis=axis)(img)
    n = img.shape[axis + 1]
    assert out.shape[axis + 1] == n // 4
    fine = torch.movedim(img, axis + 1, -1)[..., : (n // 4) * 4]
    expected = fine.reshape(*fine.shape[:-1], n // 4, 4).mean(-1)
    assert torch.allclose(torch.movedim(out, axis + 1, -1), expected, atol=1e-6)
    # slab k sits at the mean world position of its fine voxels
    for k in (0, n // 4 - 1):
        index = torch.zeros(4, dtype=torch.float64)
        index[axis], index[3] = k, 1
        fine_positions = []
        for i in range(4 * k, 4 * k + 4):
            fine_index = torch.zeros(4, dtype=torch.float64)
            fine_index[axis], fine_index[3] = i, 1
            fine_positions.append(img.affine @ fine_index)
        assert torch.allclose(out.affine @ index, torch.stack(fine_positions).mean(0), atol=1e-9)
    assert out.meta["filename_or_obj"] == "x.nii"
    assert out.meta["acquisition"]["scale"] == 4.0


def test_thick_slices_overlay_the_fine_volume_in_world_coordinates():
    """Resampling the thick volume onto the fine grid puts every slab back where it was averaged."""
    img = phantom(shape=(24, 20, 30))
    scale = 5
    # a volume constant within each slab: the thick acquisition must be lossless for it
    slab_values = torch.arange(6, dtype=torch.float32).repeat_interleave(scale)
    blocky = MetaTensor(img.as_tensor() * 0 + slab_values, affine=img.affine)
    thick = ThickSliceAcquisition(scale=scale, slice_axis=2)(blocky)
    back = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float32)(
        thick, dst_affine=img.affine, spatial_size=img.shape[1:]
    )
    assert torch.allclose(torch.as_tensor(back.affine), torch.as_tensor(img.affine).double())
    assert torch.allclose(back.as_tensor(), blocky.as_tensor(), atol=1e-5)
    # and resampled linearly, slab centres coincide with the averaged fine voxels of a smooth volume
    thick_img = ThickSliceAcquisition(scale=scale, slice_axis=2)(img)
    linear = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        thick_img, dst_affine=img.affine, spatial_size=img.shape[1:]
    )
    centres = [k * scale + scale // 2 for k in range(6)]
    assert torch.allclose(linear[..., centres], thick_img.as_tensor(), atol=1e-4)


def test_fractional_scale_and_gaussian_profile():
    for profile in ("boxcar", "gaussian"):
        weights = slab_weights(23, 2.5, profile)
        assert weights.shape == (9, 23)
        assert torch.allclose(weights.sum(1), torch.ones(9, dtype=torch.float64))
    boxcar = slab_weights(10, 2.5, "boxcar")
    assert torch.allclose(boxcar[0, :3], torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    gaussian = slab_weights(60, 10, "gaussian")[2]  # centre 24.5, FWHM 10 voxels
    assert gaussian[20:30].sum() > 0.7 and gaussian[20:30].sum() < 0.8  # +-FWHM/2 holds 76%
    out = ThickSliceAcquisition(scale=2.5, slice_axis=1)(phantom())
    assert out.shape[2] == 36 // 2.5 // 1
    assert math.isclose(float(out.affine[1, 1]), 1.2 * 2.5)


# --- motion ----------------------------------------------------------------------------------


def test_zero_motion_is_exactly_the_identity():
    img = phantom()
    out = KspaceMotion(severity=0.0)(img)
    assert torch.equal(out.as_tensor(), img.as_tensor())
    assert torch.equal(out.affine, img.affine)


def test_rigid_resample_conventions():
    image = torch.zeros(1, 33, 33, dtype=torch.float64)
    image[0, 20, 16] = 1.0  # 4 voxels along +A from the centre (16, 16)
    fov = torch.tensor([33.0, 33.0], dtype=torch.float64)
    rotated = rigid_resample(image, torch.tensor([math.pi / 2]), torch.zeros(1, 2), fov)
    assert tuple(torch.nonzero(rotated[0].abs() > 0.5)[0].tolist()) == (16, 20)  # +A turns into +B
    shifted = rigid_resample(image, torch.zeros(1), torch.tensor([[-3.0, 2.0]]), fov)
    assert torch.allclose(shifted[0], torch.roll(image[0], (-3, 2), (0, 1)), atol=1e-9)


def test_segment_orderings_cover_every_line_once():
    for ordering in ("sequential", "interleaved"):
        lines = segment_lines(50, 6, ordering)
        assert sorted(np.concatenate(lines).tolist()) == list(range(50))
    assert segment_lines(10, 3, "interleaved")[1].tolist() == [1, 4, 7]
    assert segment_lines(10, 3, "sequential")[0].tolist() == [0, 1, 2, 3]


def test_motion_poses_respect_the_severity_bound():
    img = phantom()
    severity = 0.05
    transform = KspaceMotion(severity=severity, num_segments=6, inter_slice=0.0).set_random_state(3)
    transform.randomize(img.shape[3])
    fov = torch.tensor([40 * 1.0, 36 * 1.2], dtype=torch.float64)
    lines = segment_lines(40, 6, "sequential")
    angles, shifts = transform._segment_motion(lines, fov)
    assert (shifts.abs() <= severity * fov + 1e-9).all()
    corner = torch.linalg.norm(fov / 2)
    assert (2 * corner * torch.sin(angles.abs() / 2) <= severity * fov.min() + 1e-9).all()
    assert math.isclose(2 * corner * math.sin(max_rotation(fov, severity) / 2), severity * float(fov.min()))
    centre_segment = 2  # lines 14-20 hold the centre line 20 = 40 // 2
    assert (angles[:, centre_segment] == 0).all() and (shifts[:, centre_segment] == 0).all()


def test_motion_corrupts_kspace_consistently():
    img = phantom()
    transform = KspaceMotion(severity=0.05, num_segments=4).set_random_state(0)
    out = transform(img)
    assert out.shape == img.shape and torch.equal(out.affine, img.affine)
    assert torch.allclose(ifft2c(transform.kspace, (1, 2)).abs(), out, atol=1e-5)
    error = (out - img).abs().mean() / img.abs().mean()
    assert error > 0.02  # visibly corrupted
    # the k-space centre segment is in the reference pose: the central lines match the clean k-space
    clean = fft2c(img.as_tensor(), (1, 2))
    assert torch.allclose(transform.kspace[:, 20, :, :], clean[:, 20, :, :], atol=1e-4)


def test_inter_slice_motion_moves_whole_slices():
    img = phantom()
    out = KspaceMotion(severity=0.0, num_segments=1, inter_slice=0.05).set_random_state(1)(img)
    # a single segment means no ghosting: every slice is the original slice moved rigidly
    assert not torch.allclose(out, img, atol=1e-3)
    slice_sums = img.sum(dim=(1, 2))
    assert torch.allclose(out.sum(dim=(1, 2)), slice_sums, rtol=0.05, atol=0.05 * float(slice_sums.max()))


def test_more_motion_means_more_corruption():
    img = phantom()
    errors = [float((KspaceMotion(severity=s).set_random_state(5)(img) - img).abs().mean()) for s in (0.01, 0.03, 0.06)]
    assert errors[0] < errors[1] < errors[2]


# --- undersampling ---------------------------------------------------------------------------


@pytest.mark.parametrize(("acceleration", "centre"), [(4, 0.08), (8, 0.04)])
def test_random_mask_realised_acceleration_and_centre(acceleration, centre):
    img = MetaTensor(torch.rand(1, 256, 8, 3))
    realised = []
    for seed in range(40):
        transform = KspaceUndersampling(acceleration=acceleration).set_random_state(seed)
        transform(img)
        lines = transform.mask.reshape(-1)
        realised.append(256 / float(lines.sum()))
        n_centre = round(256 * centre)
        start = (256 - n_centre + 1) // 2
        assert bool(lines[start : start + n_centre].all())
        assert start <= 128 < start + n_centre  # the DC line is in the fully sampled centre
    assert abs(np.mean(realised) - acceleration) / acceleration < 0.1


def test_equispaced_mask_and_measured_lines():
    img = phantom(shape=(64, 20, 6))
    transform = KspaceUndersampling(acceleration=4, pattern="equispaced").set_random_state(0)
    out = transform(img)
    assert abs(64 / float(transform.mask.sum()) - 4) < 0.6
    full = fft2c(img.as_tensor(), (1, 2))
    assert torch.equal(transform.kspace, torch.where(transform.mask, full, torch.zeros_like(full)))
    assert torch.allclose(out, ifft2c(transform.kspace, (1, 2)).abs(), atol=1e-6)
    assert out.meta["acquisition"]["acceleration"] == 4.0 and out.meta["acquisition"]["pe_axis"] == 0


def test_pe_axis_sets_the_mask_direction():
    img = phantom()
    transform = KspaceUndersampling(acceleration=4, slice_axis=0, pe_axis=2).set_random_state(0)
    transform(img)
    assert transform.mask.shape == (1, 1, 1, 30)


# --- composite -------------------------------------------------------------------------------


def test_composite_follows_the_physical_order():
    img = phantom()
    params = dict(scale=3, motion=0.03, acceleration=4, num_segments=4)
    composite = SimulateAcquisition(seed=7, **params)
    out = composite(img)
    rng = np.random.RandomState(7)
    thick = ThickSliceAcquisition(3)(img)
    motion = KspaceMotion(0.03, num_segments=4).set_random_state(state=rng)
    moved = motion(thick)
    undersampling = KspaceUndersampling(4).set_random_state(state=rng)
    expected = undersampling(moved, kspace=motion.kspace)
    assert torch.equal(out.as_tensor(), expected.as_tensor())
    assert torch.equal(composite.mask, undersampling.mask)
    assert torch.allclose(out.affine, thick.affine)
    assert out.meta["acquisition"] | {} == expected.meta["acquisition"]
    assert {"scale", "motion", "acceleration", "center_fraction", "slice_axis", "pe_axis"} <= set(
        out.meta["acquisition"]
    )


def test_preset_is_deterministic_and_seeded():
    img = phantom()
    preset = SimulateAcquisition(scale=2, motion=0.05, acceleration=4, seed=1)
    first, second = preset(img), preset(img)
    assert torch.equal(first.as_tensor(), second.as_tensor())
    other = SimulateAcquisition(scale=2, motion=0.05, acceleration=4, seed=2)(img)
    assert not torch.equal(first.as_tensor(), other.as_tensor())


def test_zero_severity_composite_is_the_thick_slice_volume():
    img = phantom()
    out = SimulateAcquisition(scale=2, motion=0.0, acceleration=1)(img)
    assert torch.allclose(out, ThickSliceAcquisition(2)(img), atol=1e-5)
    identity = SimulateAcquisition(scale=1, motion=0.0, acceleration=1)(img)
    assert torch.allclose(identity, img, atol=1e-5)
    assert torch.allclose(identity.affine, img.affine.double())


def test_random_form_draws_within_ranges_and_is_reproducible():
    img = phantom(shape=(32, 32, 40))
    transform = RandSimulateAcquisition(scale_range=(2, 8), motion_range=(0, 0.06), accelerations=(1, 2, 4, 8))
    seen = set()
    for seed in range(6):
        out = transform.set_random_state(seed)(img)
        acq = out.meta["acquisition"]
        assert 2 <= acq["scale"] <= 8 and 0 <= acq["motion"] <= 0.06 and acq["acceleration"] in (1, 2, 4, 8)
        assert out.shape[3] == math.floor(40 / acq["scale"] + 1e-9)
        seen.add(acq["acceleration"])
        again = transform.set_random_state(seed)(img)
        assert torch.equal(out.as_tensor(), again.as_tensor())
    assert len(seen) > 1


def test_still_prob_gives_motion_free_acquisitions_without_changing_other_draws():
    img = phantom(shape=(32, 32, 40))
    ranges = {"scale_range": (2, 8), "motion_range": (0.01, 0.06), "accelerations": (1, 2, 4, 8)}
    motions = []
    for seed in range(40):
        default = RandSimulateAcquisition(**ranges).set_random_state(seed)
        mixed = RandSimulateAcquisition(**ranges, still_prob=0.3).set_random_state(seed)
        default.randomize()
        mixed.randomize()
        # the still draw comes after the others: scale and acceleration are the default stream's
        assert mixed.params.scale == default.params.scale and mixed.params.acceleration == default.params.acceleration
        assert mixed.params.motion in (0.0, default.params.motion)
        motions.append(mixed.params.motion)
    assert 5 <= motions.count(0.0) <= 20  # about 30% of 40
    still = RandSimulateAcquisition(**ranges, still_prob=1.0).set_random_state(0)(img)
    assert still.meta["acquisition"]["motion"] == 0.0


def test_clean_prob_gives_fully_sampled_motion_free_acquisitions():
    img = phantom(shape=(32, 32, 40))
    ranges = {"scale_range": (2, 8), "motion_range": (0.01, 0.06), "accelerations": (2, 4, 8)}
    draws = []
    for seed in range(40):
        transform = RandSimulateAcquisition(**ranges, clean_prob=0.5).set_random_state(seed)
        transform.randomize()
        draws.append((transform.params.acceleration, transform.params.motion))
    clean = draws.count((1.0, 0.0))
    assert 10 <= clean <= 30  # about half of 40; the others keep their drawn R >= 2 and motion > 0
    assert all(a >= 2 and m > 0 for a, m in draws if (a, m) != (1.0, 0.0))
    out = RandSimulateAcquisition(**ranges, clean_prob=1.0).set_random_state(0)(img)
    assert out.meta["acquisition"]["acceleration"] == 1.0 and out.meta["acquisition"]["motion"] == 0.0


def test_random_pe_axis_draws_both_in_plane_axes_without_changing_other_draws():
    img = phantom(shape=(32, 32, 40))
    ranges = {"scale_range": (2, 8), "motion_range": (0.01, 0.06), "accelerations": (4, 8)}
    axes = []
    for seed in range(20):
        default = RandSimulateAcquisition(**ranges).set_random_state(seed)
        drawn = RandSimulateAcquisition(**ranges, random_pe_axis=True).set_random_state(seed)
        default.randomize()
        drawn.randomize()
        # the axis draw comes last: scale, motion and acceleration are the default stream's
        assert (drawn.params.scale, drawn.params.motion, drawn.params.acceleration) == (
            default.params.scale,
            default.params.motion,
            default.params.acceleration,
        )
        axes.append(drawn.params.pe_axis)
    assert set(axes) == {0, 1}  # the two in-plane axes of axial slices, never the slice axis
    # the bundle command line passes `--sampling#random_pe_axis false` as a string
    assert not RandSimulateAcquisition(random_pe_axis="false").random_pe_axis
    samples = {}
    for seed in range(20):
        transform = RandSimulateAcquisition(**ranges, random_pe_axis=True).set_random_state(seed)
        out = transform(img)
        pe_axis = out.meta["acquisition"]["pe_axis"]
        assert_whole_phase_encode_lines(transform.mask, pe_axis)
        as_dict = RandSimulateAcquisitiond("image", **ranges, random_pe_axis=True).set_random_state(seed)
        sample = as_dict({"image": img})
        assert sample["image"].meta["acquisition"]["pe_axis"] == pe_axis
        # a stored sample's mask has the k-space's shape, whichever axis was encoded
        assert sample["image_mask"].shape == sample["image_kspace"].shape
        assert torch.equal(sample["image_mask"], transform.mask.expand_as(sample["image_mask"]))
        samples.setdefault(pe_axis, sample)
    batch = list_data_collate([samples[0], samples[1]])  # the two axes in one training batch
    assert batch["image_mask"].shape == (2, *samples[0]["image_kspace"].shape)


# --- array / dictionary equivalence ----------------------------------------------------------


def test_array_and_dictionary_versions_agree():
    img = phantom()
    assert torch.equal(
        ThickSliceAcquisitiond("image", scale=3)({"image": img})["image"], ThickSliceAcquisition(scale=3)(img)
    )

    motion = KspaceMotion(0.04).set_random_state(4)(img)
    motion_d = KspaceMotiond("image", 0.04).set_random_state(4)({"image": img})
    assert torch.equal(motion_d["image"], motion)
    assert "image_kspace" in motion_d

    array = KspaceUndersampling(4).set_random_state(4)
    expected = array(img)
    out_d = KspaceUndersamplingd("image", 4).set_random_state(4)({"image": img})
    assert torch.equal(out_d["image"], expected)
    assert torch.equal(out_d["image_mask"], array.mask) and torch.equal(out_d["image_kspace"], array.kspace)

    preset = SimulateAcquisition(scale=2, motion=0.03, acceleration=8, seed=3)
    preset_d = SimulateAcquisitiond(["image", "other"], scale=2, motion=0.03, acceleration=8, seed=3)
    d = preset_d({"image": img, "other": img.clone(), "label": 1})
    assert torch.equal(d["image"], preset(img)) and torch.equal(d["other"], d["image"])
    assert torch.equal(d["image_kspace"], preset.kspace) and d["label"] == 1

    rand = RandSimulateAcquisition().set_random_state(9)
    rand_d = RandSimulateAcquisitiond(["image", "other"], keep_thick=True).set_random_state(9)
    d = rand_d({"image": img, "other": img.clone()})
    assert torch.equal(d["image"], rand(img)) and torch.equal(d["other"], d["image"])
    # the clean thick slices share the drawn scale: the in-plane restoration target
    assert torch.equal(d["image_thick"], ThickSliceAcquisition(rand.params.scale)(img))
    assert d["image_thick"].shape == d["image"].shape


def test_motion_then_undersampling_in_dictionaries_keeps_the_phase():
    img = phantom()
    d = KspaceMotiond("image", 0.05).set_random_state(0)({"image": img})
    motion_kspace = d["image_kspace"]
    d = KspaceUndersamplingd("image", 4).set_random_state(0)(d)
    expected = torch.where(d["image_mask"], motion_kspace, torch.zeros_like(motion_kspace))
    assert torch.equal(d["image_kspace"], expected)


def test_inputs_are_not_modified():
    img = phantom()
    before = img.clone()
    SimulateAcquisition(scale=3, motion=0.05, acceleration=4)(img)
    assert torch.equal(img.as_tensor(), before.as_tensor()) and torch.equal(img.affine, before.affine)
    assert "acquisition" not in img.meta


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ThickSliceAcquisition(scale=2)(torch.rand(1, 8, 8)), r"\(C, X, Y, Z\).*3 dimensions"),
        (lambda: KspaceMotion(0.03)(torch.rand(1, 1, 8, 8, 8)), "5 dimensions"),
        (lambda: SimulateAcquisition(scale=2)(torch.full((1, 8, 8, 8), float("nan"))), "non-finite"),
        (lambda: KspaceUndersampling(4)(torch.tensor([[[[float("inf")]]]])), "non-finite"),
        (lambda: ThickSliceAcquisition(scale=0.5), "scale must be >= 1"),
        (lambda: SimulateAcquisition(scale=0.9), "scale must be >= 1"),
        (lambda: ThickSliceAcquisition(scale=2, slice_axis=3), "slice_axis must be a spatial axis 0, 1 or 2"),
        (lambda: KspaceMotion(0.03, slice_axis=-1), "slice_axis must be a spatial axis"),
        (lambda: KspaceUndersampling(4, slice_axis=2, pe_axis=2), "pe_axis .* must be an in-plane axis"),
        (lambda: KspaceUndersampling(0.5), "acceleration must be a number >= 1"),
        (lambda: KspaceMotion(-0.1), "fraction of the field of view"),
        (lambda: ThickSliceAcquisition(scale=20)(torch.rand(1, 8, 8, 8)), "fewer than one slab"),
        (lambda: SimulateAcquisition(scale=2, ordering="random"), "ordering must be one of"),
        (lambda: RandSimulateAcquisition(scale_range=(0.5, 2)), "scale must be >= 1"),
        (lambda: RandSimulateAcquisition(still_prob=1.5), "still_prob must be a probability"),
        (lambda: RandSimulateAcquisition(clean_prob=-0.1), "clean_prob must be a probability"),
        (lambda: RandSimulateAcquisition(random_pe_axis="sometimes"), "random_pe_axis must be true or false"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_gpu_like_on_cpu():
    img = phantom()
    cpu = SimulateAcquisition(scale=2, motion=0.03, acceleration=4, seed=0)(img)
    gpu = SimulateAcquisition(scale=2, motion=0.03, acceleration=4, seed=0)(img.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)

"""Re-acquisition consistency (scripts.consistency): a reconstruction averaged back over the scan's slabs."""

import pytest
import torch
from monai.data import MetaTensor

from scripts.consistency import reacquire
from scripts.inference import isotropic_affine


def oblique_scan(slice_axis: int, num_slices: int = 6) -> MetaTensor:
    """A random scan with 4 mm slices along ``slice_axis``, 1 mm in plane, rotated and shifted in world space."""
    shape = [20, 18, 16]
    shape[slice_axis] = num_slices
    spacing = torch.ones(3, dtype=torch.float64)
    spacing[slice_axis] = 4.0
    angle = torch.tensor(0.3, dtype=torch.float64)
    rotation = torch.tensor(
        [[torch.cos(angle), -torch.sin(angle), 0], [torch.sin(angle), torch.cos(angle), 0], [0, 0, 1]],
        dtype=torch.float64,
    )
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rotation @ torch.diag(spacing)
    affine[:3, 3] = torch.tensor([-12.0, 30.5, 7.25])
    generator = torch.Generator().manual_seed(slice_axis)
    return MetaTensor(torch.rand([1, *shape], generator=generator, dtype=torch.float64), affine=affine)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_a_reconstruction_constant_over_each_slab_reacquires_to_the_scan(slice_axis):
    scan = oblique_scan(slice_axis)
    recon = MetaTensor(
        scan.repeat_interleave(4, dim=slice_axis + 1), affine=isotropic_affine(scan.affine, slice_axis, 4.0)
    )
    thick = reacquire(recon, scan)
    torch.testing.assert_close(thick.as_tensor(), scan.as_tensor())
    torch.testing.assert_close(thick.affine, scan.affine)
    # a detail that averages out over each slab (what a reconstruction may add) is invisible after re-acquisition
    detail = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).repeat(scan.shape[slice_axis + 1])
    detail = detail.view([-1 if a == slice_axis else 1 for a in range(3)])[None]
    torch.testing.assert_close(reacquire(recon + 0.1 * detail, scan).as_tensor(), scan.as_tensor())


def test_reacquire_refuses_grids_that_do_not_match_the_scan():
    scan = oblique_scan(2)
    recon = MetaTensor(scan.repeat_interleave(4, dim=3), affine=isotropic_affine(scan.affine, 2, 4.0))
    shifted = recon.clone()
    shifted.affine = recon.affine.clone()
    shifted.affine[0, 3] += 0.5
    with pytest.raises(ValueError, match="does not tile the scan's slabs"):
        reacquire(shifted, scan)
    with pytest.raises(ValueError, match="differ in plane"):
        reacquire(recon[:, :10], scan)
    with pytest.raises(ValueError, match="MetaTensor"):
        reacquire(recon.as_tensor(), scan)

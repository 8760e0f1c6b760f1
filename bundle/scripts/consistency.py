"""Re-acquisition consistency: the check of a reconstruction of a real scan, which has no ground truth.

A reconstruction of a thick-slice scan should explain the scan: averaged back over each acquired
slab (the thick-slice operator of :mod:`scripts.transforms.thick_slice`) it should give the
scan's own slices again. :func:`reacquire` does that averaging and checks that the result lands
on the scan's grid, so the two can be scored voxel to voxel with
:func:`scripts.metrics.evaluate_reconstruction`.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor

from .inference import slice_geometry
from .transforms import ThickSliceAcquisition

# Output and scan grids agree to this many mm (float32 affines of a 512-voxel grid round off ~1e-4 mm).
GRID_TOLERANCE_MM = 1e-3


def reacquire(recon: MetaTensor, scan: MetaTensor) -> MetaTensor:
    """``recon`` averaged over the slabs of ``scan``: a ``(C, X, Y, Z)`` MetaTensor on the scan's grid.

    ``recon`` must be a reconstruction of ``scan`` as the bundle writes it: the scan's in-plane grid
    (no ``target_spacing`` resampling) and, along the scan's slice axis, voxels that tile the
    acquired slabs. Raises ``ValueError`` otherwise, naming what differs.
    """
    for name, image in (("recon", recon), ("scan", scan)):
        if not isinstance(image, MetaTensor) or image.ndim != 4:
            raise ValueError(f"{name} must be a channel-first (C, X, Y, Z) MetaTensor with its affine.")
    slice_axis, scan_spacing = slice_geometry(scan.affine)
    _, recon_spacing = slice_geometry(recon.affine)
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    if [recon.shape[a + 1] for a in in_plane] != [scan.shape[a + 1] for a in in_plane]:
        raise ValueError(
            f"recon {tuple(recon.shape[1:])} and scan {tuple(scan.shape[1:])} differ in plane; "
            "reconstruct without target_spacing so the in-plane grids coincide."
        )
    scale = float(scan_spacing[slice_axis] / recon_spacing[slice_axis])
    thick = ThickSliceAcquisition(scale=scale, slice_axis=slice_axis)(recon)
    if thick.shape[1:] != scan.shape[1:]:
        raise ValueError(
            f"recon re-acquired at scale {scale:.4g} gives {tuple(thick.shape[1:])}, "
            f"not the scan's {tuple(scan.shape[1:])}."
        )
    offset = torch.as_tensor(thick.affine, dtype=torch.float64) - torch.as_tensor(scan.affine, dtype=torch.float64)
    corner_shift = offset[:3] @ torch.tensor([*scan.shape[1:], 1], dtype=torch.float64)
    if offset[:3, 3].abs().max() > GRID_TOLERANCE_MM or corner_shift.abs().max() > GRID_TOLERANCE_MM:
        raise ValueError(
            "recon does not tile the scan's slabs: re-acquired, its grid is off the scan's by up to "
            f"{max(offset[:3, 3].abs().max(), corner_shift.abs().max()):.3g} mm.\n"
            f"re-acquired affine=\n{thick.affine.numpy()}\nscan affine=\n{scan.affine.numpy()}"
        )
    thick.affine = scan.affine
    return thick

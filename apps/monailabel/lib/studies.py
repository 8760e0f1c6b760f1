"""Datastore scans turned into fine-tuning volumes, with the thick-slice axis last.

The bundle's training configs reorient every volume to RAS and simulate slices along the last
axis. A datastore scan may be acquired along any axis, so each one is rewritten with its slice axis
(largest spacing, as in inference) last and a diagonal affine that RAS reorientation leaves as it is.
Patches are taken in voxel space, so nothing else of the geometry matters for training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage


def prepare_volumes(images: list[str], folder: str | os.PathLike) -> list[str]:
    """Write each scan of ``images`` as ``folder/<index>_<name>.nii.gz``, slice axis last; return the paths.

    A scan the reconstruction could not take (not one finite 3D volume) stops the run with its name.
    """
    from scripts.inference import CheckScand, scan_name, slice_geometry

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        volume = CheckScand(keys="image")({"image": LoadImage(image_only=True, ensure_channel_first=True)(image)})
        volume = volume["image"]
        slice_axis, spacing = slice_geometry(volume.affine)
        in_plane = [axis for axis in range(3) if axis != slice_axis]
        array = torch.movedim(volume[0].as_tensor(), slice_axis, -1).numpy().astype(np.float32)
        affine = np.diag([*(float(spacing[axis]) for axis in in_plane), float(spacing[slice_axis]), 1.0])
        path = folder / f"{index:03d}_{scan_name(image)}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(path))
        written.append(str(path))
    return written


def write_datalist(volumes: list[str], path: str | os.PathLike) -> str:
    """A MONAI datalist training and validating on the same scans: there is no held-out ground truth.

    Validation then measures how well the simulated degradation of these scans is undone (with a
    fixed seed), not how the model generalises.
    """
    items = [{"image": volume} for volume in volumes]
    Path(path).write_text(json.dumps({"training": items, "validation": items}, indent=2))
    return str(path)

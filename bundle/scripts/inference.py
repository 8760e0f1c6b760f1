"""Inference plumbing for ``configs/inference.json``: finding scans, checking them, geometry and saving.

The network works on a stack with the thick-slice axis last. :class:`ReconstructionInferer`
finds the slice axis (largest spacing), moves it last, runs the pipeline and builds the output
affine, so the isotropic result overlays the input in world coordinates whatever the input's
orientation. :class:`SaveReconstructiond` writes ``<output_dir>/<input name>_recon.nii.gz``
atomically and never replaces an existing file unless asked.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.data.utils import collate_meta_tensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, Spacing
from monai.utils import ImageMetaKey

from .dicom_series import check_series_folder
from .flags import as_bool
from .networks.volume import output_size

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIX = "_recon.nii.gz"


def scan_name(path: str | os.PathLike) -> str:
    """A scan's name: the NIfTI file name without its suffix, or the DICOM folder's name."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_path(image_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{scan_name(image_path)}{OUTPUT_SUFFIX}"


def find_scans(input_image: str | os.PathLike) -> list[dict[str, str]]:
    """Datalist for ``input_image``: a NIfTI file, a folder of NIfTI files, or one DICOM series folder.

    A DICOM folder must hold one evenly spaced series (:func:`scripts.dicom_series.check_series_folder`).
    """
    path = Path(input_image).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input_image '{path}' does not exist; expected a NIfTI file (.nii or .nii.gz) or a DICOM series folder."
        )
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise ValueError(
                f"input_image '{path}' is not a NIfTI file (.nii or .nii.gz); for DICOM pass the series folder."
            )
        return [{"image": str(path)}]
    niftis = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if niftis:
        return [{"image": str(p)} for p in niftis]
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise ValueError(f"input_image folder '{path}' is empty; expected a DICOM series or NIfTI files.")
    not_dicom = [p.name for p in files if not pydicom.misc.is_dicom(p)]
    if not_dicom:
        raise ValueError(
            f"input_image folder '{path}' holds {len(not_dicom)} file(s) that are not DICOM "
            f"(e.g. '{not_dicom[0]}'); expected one DICOM series or NIfTI files."
        )
    check_series_folder(path, files)
    return [{"image": str(path)}]


def check_outputs(datalist: list[dict[str, str]], output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Fail before any work if an output would silently replace an existing file."""
    existing = [str(output_path(item["image"], output_dir)) for item in datalist]
    existing = [p for p in existing if os.path.exists(p)]
    if existing and not as_bool(overwrite, "overwrite"):
        raise FileExistsError(f"output {existing[0]} already exists; pass '--overwrite true' to replace it.")


class CheckScand(MapTransform):
    """Reject what the reconstruction cannot take: anything but one finite 3D volume."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = img.meta.get(ImageMetaKey.FILENAME_OR_OBJ, key) if isinstance(img, MetaTensor) else key
            spatial = tuple(img.shape[1:])
            if img.shape[0] != 1:
                raise ValueError(
                    f"'{source}' holds {img.shape[0]} volumes of shape {spatial} (a {len(spatial) + 1}D image); "
                    "expected a single 3D volume."
                )
            if len(spatial) != 3:
                raise ValueError(f"'{source}' is a {len(spatial)}D image of shape {spatial}; expected a 3D volume.")
            if min(spatial) < 2:
                raise ValueError(f"'{source}' has shape {spatial}; expected at least 2 voxels along every axis.")
            non_finite = int((~torch.isfinite(img)).sum())
            if non_finite:
                raise ValueError(
                    f"'{source}' contains {non_finite} NaN or infinite values; expected finite intensities."
                )
            d[key] = img.float()
        return d


def slice_geometry(affine: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The slice axis (largest spacing; the last such axis on ties) and the three spacings."""
    spacing = torch.linalg.norm(torch.as_tensor(affine, dtype=torch.float64)[:3, :3], dim=0)
    largest = spacing.max()
    slice_axis = max(i for i in range(3) if spacing[i] >= largest * (1 - 1e-6))
    return slice_axis, spacing


def isotropic_affine(affine: torch.Tensor, slice_axis: int, scale: float) -> torch.Tensor:
    """Affine of the reconstruction grid: output voxel ``j`` sits at thick index ``-0.5 + (j + 0.5) / scale``.

    The output voxels tile the extent of the acquired slabs (see
    :func:`scripts.networks.volume.output_positions`).
    """
    index_map = torch.eye(4, dtype=torch.float64)
    index_map[slice_axis, slice_axis] = 1.0 / scale
    index_map[slice_axis, 3] = -0.5 + 0.5 / scale
    return torch.as_tensor(affine, dtype=torch.float64) @ index_map


class ReconstructionInferer(Inferer):
    """Run the PR-INR pipeline on a loaded scan ``(1, 1, X, Y, Z)`` in any orientation.

    Args:
        acceleration: acceleration of the acquisition (1 when fully sampled or unknown).
        motion: expected motion severity (fraction of the field of view; 0 when unknown).
        target_spacing: isotropic output spacing in mm; default the finest in-plane spacing.
        seed: seed of the diffusion stage's sampling noise.
    """

    def __init__(
        self, acceleration: float = 1.0, motion: float = 0.0, target_spacing: float | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.acceleration = float(acceleration)
        self.motion = float(motion)
        self.target_spacing = None if target_spacing is None else float(target_spacing)
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"target_spacing must be a positive spacing in mm, got {target_spacing}.")
        self.seed = int(seed)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> MetaTensor:
        if inputs.ndim != 5 or inputs.shape[:2] != (1, 1):
            raise ValueError(f"expected one single-channel volume (1, 1, X, Y, Z), got shape {tuple(inputs.shape)}.")
        image = inputs[0]
        if not isinstance(image, MetaTensor):
            image = MetaTensor(image)
        affine = image.affine[0] if image.affine.ndim == 3 else image.affine
        image.affine = affine
        slice_axis, spacing = slice_geometry(affine)
        in_plane = [a for a in range(3) if a != slice_axis]
        target = self.target_spacing or float(spacing[in_plane].min())
        if not torch.allclose(spacing[in_plane], torch.full((2,), target, dtype=torch.float64), rtol=1e-3):
            pixdim = [target] * 3
            pixdim[slice_axis] = float(spacing[slice_axis])
            image = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border")(image)
            affine = image.affine
        scale = float(spacing[slice_axis]) / target
        if scale < 1.2:
            logger.warning(
                "the input is nearly isotropic (slice spacing %.3g mm, target %.3g mm): no thick slices to fill in",
                float(spacing[slice_axis]),
                target,
            )
        scale = max(scale, 1.0)
        stack = torch.movedim(image.as_tensor(), slice_axis + 1, -1)[None]
        logger.info(
            "reconstructing %s: %d slices %.3g mm apart along axis %d, in-plane %s at %.3g mm -> %d slices",
            image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "scan"),
            stack.shape[-1],
            float(spacing[slice_axis]),
            slice_axis,
            tuple(stack.shape[2:4]),
            target,
            output_size(stack.shape[-1], scale),
        )
        with torch.no_grad():
            recon = network(stack, scale, self.acceleration, self.motion, seed=self.seed)
        recon = torch.movedim(recon[0], -1, slice_axis + 1)
        out = MetaTensor(recon.float(), meta=dict(image.meta))
        out.affine = isotropic_affine(affine, slice_axis, scale)
        return collate_meta_tensor([out])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class SaveReconstructiond(MapTransform):
    """Write ``key`` to ``<output_dir>/<input name>_recon.nii.gz`` as float32 NIfTI, atomically.

    The file appears complete or not at all (written to a temporary file, then renamed), and an
    existing file is only replaced when ``overwrite`` is True.
    """

    def __init__(self, keys, output_dir: str | os.PathLike, overwrite: bool = False) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.overwrite = as_bool(overwrite, "overwrite")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            target = output_path(img.meta[ImageMetaKey.FILENAME_OR_OBJ], self.output_dir)
            if target.exists() and not self.overwrite:
                raise FileExistsError(f"output {target} already exists; pass '--overwrite true' to replace it.")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            writer = NibabelWriter(output_dtype=np.float32)
            writer.set_data_array(img, channel_dim=0)
            writer.set_metadata({"affine": img.affine, "original_affine": img.affine}, resample=False)
            handle, temporary = tempfile.mkstemp(suffix=OUTPUT_SUFFIX, dir=self.output_dir)
            os.close(handle)
            try:
                writer.write(temporary, verbose=False)
                os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
                os.replace(temporary, target)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
            logger.info("saved %s %s", target, tuple(img.shape[1:]))
        return d


class RunSummaryHandler:
    """Log the wall time and peak resident memory of the whole run when the engine completes."""

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _start(self, engine) -> None:
        self.started = time.perf_counter()

    def _summary(self, engine) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        logger.info(
            "reconstructed %d scan(s) in %.1f s, peak resident memory %.0f MB",
            engine.state.iteration,
            time.perf_counter() - self.started,
            peak_mb,
        )

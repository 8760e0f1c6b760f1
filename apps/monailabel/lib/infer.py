"""Inference task: the bundle's reconstruction served as an image (``InferType.OTHERS``), not a label.

MONAI Label's stock ``BundleInferTask`` assumes a segmentation: it restores the prediction to the
input grid with nearest-neighbour resampling, and it imports torchvision. Here the bundle's own
``preprocessing``, ``network_def`` and ``inferer`` (``configs/inference.json``) run unchanged, and the
result is written by the bundle's ``SaveReconstructiond``: float32, on the isotropic grid, with the
affine that overlays the input in world coordinates.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import MetaTensor
from monai.utils import ImageMetaKey
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from .bundle import Bundle
from .versions import ModelVersions

logger = logging.getLogger(__name__)

# Request parameters a client can set (shown in 3D Slicer's options table), with their defaults.
# target_spacing 0 means the finest in-plane spacing (the bundle's null).
PARAMETERS = {"acceleration": 4.0, "motion": 0.03, "target_spacing": 0.0, "seed": 0}


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception: MONAI's ``Compose`` wraps a transform's error in 'applying transform ...'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class ReconstructionInfer(BasicInferTask):
    """Reconstruct an isotropic volume from one thick-slice scan with the newest model version."""

    def __init__(self, bundle: Bundle, versions: ModelVersions) -> None:
        self.bundle = bundle
        self.versions = versions
        super().__init__(
            path=None,
            network=bundle.config("inference.json").get_parsed_content("network_def"),
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=(
                f"{bundle.name} {bundle.version}: isotropic float32 volume from a thick-slice, accelerated, "
                "motion-corrupted brain MR scan (an image, not a label)"
            ),
            config=dict(PARAMETERS),
            load_strict=True,
        )

    # --- which weights: the newest version, re-read on every request ---------------------------

    def get_path(self, validate: bool = True) -> str | None:
        """The newest version (``validate``), or where a new version would go (MONAI Label's model upload).

        ``BasicInferTask`` reloads the network when this path's modification time changes, so a
        version published by a fine-tuning run is used from the next request on.
        """
        if not validate:
            return str(self.versions.next_path())
        latest = self.versions.latest()
        return str(latest) if latest.is_file() else None

    def is_valid(self) -> bool:
        return self.get_path() is not None

    # --- the bundle's config, with the request's acquisition parameters -------------------------

    def _bundle_config(self, data: dict[str, Any]):
        try:
            overrides = {
                "acceleration": float(data.get("acceleration", PARAMETERS["acceleration"])),
                "motion": float(data.get("motion", PARAMETERS["motion"])),
                "target_spacing": float(data.get("target_spacing") or 0.0) or None,
                "seed": int(data.get("seed", PARAMETERS["seed"])),
            }
        except (TypeError, ValueError) as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"invalid parameter: {error}") from error
        return self.bundle.config("inference.json", **overrides)

    def pre_transforms(self, data=None) -> Callable:
        return self._bundle_config(data or {}).get_parsed_content("preprocessing")

    def run_pre_transforms(self, data: dict[str, Any], transforms: Callable) -> dict[str, Any]:
        """Load and check the scan with the bundle's transforms, on the image alone.

        MONAI Label adds string entries such as ``image_path`` to the request, which some MONAI 1.6
        dictionary transforms (``Spacingd``) fail on; the bundle's transforms never see them.
        Anything that fails here is the input's fault, so it is reported as invalid input (HTTP 4xx).
        """
        source = data.get("image")
        try:
            data["image"] = transforms({"image": source})["image"]
        except Exception as error:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"cannot reconstruct the input image: {root_cause(error)}",
            ) from error
        return data

    def inferer(self, data=None):
        try:
            return self._bundle_config(data or {}).get_parsed_content("inferer")
        except Exception as error:  # the parameters are the only input here, e.g. a negative target_spacing
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(root_cause(error))) from error

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        data["model_path"] = self.get_path()
        return super().run_inferer(data, convert_to_batch, device)

    # --- the result: the bundle's saver, into a temporary file MONAI Label sends and deletes ----

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        from scripts.inference import OUTPUT_SUFFIX, SaveReconstructiond, output_path, scan_name

        pred: MetaTensor = data["pred"]
        source = pred.meta[ImageMetaKey.FILENAME_OR_OBJ]
        handle, result = tempfile.mkstemp(prefix=f"{scan_name(source)}_", suffix=OUTPUT_SUFFIX)
        os.close(handle)
        with tempfile.TemporaryDirectory() as folder:
            SaveReconstructiond("pred", output_dir=folder)({"pred": pred})
            shutil.move(output_path(source, folder), result)
        spacing = [float(s) for s in pred.affine[:3, :3].norm(dim=0)]
        params = {
            "model_version": self.versions.label(data["model_path"]),
            "bundle_version": self.bundle.version,
            "shape": list(pred.shape[1:]),
            "spacing": spacing,
            **{key: data.get(key, default) for key, default in PARAMETERS.items()},
        }
        logger.info("reconstruction %s %s mm with %s", params["shape"], spacing, params["model_version"])
        return result, params

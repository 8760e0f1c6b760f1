"""Inference with the PR-INR bundle inside the SDK: the stock bundle operator, adapted to a reconstruction.

:class:`MonaiBundleInferenceOperator` does what an SDK app needs (turns the DICOM volume into a
MetaTensor with its RAS affine, runs the bundle's preprocessing and inferer) but assumes a
segmentation bundle shipped as TorchScript: it casts image outputs to uint8 and hands the input's
metadata on. :class:`PRINRInferenceOperator` reads the bundle folder's ``configs/inference.json``
with the app's parameters, loads ``models/model.pt`` into ``network_def``, and emits the float32
reconstruction with its own affine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from monai.deploy.core import Image, IOType
from monai.deploy.operators.monai_bundle_inference_operator import (
    DISALLOW_LOAD_SAVE,
    IOMapping,
    MonaiBundleInferenceOperator,
    _ensure_bundle_in_sys_path,
    filter_compose,
    get_bundle_config,
)
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped

logger = logging.getLogger(__name__)

BUNDLE_CONFIG = Path("configs") / "inference.json"
CHECKPOINT = Path("models") / "model.pt"


def find_bundle(model_path: str | Path) -> tuple[Path, Path]:
    """The bundle folder and checkpoint that ``-m`` names.

    Accepts the bundle folder, a folder holding exactly one bundle folder (the models folder of a
    packaged app, ``/opt/holoscan/models/<name>``), or a checkpoint file inside a bundle's
    ``models/`` folder (to run other weights with the same configs).
    """
    path = Path(model_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"model path '{path}' does not exist; pass -m <bundle folder or its model.pt>.")
    if path.is_file():
        bundle = path.parent.parent
        if not (bundle / BUNDLE_CONFIG).is_file():
            raise ValueError(f"checkpoint '{path}' is not inside a bundle's models/ folder (no {BUNDLE_CONFIG}).")
        return bundle, path
    if (path / BUNDLE_CONFIG).is_file():
        return path, path / CHECKPOINT
    bundles = [p for p in sorted(path.iterdir()) if (p / BUNDLE_CONFIG).is_file()]
    if len(bundles) != 1:
        raise ValueError(
            f"model path '{path}' is not a bundle folder (no {BUNDLE_CONFIG}) and holds {len(bundles)} bundle "
            "folders; expected one."
        )
    return bundles[0], bundles[0] / CHECKPOINT


class PRINRInferenceOperator(MonaiBundleInferenceOperator):
    """Reconstruct the ``image`` input with the bundle; emit ``pred`` as a float32 :class:`Image`.

    Like every SDK Image made from DICOM, ``pred`` holds a (slice, row, column) array and its
    metadata ``affine`` maps (column, row, slice) voxel indices to RAS patient coordinates.

    Args:
        bundle_root: the bundle folder (see :func:`find_bundle`).
        checkpoint: weights to load into ``network_def``.
        parameters: overrides of the bundle config (``acceleration``, ``motion``, ``target_spacing``, ``seed``).
    """

    def __init__(self, fragment, *args, app_context, bundle_root: Path, checkpoint: Path, parameters: dict, **kwargs):
        self._checkpoint = Path(checkpoint)
        self._parameters = dict(parameters)
        super().__init__(
            fragment,
            *args,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_path=bundle_root,
            **kwargs,
        )
        # The stock operator defers a folder bundle to its first compute and then loads weights only
        # from TorchScript; configure everything here, so a bad bundle fails before any input is read.
        self._init_config(self._bundle_config_names.config_names)
        self._init_completed = True

    def _init_config(self, config_names):
        _ensure_bundle_in_sys_path(self.bundle_path)  # the config imports the bundle's `scripts`
        parser = get_bundle_config(str(self.bundle_path), config_names)
        parser.update({"bundle_root": str(self.bundle_path), "checkpoint": str(self._checkpoint), **self._parameters})
        self._parser = parser
        self._device = parser.get_parsed_content("device")
        self._inferer = parser.get_parsed_content(self._bundle_config_names.inferer_name)
        meta = parser["_meta_"]
        self._inputs = meta["network_data_format"]["inputs"]
        self._outputs = meta["network_data_format"]["outputs"]
        # The bundle's LoadImaged (dropped: the SDK loads the DICOM) also added the channel and cast to float32.
        bundle_preprocessing = filter_compose(parser.get_parsed_content("preprocessing"), DISALLOW_LOAD_SAVE)
        self._preproc = Compose(
            [EnsureChannelFirstd("image"), EnsureTyped("image", dtype=torch.float32), *bundle_preprocessing.transforms]
        )
        # The bundle's SaveReconstructiond writes a NIfTI beside the bundle; the app's writer saves instead.
        self._postproc = Compose([])
        self._network = parser.get_parsed_content("network")
        state = torch.load(self._checkpoint, map_location=self._device, weights_only=True)
        self._network.load_state_dict(state)
        self._network.eval()
        logger.info("bundle %s, weights %s, parameters %s", self.bundle_path, self._checkpoint, self._parameters)

    def predict(self, data, *args, **kwargs):
        return self._inferer(inputs=data, network=self._network)

    def _send_output(self, value, name, metadata, op_output, context):
        affine = value.affine[0] if value.affine.ndim == 3 else value.affine
        volume = value.detach().cpu().numpy().astype(np.float32)[0]  # (column, row, slice)
        image = Image(
            np.ascontiguousarray(np.swapaxes(volume, 0, 2)),
            metadata={"affine": affine.cpu().numpy().astype(np.float64), "space": "RAS"},
        )
        op_output.emit(image, name)

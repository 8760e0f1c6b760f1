"""MONAI Label app serving the PR-INR reconstruction bundle to 3D Slicer, OHIF and any HTTP client.

    python -m monailabel.main start_server --app apps/monailabel --studies <folder of NIfTI scans> \
        [--conf bundle_path <bundle folder>] [--conf model_dir <folder for fine-tuned versions>]

One model, ``prinr_reconstruction``: ``/infer`` returns the reconstructed volume (float32 NIfTI on the
isotropic grid) and ``/train`` fine-tunes it on the datastore's scans, publishing a new model version.
The bundle defaults to this repository's ``bundle/``; fine-tuned versions go to ``<app>/model``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib.bundle import Bundle
from lib.infer import ReconstructionInfer
from lib.train import FineTune
from lib.versions import ModelVersions
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)

MODEL = "prinr_reconstruction"
# resolve(): the app may be started from a copy whose files link back to this repository
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


class PRINRReconstructionApp(MONAILabelApp):
    """Reconstruction (an image, not a label) and self-supervised fine-tuning of the PR-INR bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.bundle = Bundle(conf.get("bundle_path") or DEFAULT_BUNDLE)
        self.versions = ModelVersions(conf.get("model_dir") or os.path.join(app_dir, "model"), self.bundle.weights)
        logger.info(
            "serving %s %s from %s; model versions in %s",
            self.bundle.name,
            self.bundle.version,
            self.bundle.path,
            self.versions.folder,
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="PR-INR brain MRI reconstruction",
            description=f"{self.bundle.name} {self.bundle.version}: isotropic reconstruction of thick-slice brain MRI",
            version=self.bundle.version,
        )

    def init_infers(self):
        return {MODEL: ReconstructionInfer(self.bundle, self.versions)}

    def init_trainers(self):
        return {MODEL: FineTune(self.bundle, self.versions)}

    def infer(self, request, datastore=None):
        """MONAI Label's inference, with client errors answered as HTTP 4xx with a message (not a bare 500).

        The result is an image, never saved into the datastore as a label.
        """
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model '{model}'; this app serves {sorted(self._infers)}")
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and image not in store.list_images():
            raise HTTPException(status_code=404, detail=f"no study '{image}' in the datastore")
        try:
            return super().infer({**request, "save_label": False}, datastore)
        except MONAILabelException as error:
            if error.error is MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=422, detail=error.msg) from error
            raise

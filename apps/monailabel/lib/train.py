"""Fine-tuning task: adapt the shipped weights to the scans in the datastore, without labels.

A thick-slice scan holds sharp in-plane slices but no through-plane ground truth. So the run
fine-tunes the two in-plane stages on the scans themselves: the bundle's degradation simulation is
applied with slice scale 1 (motion and k-space undersampling of each acquired slice, no further
thickening), and each acquired slice is the target of its own degraded version. Stage 1 (diffusion)
and then stage 2 (detail, on stage 1's new outputs) run through the bundle's own training configs and
``scripts.training.run_progressive``, starting from the newest model version; stage 3 (volumetric INR)
is kept. The result is published as a new model version, which inference uses from then on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from .bundle import Bundle
from .studies import prepare_volumes, write_datalist
from .versions import ModelVersions, utc_stamp

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"

# Request parameters a client can set, with their defaults (learning rates as in the bundle's
# fine-tuning instructions).
PARAMETERS = {
    "iterations": 200,
    "samples_per_volume": 16,
    "stage1_learning_rate": 5e-5,
    "stage2_learning_rate": 1e-4,
    "validate": True,
}

# Overrides of train_stage1.json and train_stage2.json shared by both stages: in-plane-only
# degradation (scale 1); patches 16 slices deep, which fit a thick-slice stack; no rotation or zoom,
# which in voxel space would mix a stack's thick slices, and so no crop margin kept for them.
STAGE_OVERRIDES = {
    "finetune": True,
    "max_epochs": 1,
    "save_interval": 1,
    "progress_bar": False,
    "sampling#scale_range": [1.0, 1.0],
    "sampling#patch_size": [160, 160, 16],
    "sampling#crop_margin": 0,
    "sampling#rotate_range": 0.0,
    "sampling#zoom_range": 0.0,
    "validation_setting#scale": 1.0,
}


def as_flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def read_parameters(request: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters: the request's values over :data:`PARAMETERS`, typed like the defaults."""
    values = {}
    for key, default in PARAMETERS.items():
        value = request.get(key, default)
        try:
            values[key] = as_flag(value) if isinstance(default, bool) else type(default)(value)
        except (TypeError, ValueError) as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"invalid {key} {value!r}: {error}") from error
    if values["iterations"] < 1 or values["samples_per_volume"] < 1:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, "iterations and samples_per_volume must be >= 1")
    return values


class FineTune(TrainTask):
    """Self-supervised fine-tuning of the in-plane stages on the datastore's scans; publishes a new model version."""

    def __init__(self, bundle: Bundle, versions: ModelVersions) -> None:
        super().__init__(
            "Fine-tune PR-INR's in-plane stages (diffusion, detail) on the datastore's scans, self-supervised "
            "(each acquired slice is the target of its own simulated motion and undersampling); "
            "the volumetric stage is kept. Writes a new model version."
        )
        self.bundle = bundle
        self.versions = versions

    def config(self) -> dict[str, Any]:
        return dict(PARAMETERS)

    def stats(self) -> dict[str, Any]:
        """The last completed run (``train_stats.json`` in the model folder), shown in ``/info``."""
        path = self.versions.folder / STATS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from scripts.training import run_progressive

        settings = read_parameters(request)
        images = [datastore.get_image_uri(image_id) for image_id in sorted(datastore.list_images())]
        if not images:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "the datastore holds no scans to fine-tune on")

        started = time.time()
        base = self.versions.latest()
        run_dir = self.versions.folder / "runs" / utc_stamp()
        datalist = write_datalist(prepare_volumes(images, run_dir / "volumes"), run_dir / "datalist.json")
        shutil.copyfile(base, run_dir / "model.pt")  # each stage writes its part into this copy
        iterations = settings["iterations"]
        logger.info(
            "fine-tuning %s on %d scan(s), %d iterations per stage, in %s", base, len(images), iterations, run_dir
        )

        # validation runs at the end of the single epoch, or never (interval 2)
        stage = {**STAGE_OVERRIDES, "epoch_length": iterations, "val_interval": 1 if settings["validate"] else 2}
        run_progressive(
            self.bundle.config_dir,
            {"bundle_root": str(self.bundle.path), "datalist": datalist, "model_dir": str(run_dir)},
            [
                {**stage, "output_dir": str(run_dir / "stage1"), "learning_rate": settings["stage1_learning_rate"]},
                {
                    **stage,
                    "output_dir": str(run_dir / "stage2"),
                    "cache_dir": str(run_dir / "cache"),
                    "learning_rate": settings["stage2_learning_rate"],
                    "samples_per_volume": settings["samples_per_volume"],
                },
            ],
        )
        shutil.rmtree(run_dir / "cache", ignore_errors=True)  # the stage-2 pool: only valid for this run's stage 1
        published = self.versions.publish(run_dir / "model.pt")
        stats = {
            "model_version": published.name,
            "started_from": self.versions.label(base),
            "studies": len(images),
            "stages": ["diffusion", "detail"],
            "iterations_per_stage": iterations,
            "start_ts": int(started),
            "total_time": round(time.time() - started, 1),
            "run_dir": str(run_dir),
        }
        self._write_stats(stats)
        logger.info("published %s after %.1f s", published, stats["total_time"])
        return stats

    def _write_stats(self, stats: dict[str, Any]) -> None:
        path = self.versions.folder / STATS_FILE
        temporary = path.with_suffix(".part")
        temporary.write_text(json.dumps(stats, indent=2))
        os.replace(temporary, path)

"""The output side of the app: the reconstruction as a DICOM MR series plus a NIfTI copy, all or nothing."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_series_writer import build_mr_series, ras_to_lps, write_mr_series
from monai.deploy.core import Fragment, Operator, OperatorSpec

logger = logging.getLogger(__name__)


def result_folder(output_folder: Path, input_folder: Path) -> Path:
    """``<output>/<input folder name>_recon``: the bundle names its outputs after the input the same way."""
    return Path(output_folder) / f"{Path(input_folder).resolve().name}_recon"


class ReconstructionWriterOperator(Operator):
    """Write ``<result>/dicom/IM_*.dcm`` (a new MR series) and ``<result>/<name>.nii.gz`` (float32, RAS).

    Everything is written into a hidden staging folder beside the result and renamed into place at
    the end, so the result folder appears complete or not at all, and an existing one is never replaced.

    Named inputs:
        image: the reconstruction (:class:`PRINRInferenceOperator`'s ``pred``).
        study_selected_series_list: the selected source series, for the patient, study and frame of reference.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        result: Path,
        series_description: str,
        derivation_description: str,
        **kwargs,
    ):
        self._result = Path(result)
        self._series_description = series_description
        self._derivation_description = derivation_description
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.input("study_selected_series_list")

    def compute(self, op_input, op_output, context):
        image = op_input.receive("image")
        selected = op_input.receive("study_selected_series_list")
        source = selected[0].selected_series[0].series.get_sop_instances()[0].get_native_sop_instance()
        volume = np.swapaxes(image.asnumpy(), 0, 2)  # (column, row, slice)
        affine_ras = np.asarray(image.metadata()["affine"], dtype=np.float64)
        derivation = f"{self._derivation_description} of series {source.SeriesInstanceUID}"
        datasets = build_mr_series(volume, ras_to_lps(affine_ras), source, self._series_description, derivation)
        if self._result.exists():
            raise FileExistsError(f"output '{self._result}' already exists; it is never replaced.")
        self._result.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self._result.name}.partial-", dir=self._result.parent))
        try:
            write_mr_series(datasets, staging / "dicom")
            nib.save(nib.Nifti1Image(volume.astype(np.float32), affine_ras), staging / f"{self._result.name}.nii.gz")
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
            os.rename(staging, self._result)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info(
            "wrote %s: %d DICOM images (series %s) and a NIfTI copy %s",
            self._result,
            len(datasets),
            datasets[0].SeriesInstanceUID,
            volume.shape,
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

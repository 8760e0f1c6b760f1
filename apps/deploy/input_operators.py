"""The input side of the app: the SDK's DICOM loader, series selector and series-to-volume operators, fixed.

The stock loader skips a file it cannot read with a warning, which would leave a gap in the series
and misplace every slice after it; the stock selector passes an empty selection on, which fails
later with a message about a missing input. Both fail here, before any inference, saying what is
wrong with the input folder. The stock series-to-volume operator swaps the two in-plane spacings
in the volume's affine, which misplaces a series whose pixels are not square, and builds the affine
from the first and last slice alone, which misplaces the slices of a series with a missing slice:
here the series must be evenly spaced (the bundle's own check, :mod:`scripts.dicom_series`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import _ensure_bundle_in_sys_path
from pydicom import dcmread

logger = logging.getLogger(__name__)

# MR series only, and not a derived secondary series such as this app's own output; the series
# with the most images wins when several match (all_matched + sort_by_sop_instance_count).
MR_SERIES_RULES = json.dumps(
    {
        "selections": [
            {
                "name": "MR series to reconstruct",
                "conditions": {"Modality": "(?i)^MR$", "ImageType": ["!SECONDARY"]},
            }
        ]
    }
)


def unreadable_dicom_files(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """The files under ``folder`` (hidden ones aside) and, for each that is not a readable DICOM image, why not."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    problems = {}
    for path in files:
        try:
            ds = dcmread(path)
            if "PixelData" in ds:
                _ = ds.pixel_array  # decoding is the check: it fails on truncated pixel data
        except Exception as error:  # any reason a file cannot be used is reported the same way
            problems[path] = f"{type(error).__name__}: {error}"
    return files, problems


class CheckedDICOMDataLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM loader, refusing a folder that is empty or holds a file it cannot read."""

    def load_data_to_studies(self, input_path: Path):
        input_path = Path(input_path)
        if not input_path.is_dir():
            raise ValueError(f"input '{input_path}' is not a folder; expected a folder of DICOM files.")
        files, problems = unreadable_dicom_files(input_path)
        if not files:
            raise ValueError(f"input folder '{input_path}' is empty; expected the DICOM files of an MR series.")
        if problems:
            examples = "; ".join(f"'{p.relative_to(input_path)}' ({why})" for p, why in list(problems.items())[:3])
            raise ValueError(
                f"{len(problems)} of {len(files)} files in '{input_path}' are not readable DICOM images: {examples}. "
                "Remove or replace them; nothing was reconstructed."
            )
        return super().load_data_to_studies(input_path)


def describe_series(studies) -> str:
    """One line per series found: modality, description and number of images."""
    lines = []
    for study in studies:
        for series in study.get_all_series():
            lines.append(
                f"{getattr(series, 'Modality', None) or '?'} '{getattr(series, 'SeriesDescription', None) or ''}' "
                f"({len(series.get_sop_instances())} images)"
            )
    return ", ".join(lines) if lines else "none"


class MRSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK's series selector with the MR rules; it passes on exactly one series or fails."""

    def __init__(self, fragment, *args, **kwargs):
        super().__init__(
            fragment, *args, rules=MR_SERIES_RULES, all_matched=True, sort_by_sop_instance_count=True, **kwargs
        )

    def compute(self, op_input, op_output, context):
        studies = op_input.receive(self.input_name_study_list)
        selected = self.filter(self._load_rules(), studies, self._all_matched, self._sort_by_sop_instance_count)
        if not selected:
            raise ValueError(
                f"no MR series to reconstruct in the input: found {describe_series(studies)}. "
                "The app takes a series with Modality MR whose ImageType is not SECONDARY."
            )
        chosen = selected[0].selected_series[0]
        logger.info(
            "reconstructing series %s '%s' (%d images)",
            chosen.series.SeriesInstanceUID,
            getattr(chosen.series, "SeriesDescription", ""),
            len(chosen.series.get_sop_instances()),
        )
        one = StudySelectedSeries(selected[0].study)
        one.add_selected_series(chosen)
        op_output.emit([one], self.output_name_selected_series)


class SeriesToVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume operator with each in-plane spacing on its own axis, for evenly spaced series.

    Voxel axis 0 runs along a row (the first ImageOrientationPatient triplet), one column apart:
    its step is PixelSpacing[1]. The SDK scales it by PixelSpacing[0] (and axis 1 by PixelSpacing[1]).
    ``bundle_root`` is the bundle whose ``scripts.dicom_series`` checks the slice positions.
    """

    def __init__(self, fragment, *args, bundle_root: Path, **kwargs):
        self.bundle_root = Path(bundle_root)
        super().__init__(fragment, *args, **kwargs)

    def compute_affine_transform(self, s_1, s_n, n, series):
        _ensure_bundle_in_sys_path(self.bundle_root)
        from scripts.dicom_series import check_even_spacing, slice_positions

        source = f"series {series.SeriesInstanceUID}"
        datasets = [instance.get_native_sop_instance() for instance in series.get_sop_instances()]
        check_even_spacing(slice_positions(datasets, source), source)
        super().compute_affine_transform(s_1, s_n, n, series)
        row_spacing, column_spacing = (float(v) for v in s_1["PixelSpacing"].value)
        for name in (self.ATTRIBUTE_DICOM_AFFINE, self.ATTRIBUTE_NIFTI_AFFINE):
            affine = getattr(series, name)
            affine[:3, 0] *= column_spacing / row_spacing
            affine[:3, 1] *= row_spacing / column_spacing

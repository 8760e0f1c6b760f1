"""PR-INR reconstruction as a MONAI Deploy application: a thick-slice MR DICOM series in, an isotropic one out.

    python apps/deploy/app.py -i <DICOM folder> -o <output folder> -m <bundle folder or its model.pt>
        [--acceleration 4] [--motion 0.03] [--target-spacing MM] [--seed 0]

Graph: DICOM loader -> MR series selector -> series to volume -> PR-INR bundle inference -> writer.
The writer creates ``<output>/<input folder name>_recon/`` with ``dicom/IM_*.dcm`` (a new MR series
in the input's study and frame of reference) and ``<input folder name>_recon.nii.gz``. It fails
before any inference if the input has no MR series or an unreadable file, or the result exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cuda_runtime import load_cuda_runtime

load_cuda_runtime()  # before the first `import monai`: with the SDK installed it imports holoscan

from inference_operator import PRINRInferenceOperator, find_bundle  # noqa: E402
from input_operators import (  # noqa: E402
    CheckedDICOMDataLoaderOperator,
    MRSeriesSelectorOperator,
    SeriesToVolumeOperator,
)
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402
from writer_operator import ReconstructionWriterOperator, result_folder  # noqa: E402

SERIES_DESCRIPTION = "PR-INR reconstruction (research use only)"
SDK_OPTIONS = "-i/--input DICOM folder, -o/--output folder, -m/--model bundle or model.pt, -l/--log-level, -w/--workdir"


class PRINRReconstructionApp(Application):
    """The DICOM-in, DICOM-out reconstruction graph; ``parameters`` override the bundle's inference config."""

    def __init__(self, argv: list[str], parameters: dict):
        self._parameters = parameters
        super().__init__(argv)

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        input_folder = Path(app_context.input_path)
        bundle_root, checkpoint = find_bundle(app_context.model_path)
        result = result_folder(Path(app_context.output_path), input_folder)
        if result.exists():
            raise FileExistsError(f"output '{result}' already exists; remove it or choose another output folder.")
        version = json.loads((bundle_root / "configs" / "metadata.json").read_text())["version"]
        settings = ", ".join(f"{k} {v}" for k, v in self._parameters.items() if v is not None)

        loader = CheckedDICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_folder, name="dicom_loader"
        )
        selector = MRSeriesSelectorOperator(self, name="mr_series_selector")
        to_volume = SeriesToVolumeOperator(self, bundle_root=bundle_root, name="series_to_volume")
        inference = PRINRInferenceOperator(
            self,
            app_context=app_context,
            bundle_root=bundle_root,
            checkpoint=checkpoint,
            parameters=self._parameters,
            name="prinr_inference",
        )
        writer = ReconstructionWriterOperator(
            self,
            result=result,
            series_description=SERIES_DESCRIPTION,
            derivation_description=f"PR-INR bundle {version} isotropic reconstruction ({settings})",
            name="reconstruction_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(inference, writer, {("pred", "image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parse_parameters(args: list[str]) -> tuple[dict, list[str]]:
    """The bundle parameters from ``args``, and the rest for the SDK's own parser."""
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="PR-INR reconstruction of a thick-slice MR DICOM series (MONAI Deploy application).",
        epilog=f"MONAI Deploy options: {SDK_OPTIONS}.",
    )
    parser.add_argument("--acceleration", type=_positive, default=4.0, help="acceleration R (1: fully sampled)")
    parser.add_argument("--motion", type=_non_negative, default=0.03, help="expected motion, fraction of the FOV")
    parser.add_argument(
        "--target-spacing",
        "--target_spacing",
        dest="target_spacing",
        type=_positive,
        default=None,
        help="isotropic output spacing in mm (default: the finest in-plane spacing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the diffusion stage's noise")
    options, rest = parser.parse_known_args(args)
    return vars(options), rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    parameters, sdk_args = parse_parameters(argv[1:])
    app = PRINRReconstructionApp([sys.executable, argv[0], *sdk_args], parameters)
    failure = None
    try:
        app.run()
    except Exception as error:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        failure = str(error)
    del app  # holoscan logs while it tears the graph down: let it finish before the message
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

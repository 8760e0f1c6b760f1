"""Make the bundle's embedded sample input from the ICBM 2009a symmetric T1 template.

The template (../shared/data/train/mni152_2009a_sym_t1.nii.gz, ICBM/MNI licence: free use with
its copyright notice, see bundle/docs/data_license.txt) is cropped to the head, then degraded by
the bundle's own acquisition preset: 5 mm axial slices from the 1 mm template, 3% motion, 4x
random undersampling, seed 0. The result is a small, realistic thick-slice input so that
``python -m monai.bundle run --config_file configs/inference.json`` works without a download.

    python scripts/make_sample.py [--template PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))

from monai.data import NibabelWriter  # noqa: E402
from monai.transforms import LoadImage, Orientation, SpatialCrop  # noqa: E402

from scripts.transforms import SimulateAcquisition  # noqa: E402

DEFAULT_TEMPLATE = REPO_ROOT.parent / "shared" / "data" / "train" / "mni152_2009a_sym_t1.nii.gz"
DEFAULT_OUTPUT = REPO_ROOT / "bundle" / "sample_data" / "icbm152_t1_thick5_motion3_r4.nii.gz"
# head bounding box of the 197x233x189 template (voxels above 5% of its 99.5th percentile) plus a margin
HEAD_ROI = {"roi_start": (18, 20, 0), "roi_end": (178, 212, 160)}
ACQUISITION = {"scale": 5.0, "motion": 0.03, "acceleration": 4.0, "slice_axis": 2, "seed": 0}


def make_sample(template: Path, output: Path) -> None:
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(template))
    image = SpatialCrop(**HEAD_ROI)(Orientation("RAS", labels=None)(image.float()))
    degraded = SimulateAcquisition(**ACQUISITION)(image)
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = NibabelWriter(output_dtype=np.float32)
    writer.set_data_array(degraded, channel_dim=0)
    writer.set_metadata({"affine": degraded.affine, "original_affine": degraded.affine}, resample=False)
    writer.write(str(output), verbose=False)
    print(f"wrote {output}: shape {tuple(degraded.shape[1:])}, acquisition {degraded.meta['acquisition']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    make_sample(args.template, args.output)


if __name__ == "__main__":
    main()

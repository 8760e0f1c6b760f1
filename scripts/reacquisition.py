#!/usr/bin/env python
"""Re-acquisition consistency of the bundle's reconstruction of a real thick-slice scan (no ground truth).

    python scripts/reacquisition.py                               # the shared 4.5 mm DICOM series
    python scripts/reacquisition.py --input scan.nii.gz --acceleration 2 --motion 0.01
    python scripts/reacquisition.py --recon existing_recon.nii.gz  # score an output already written

Runs ``configs/inference.json`` on the scan in a fresh process (as a user would, through
``scripts/benchmark.py``'s runner), averages the isotropic output back over the acquired slabs
(:func:`scripts.consistency.reacquire`) and scores that against the scan itself with the
protocol's PSNR/SSIM (normalised by the scan's 99.5th percentile; "head" inside the scan's head
mask). Cubic B-spline and linear interpolation of the scan, re-acquired the same way, are the
reference: an interpolator that passes through the slice centres is close to consistent by
construction, so consistency is a sanity check (does the output explain the data?), not a
quality score. Writes ``reacquisition.md`` and ``reacquisition.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from benchmark import SPEED_DICOM, run_bundle_inference  # noqa: E402
from monai.transforms import LoadImage, Orientation  # noqa: E402

from scripts.baselines import bspline_baseline, linear_baseline, nearest_on_grid  # noqa: E402
from scripts.consistency import reacquire  # noqa: E402
from scripts.inference import find_scans, output_path  # noqa: E402
from scripts.metrics import evaluate_reconstruction, head_mask, normalise  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input", type=Path, default=SPEED_DICOM, help=f"scan: DICOM series folder or NIfTI ({SPEED_DICOM})"
    )
    p.add_argument("--recon", type=Path, help="an existing reconstruction of --input (skips inference)")
    p.add_argument("--acceleration", type=float, default=1.0, help="R given to the bundle (1: fully sampled)")
    p.add_argument("--motion", type=float, default=0.0, help="motion severity given to the bundle")
    p.add_argument("--output-dir", type=Path, default=Path("reacquisition_out"))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for the inference run")
    return p.parse_args(argv)


def plot(scan, recon, references: dict, reacquired: dict, path: Path) -> None:
    """Axial slice of the scan next to each method re-acquired (with its error), and a coronal view of each output."""
    from matplotlib.figure import Figure

    to_ras = Orientation("RAS", labels=None)
    names = list(reacquired)
    scan_ras, recon_ras = to_ras(scan), to_ras(recon)
    thick = normalise(scan_ras, *(to_ras(reacquired[n]) for n in names))
    fine = [to_ras(v) for v in (nearest_on_grid(scan, recon.affine, recon.shape[1:]), *references.values())]
    fine_n = normalise(recon_ras, *fine)
    fine_names = ["PR-INR", "scan (nearest)", *references]
    spacing = np.linalg.norm(np.asarray(scan_ras.affine)[:3, :3], axis=0)
    fine_spacing = np.linalg.norm(np.asarray(recon_ras.affine)[:3, :3], axis=0)
    k, j = scan_ras.shape[3] // 2, scan_ras.shape[2] // 2
    ncol = 1 + len(names)
    fig = Figure(figsize=(3.0 * ncol, 9.5), layout="constrained")
    axes = fig.subplots(3, ncol, squeeze=False)
    gt = thick[0][0].numpy()
    for c, (label, vol) in enumerate(zip(["scan", *(f"{n} re-acquired" for n in names)], thick, strict=True)):
        v = vol[0].numpy()
        axes[0, c].imshow(v[:, :, k].T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=spacing[1] / spacing[0])
        axes[0, c].set_title(f"{label}\naxial slice {k}", fontsize=8)
        if c:
            axes[1, c].imshow(np.abs(v - gt)[:, :, k].T, cmap="magma", vmin=0, vmax=0.2, origin="lower")
            axes[1, c].set_title("|re-acquired - scan|", fontsize=8)
    for c, (label, vol) in enumerate(zip(fine_names, fine_n, strict=True)):
        if c < ncol:
            v = vol[0].numpy()
            fj = round(j * vol.shape[2] / scan_ras.shape[2])
            axes[2, c].imshow(
                v[:, fj, :].T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=fine_spacing[2] / fine_spacing[0]
            )
            axes[2, c].set_title(f"{label}, coronal", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.input = args.input.resolve()  # the bundle runs from its own folder
    if not args.input.exists():
        print(f"error: input {args.input} not found", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = "(existing reconstruction)"
    with tempfile.TemporaryDirectory(prefix="prinr_reacq_") as tmp:
        recon_path = args.recon
        if recon_path is None:
            bundle_args = ["--input_image", args.input, "--acceleration", args.acceleration, "--motion", args.motion]
            run = run_bundle_inference(bundle_args, Path(tmp), args.timeout)
            if run["returncode"] != 0:
                print(run["log"][-3000:], file=sys.stderr)
                return 1
            command = f"`{run['command']}` (from `bundle/`), {run['wall_s']:.0f} s, {run['peak_rss_mb']:.0f} MiB"
            recon_path = output_path(find_scans(args.input)[0]["image"], tmp)
        load = LoadImage(image_only=True, ensure_channel_first=True)
        scan = load(find_scans(args.input)[0]["image"])
        recon = load(recon_path)
    references = {
        "B-spline": bspline_baseline(scan, None, recon.affine, recon.shape[1:]),
        "linear": linear_baseline(scan, None, recon.affine, recon.shape[1:]),
    }
    reacquired = {"PR-INR": reacquire(recon, scan), **{n: reacquire(v, scan) for n, v in references.items()}}
    mask = head_mask(scan)
    lines = [
        "| output re-acquired | PSNR (dB) | SSIM | PSNR head (dB) | SSIM head |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, volume in reacquired.items():
        s = evaluate_reconstruction(volume, scan, mask=mask)
        lines.append(f"| {name} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_head']:.2f} | {s['ssim_head']:.4f} |")
    plot(scan, recon, references, reacquired, args.output_dir / "reacquisition.png")
    text = (
        f"Scan: {args.input.name}, {tuple(scan.shape[1:])}; reconstruction {tuple(recon.shape[1:])}; "
        f"acceleration {args.acceleration}, motion {args.motion}; {command}.\n\n" + "\n".join(lines) + "\n"
    )
    (args.output_dir / "reacquisition.md").write_text(text)
    print(text)
    print(f"wrote {args.output_dir / 'reacquisition.md'} and {args.output_dir / 'reacquisition.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

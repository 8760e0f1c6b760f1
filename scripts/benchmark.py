#!/usr/bin/env python
"""Run the evaluation protocol on real volumes and write results.csv, results.md and figures.

A thin command line over ``bundle/scripts/protocol.py``; every number it prints comes from there.

    python scripts/benchmark.py --quick                 # one volume, all nine settings (< 10 min, 2 CPUs)
    python scripts/benchmark.py                          # the three real subjects, all settings
    python scripts/benchmark.py --methods linear --settings s5_m0_R1
    python scripts/benchmark.py --plugins my_methods     # a module whose import registers more methods
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))

from scripts.protocol import METHODS, PROTOCOL_SETTINGS, run_protocol  # noqa: E402
from scripts.report import markdown_table, write_csv  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_VOLUMES = (
    SHARED_DATA / "train" / "subject_a_t1.nii.gz",
    SHARED_DATA / "train" / "subject_b_t2w.nii.gz",
    SHARED_DATA / "val" / "subject_c_t1_1p6mm.nii.gz",
)


def load_plugins(argv: list[str] | None) -> None:
    """Import the ``--plugins`` modules first: importing them registers their methods with the harness."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugins", nargs="+", default=[])
    for module in pre.parse_known_args(argv)[0].plugins:
        importlib.import_module(module)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    load_plugins(argv)
    setting_names = [s.name for s in PROTOCOL_SETTINGS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--volumes",
        nargs="+",
        type=Path,
        default=None,
        help="NIfTI volumes (ground truth). Default: the real subjects in ../shared/data/{train,val}.",
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help=f"methods to run (default: all registered: {list(METHODS)})"
    )
    p.add_argument("--settings", nargs="+", default=None, help=f"subset of settings (default all): {setting_names}")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmark_out", help="default: benchmark_out/")
    p.add_argument("--quick", action="store_true", help="only the first volume (all settings unless --settings)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each (volume, setting) derives its own")
    p.add_argument("--no-figures", action="store_true", help="skip the per-setting PNG figures")
    p.add_argument(
        "--plugins", nargs="+", default=[], help="modules to import first; they register methods with the harness"
    )
    args = p.parse_args(argv)

    if args.methods is not None:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            p.error(f"unknown methods {unknown}; registered: {list(METHODS)}")
    if args.settings is not None:
        unknown = [s for s in args.settings if s not in setting_names]
        if unknown:
            p.error(f"unknown settings {unknown}; choose from {setting_names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    volumes = list(args.volumes) if args.volumes else list(DEFAULT_VOLUMES)
    missing = [str(v) for v in volumes if not v.is_file()]
    if missing:
        print(f"error: volumes not found: {missing} (shared data expected at {SHARED_DATA})", file=sys.stderr)
        return 2
    if args.quick:
        volumes = volumes[:1]
    settings = PROTOCOL_SETTINGS
    if args.settings:
        settings = tuple(s for s in PROTOCOL_SETTINGS if s.name in args.settings)

    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_protocol(
        volumes,
        settings=settings,
        methods=args.methods,
        seed=args.seed,
        figure_dir=None if args.no_figures else out_dir / "figures",
    )
    write_csv(rows, out_dir / "results.csv")
    table = markdown_table(rows)
    header = (
        f"# Benchmark\n\nVolumes: {', '.join(v.name for v in volumes)}; base seed {args.seed}. "
        "PSNR/SSIM after dividing by the ground truth's 99.5th percentile and clipping to [0, 1]; "
        "'head' = inside the ground-truth head mask.\n\n"
    )
    (out_dir / "results.md").write_text(header + table)
    print(f"\nwrote {out_dir / 'results.csv'} and {out_dir / 'results.md'}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

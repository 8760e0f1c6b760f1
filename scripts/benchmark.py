#!/usr/bin/env python
"""Run the evaluation protocol on real volumes and write results.csv, results.md and figures.

A thin command line over ``bundle/scripts/protocol.py``; every number it prints comes from there.

    python scripts/benchmark.py --quick                 # one volume, all nine settings (< 10 min, 2 CPUs)
    python scripts/benchmark.py                          # the three real subjects, all settings
    python scripts/benchmark.py --methods linear --settings s5_m0_R1
    python scripts/benchmark.py --plugins my_methods     # a module whose import registers more methods
    python scripts/benchmark.py --plugins scripts.prinr_methods --methods bspline prinr prinr_no_diffusion
    python scripts/benchmark.py --pe-axis 1              # phase encode along the other in-plane axis

    python scripts/benchmark.py --speed                  # bundle inference on the embedded sample, end to end
    python scripts/benchmark.py --speed --speed-dicom    # and on the 512x512x40 DICOM series (native spacing)

A plugin module may define ``finalize_rows(rows)``; it is called on the rows after the protocol
(``scripts.prinr_methods`` uses it to report each method's stand-alone cost despite its cache).

``--speed`` runs ``python -m monai.bundle run --config_file configs/inference.json --output_dir
<tmp>`` in a fresh process from the bundle folder, exactly as a user would, and reports that
process's wall time (start to exit: imports, loading, reconstruction, saving) and peak resident
memory (``ru_maxrss`` of that child from ``os.wait4``), with the per-stage times parsed from its log.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))

from scripts.protocol import METHODS, PROTOCOL_SETTINGS, run_protocol  # noqa: E402
from scripts.report import markdown_table, write_csv  # noqa: E402

BUNDLE_DIR = REPO_ROOT / "bundle"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SPEED_SAMPLE = BUNDLE_DIR / "sample_data" / "icbm152_t1_thick5_motion3_r4.nii.gz"
SPEED_DICOM = SHARED_DATA / "dicom" / "vs_seg_001_t1_4p5mm"
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
        "--pe-axis",
        type=int,
        choices=(0, 1),
        default=None,
        help="phase-encode axis of every setting (default: the protocol's, axis 0); names get '_pe<axis>'",
    )
    p.add_argument(
        "--plugins", nargs="+", default=[], help="modules to import first; they register methods with the harness"
    )
    speed = p.add_argument_group("speed (bundle inference end to end, in a fresh process; no protocol run)")
    speed.add_argument("--speed", action="store_true", help="time configs/inference.json on the embedded sample")
    speed.add_argument(
        "--speed-dicom",
        nargs="?",
        type=Path,
        const=SPEED_DICOM,
        default=None,
        metavar="SERIES",
        help=f"also time it on a DICOM series at its native in-plane spacing (default {SPEED_DICOM})",
    )
    speed.add_argument(
        "--speed-args",
        default="",
        help="extra bundle CLI arguments for every speed run, one string: --speed-args='--target_spacing 2'",
    )
    speed.add_argument("--speed-timeout", type=float, default=3600.0, help="seconds allowed per speed run")
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
    if args.speed or args.speed_dicom is not None:
        return speed_main(args)
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
    if args.pe_axis is not None:
        settings = tuple(replace(s, pe_axis=args.pe_axis) for s in settings)

    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_protocol(
        volumes,
        settings=settings,
        methods=args.methods,
        seed=args.seed,
        figure_dir=None if args.no_figures else out_dir / "figures",
    )
    for name in args.plugins:
        finalize = getattr(sys.modules[name], "finalize_rows", None)
        if finalize is not None:
            finalize(rows)
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


# --- speed -------------------------------------------------------------------------------------------

_STAGES12 = re.compile(r"stages 1-2 \(.*?\): (\d+)/(\d+) slices, ([0-9.]+) s")
_STAGE3 = re.compile(r"stage 3 \(voxel INR\): (\S+) voxels, ([0-9.]+) s")
_RECONSTRUCTING = re.compile(
    r"reconstructing (.+?): (\d+) slices ([0-9.e+-]+) mm apart along axis (\d), in-plane \((\d+), (\d+)\) "
    r"at ([0-9.e+-]+) mm -> (\d+) slices"
)
_SUMMARY = re.compile(r"reconstructed (\d+) scan\(s\) in ([0-9.]+) s, peak resident memory ([0-9.]+) MB")


def parse_speed_log(text: str) -> dict:
    """Per-stage times and the run summary from the log of one ``configs/inference.json`` run.

    Returns ``scans`` (one dict per reconstructed scan: ``name``, ``input`` ``"HxWxS @ in-plane/slice mm"``,
    ``stages12_s`` (the last cumulative "stages 1-2" time of the scan), ``stage3_s``, ``output``
    voxels), ``stages12_s`` and ``stage3_s`` summed over scans, and the inferer's summary
    ``engine_s`` (the evaluator's run) and ``engine_peak_mb`` (NaN when absent, e.g. a failed run).
    """
    scans: list[dict] = []
    for line in text.splitlines():
        if match := _RECONSTRUCTING.search(line):
            name, slices, spacing, axis, height, width, in_plane, out_slices = match.groups()
            scans.append(
                {
                    "name": Path(name).name,
                    "input": f"{height}x{width}x{slices} @ {float(in_plane):.3g}/{float(spacing):.3g} mm",
                    "slice_axis": int(axis),
                    "output_slices": int(out_slices),
                    "stages12_s": float("nan"),
                    "stage3_s": float("nan"),
                    "output": "",
                }
            )
        elif (match := _STAGES12.search(line)) and scans:
            done, total, seconds = match.groups()
            if done == total:
                scans[-1]["stages12_s"] = float(seconds)
        elif (match := _STAGE3.search(line)) and scans:
            scans[-1]["output"], scans[-1]["stage3_s"] = match.group(1), float(match.group(2))
    summary = _SUMMARY.search(text)
    return {
        "scans": scans,
        "stages12_s": sum(s["stages12_s"] for s in scans) if scans else float("nan"),
        "stage3_s": sum(s["stage3_s"] for s in scans) if scans else float("nan"),
        "engine_scans": int(summary.group(1)) if summary else 0,
        "engine_s": float(summary.group(2)) if summary else float("nan"),
        "engine_peak_mb": float(summary.group(3)) if summary else float("nan"),
    }


def _busy_cpu_seconds() -> float:
    """Busy CPU time of the whole machine since boot (``/proc/stat`` minus idle and iowait); NaN off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_bundle_inference(extra_args: list[str], output_dir: Path, timeout: float) -> dict:
    """Run the bundle's inference CLI in a fresh process from the bundle folder; time it and read its peak RSS.

    The peak resident memory is ``ru_maxrss`` of that one child (``os.wait4``), so earlier children
    of this process do not leak into it. ``cpu_s`` is the child's user + system CPU time and
    ``others_cpu_s`` the CPU time the rest of the machine used meanwhile (contention, on a shared CPU).
    """
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--output_dir", str(output_dir), *map(str, extra_args)]
    with tempfile.TemporaryFile(mode="w+") as log:
        busy_before = _busy_cpu_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=BUNDLE_DIR, stdout=log, stderr=subprocess.STDOUT)
        deadline, timed_out = started + timeout, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        busy = _busy_cpu_seconds() - busy_before
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    peak_kib = usage.ru_maxrss * (1 / 1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return {
        "command": " ".join(["python", *command[1:]]),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "peak_rss_mb": peak_kib / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "others_cpu_s": max(busy - usage.ru_utime - usage.ru_stime, 0.0),
        "log": text,
        **parse_speed_log(text),
    }


def speed_table(runs: list[tuple[str, dict]]) -> str:
    """Markdown table of speed runs."""
    lines = [
        "| input | input grid (in-plane/slice spacing) | output voxels | wall time, process (s) | "
        "peak RSS, process (MiB) | stages 1-2 (s) | stage 3 (s) | engine run (s) | CPU time, process (s) | "
        "CPU time, other processes meanwhile (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, run in runs:
        scan = run["scans"][0] if len(run["scans"]) == 1 else None
        grid = scan["input"] if scan else f"{len(run['scans'])} scans"
        output = scan["output"] if scan else ""
        status = (
            "" if run["returncode"] == 0 else (" (timed out)" if run["timed_out"] else f" (exit {run['returncode']})")
        )
        lines.append(
            f"| {label}{status} | {grid} | {output} | {run['wall_s']:.1f} | {run['peak_rss_mb']:.0f} | "
            f"{run['stages12_s']:.1f} | {run['stage3_s']:.1f} | {run['engine_s']:.1f} | "
            f"{run.get('cpu_s', float('nan')):.1f} | {run.get('others_cpu_s', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


def speed_main(args: argparse.Namespace) -> int:
    """``--speed``: time the bundle's inference CLI on the sample (and the DICOM series) and print a table."""
    cases = []
    if args.speed:
        cases.append(("embedded sample", SPEED_SAMPLE, []))
    if args.speed_dicom is not None:
        cases.append((f"DICOM {args.speed_dicom.name}", args.speed_dicom, ["--input_image", args.speed_dicom]))
    missing = [str(path) for _, path, _ in cases if not path.exists()]
    if missing:
        print(f"error: speed inputs not found: {missing}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="prinr_speed_") as tmp:
        for i, (label, _, extra) in enumerate(cases):
            print(f"timing {label} ...", flush=True)
            run = run_bundle_inference(
                [*extra, *shlex.split(args.speed_args)], Path(tmp) / f"run{i}", args.speed_timeout
            )
            if run["returncode"] != 0:
                print(run["log"][-3000:], file=sys.stderr)
            runs.append((label, run))
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    note = (
        f"CPU: {os.cpu_count()} logical cores, OMP_NUM_THREADS={threads}. The last column is the CPU time the "
        "rest of the machine used during the run: well above zero, the CPU was shared and the times are "
        "pessimistic.\n\n"
        "Wall time and peak RSS are of the whole `python -m monai.bundle run` process (start to exit: imports, "
        "loading the scan and the model, reconstruction, saving). Stage times and the engine run come from "
        "its log (`scripts.networks.pipeline`, `scripts.inference.RunSummaryHandler`).\n\n"
    )
    table = speed_table(runs)
    commands = "".join(f"- {label}: `{run['command']}` (from `bundle/`)\n" for label, run in runs)
    text = f"# Inference speed\n\n{note}{table}\nCommands:\n\n{commands}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "speed.md").write_text(text)
    print(f"\nwrote {args.output_dir / 'speed.md'}\n")
    print(text)
    return 0 if all(run["returncode"] == 0 for _, run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

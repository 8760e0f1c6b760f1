"""The evaluation protocol: degrade real volumes, run every registered method, score and time them.

One protocol for every method, so that numbers are comparable across the baselines, PR-INR and its
ablations:

* **Settings** (:data:`PROTOCOL_SETTINGS`): thick-slice factor 5 along the axial axis, in-plane
  motion ``{0, 0.03, 0.05}`` x acceleration ``{1, 4, 8}`` (nine settings).
* **Volumes** are loaded as float32 channel-first MetaTensors in RAS (:func:`load_volume`), so
  array axis 2 is axial (inferior to superior) for every file, whatever its stored orientation.
* **Seeds** (:func:`setting_seed`) are a CRC32 of the volume name, the setting and the base seed:
  every (volume, setting) pair gets its own fixed degradation, identical across runs, machines
  and methods, and independent of which other volumes or settings are run.
* **Methods** live in :data:`METHODS` and are added with :func:`register_method`. A method is a
  callable ``(degraded, acquisition, target_affine, target_shape) -> MetaTensor`` on the target
  grid; ``acquisition`` holds ``"kspace"``, ``"mask"`` and the ``meta["acquisition"]`` parameters.
  New methods plug in by registering themselves; the harness does not change.
* **Scores** are :func:`scripts.metrics.evaluate_reconstruction` against the fine ground truth.
  **Cost** is the method call's wall time and the process's peak resident memory during it.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, EnsureType, LoadImage, Orientation

from scripts.baselines import bspline_baseline, linear_baseline, nearest_on_grid
from scripts.metrics import evaluate_reconstruction, head_mask
from scripts.transforms import SimulateAcquisition
from scripts.transforms.validation import resolve_pe_axis

__all__ = [
    "SCALE",
    "MOTIONS",
    "ACCELERATIONS",
    "SLICE_AXIS",
    "Setting",
    "PROTOCOL_SETTINGS",
    "Method",
    "METHODS",
    "register_method",
    "load_volume",
    "volume_name",
    "setting_seed",
    "degrade",
    "run_method",
    "run_protocol",
]

SCALE = 5.0
MOTIONS = (0.0, 0.03, 0.05)
ACCELERATIONS = (1.0, 4.0, 8.0)
SLICE_AXIS = 2  # axial, after Orientation("RAS")


@dataclass(frozen=True)
class Setting:
    """One degradation setting of the protocol."""

    motion: float
    acceleration: float
    scale: float = SCALE
    slice_axis: int = SLICE_AXIS
    pe_axis: int | None = None  # None: the acquisition's default, the first in-plane axis

    def __post_init__(self) -> None:
        """Refuse a slice axis, or a phase-encode axis that is not in-plane, here, not later in the simulation."""
        resolve_pe_axis(self.slice_axis, self.pe_axis)

    @property
    def name(self) -> str:
        """Stable identifier used in seeds, tables and file names, e.g. ``s5_m0.03_R4`` (``..._pe1``)."""
        name = f"s{self.scale:g}_m{self.motion:g}_R{self.acceleration:g}"
        return name if self.pe_axis is None else f"{name}_pe{self.pe_axis}"


PROTOCOL_SETTINGS: tuple[Setting, ...] = tuple(Setting(m, a) for m in MOTIONS for a in ACCELERATIONS)


class Method(Protocol):
    """What the harness calls; returns the reconstruction on ``(target_affine, target_shape)``."""

    def __call__(
        self,
        degraded: MetaTensor,
        acquisition: dict[str, Any],
        target_affine: torch.Tensor,
        target_shape: Sequence[int],
    ) -> MetaTensor: ...


METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator adding a method to :data:`METHODS` under ``name`` (a duplicate name is an error)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"method name {name!r} must be letters, digits, '_', '-' or '.' (it names files).")

    def decorator(fn: Method) -> Method:
        if name in METHODS and METHODS[name] is not fn:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name]!r}).")
        METHODS[name] = fn
        return fn

    return decorator


register_method("linear")(linear_baseline)
register_method("bspline")(bspline_baseline)


def load_volume(path: str | Path) -> MetaTensor:
    """Load a volume as a float32 ``(1, X, Y, Z)`` MetaTensor in RAS (axis 2 axial)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    loader = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS", labels=None),
            EnsureType(dtype=torch.float32),
        ]
    )
    return loader(str(path))


def volume_name(path: str | Path) -> str:
    """File name without the NIfTI extensions: ``.../subject_a_t1.nii.gz`` -> ``subject_a_t1``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def setting_seed(volume: str, setting: Setting, base_seed: int = 0) -> int:
    """Fixed seed of one (volume, setting): CRC32 of ``"{volume}|{setting.name}|{base_seed}"``."""
    return zlib.crc32(f"{volume}|{setting.name}|{base_seed}".encode())


def degrade(volume: MetaTensor, setting: Setting, seed: int) -> tuple[MetaTensor, dict[str, Any]]:
    """Simulate the acquisition; return the thick-slice input and the acquisition record for methods."""
    sim = SimulateAcquisition(
        scale=setting.scale,
        motion=setting.motion,
        acceleration=setting.acceleration,
        slice_axis=setting.slice_axis,
        pe_axis=setting.pe_axis,
        seed=seed,
    )
    degraded = sim(volume)
    params = degraded.meta.get("acquisition")
    if not isinstance(params, dict):
        raise RuntimeError("SimulateAcquisition did not record meta['acquisition']; the protocol needs it.")
    acquisition = {**params, "kspace": sim.kspace, "mask": sim.mask, "seed": seed}
    return degraded, acquisition


def _clone_acquisition(acquisition: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in acquisition.items()}


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024.0 if match else None


def _reset_peak_rss() -> float | None:
    """Reset the kernel's resident-set high-water mark (Linux); return the RSS it restarts from (MiB).

    None where that is not possible, and the harness falls back to the lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


def _peak_rss_mb(start_mb: float | None) -> tuple[float, float]:
    """``(peak RSS, peak - RSS at the reset)`` in MiB since :func:`_reset_peak_rss`.

    Without a reset: the process's lifetime peak from ``getrusage`` (an upper bound) and NaN.
    """
    if start_mb is not None:
        peak = _proc_status_mb("VmHWM")
        if peak is not None:
            return peak, max(peak - start_mb, 0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
    return peak_mb, math.nan


def run_method(
    name: str,
    degraded: MetaTensor,
    acquisition: dict[str, Any],
    target_affine: torch.Tensor,
    target_shape: Sequence[int],
) -> tuple[MetaTensor, float, float, float]:
    """Run one registered method on private copies of the inputs.

    Returns ``(output, seconds, peak_rss_mb, rss_increase_mb)``: wall time of the call, the
    process's peak resident memory during it (everything the process holds, harness included) and
    that peak minus the resident memory when the method started (the method's own footprint).
    Raises ``ValueError`` when the method does not return a MetaTensor on the target grid.
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    deg, acq = degraded.clone(), _clone_acquisition(acquisition)
    start_mb = _reset_peak_rss()
    start = time.perf_counter()
    out = METHODS[name](deg, acq, target_affine.clone(), tuple(target_shape))
    seconds = time.perf_counter() - start
    peak, increase = _peak_rss_mb(start_mb)
    if not isinstance(out, MetaTensor):
        raise ValueError(f"method {name!r} returned {type(out).__name__}; expected a MetaTensor with its affine.")
    if tuple(out.shape[1:]) != tuple(target_shape):
        raise ValueError(
            f"method {name!r} returned spatial shape {tuple(out.shape[1:])}; expected {tuple(target_shape)}."
        )
    if not torch.allclose(out.affine.to(torch.float64), target_affine.to(torch.float64), atol=1e-4):
        raise ValueError(
            f"method {name!r} returned affine\n{out.affine.numpy()}\nexpected the target affine\n"
            f"{target_affine.numpy()}"
        )
    return out, seconds, peak, increase


def run_protocol(
    volumes: Iterable[str | Path],
    settings: Sequence[Setting] = PROTOCOL_SETTINGS,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    figure_dir: str | Path | None = None,
    figure_volume: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run the protocol; return one row per (volume, setting, method).

    Row keys: ``volume, setting, motion, acceleration, scale, seed, method, psnr, ssim, psnr_head,
    ssim_head, seconds, peak_rss_mb, rss_increase_mb`` (see :func:`run_method`). With
    ``figure_dir``, one PNG per setting is drawn for ``figure_volume`` (default: the first volume)
    with :func:`scripts.report.plot_setting_figure`.
    """
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    if not methods:
        raise ValueError("no method to run.")
    volumes = [Path(v) for v in volumes]
    if not volumes:
        raise ValueError("no volume to evaluate.")
    names = [volume_name(v) for v in volumes]
    if len(set(names)) != len(names):
        raise ValueError(f"volume names must be unique (they seed the degradation), got {names}.")
    if figure_dir is not None:
        from scripts.report import plot_setting_figure  # matplotlib only when figures are wanted

        figure_dir = Path(figure_dir)
        figure_dir.mkdir(parents=True, exist_ok=True)
        figure_volume = figure_volume or names[0]
    say = log or (lambda _msg: None)

    rows: list[dict[str, Any]] = []
    for path, vname in zip(volumes, names, strict=True):
        gt = load_volume(path)
        mask = head_mask(gt)
        target_affine, target_shape = gt.affine.to(torch.float64), tuple(gt.shape[1:])
        say(f"{vname}: shape {target_shape}, head mask {float(mask.float().mean()):.1%} of the volume")
        for setting in settings:
            run_seed = setting_seed(vname, setting, seed)
            degraded, acquisition = degrade(gt, setting, run_seed)
            outputs = {}
            for method in methods:
                out, seconds, peak, increase = run_method(method, degraded, acquisition, target_affine, target_shape)
                scores = evaluate_reconstruction(out, gt, mask=mask)
                row = {
                    "volume": vname,
                    "setting": setting.name,
                    "motion": setting.motion,
                    "acceleration": setting.acceleration,
                    "scale": setting.scale,
                    "seed": run_seed,
                    "method": method,
                    **scores,
                    "seconds": seconds,
                    "peak_rss_mb": peak,
                    "rss_increase_mb": increase,
                }
                rows.append(row)
                say(
                    f"  {setting.name:>14s} {method:>10s}: PSNR {scores['psnr']:.2f} dB "
                    f"(head {scores['psnr_head']:.2f}), SSIM {scores['ssim']:.4f} "
                    f"(head {scores['ssim_head']:.4f}), {seconds:.1f} s, peak {peak:.0f} MiB (+{increase:.0f})"
                )
                if figure_dir is not None and vname == figure_volume:
                    outputs[method] = out
                else:
                    del out
            if outputs:
                on_grid = nearest_on_grid(degraded, target_affine, target_shape)
                fig_path = figure_dir / f"{vname}_{setting.name}.png"
                plot_setting_figure(gt, on_grid, outputs, fig_path, title=f"{vname}  {setting.name}")
                say(f"  figure: {fig_path}")
    return rows

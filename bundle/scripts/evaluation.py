"""``configs/evaluate.json``: the evaluation protocol on a datalist with the bundle's model, on one or many processes.

A thin layer over the harness (:func:`scripts.protocol.run_protocol` scores, :mod:`scripts.report`
writes): it resolves the volumes (a MONAI datalist JSON or a folder), the settings and the
methods; imports the modules that register methods (:mod:`scripts.prinr_methods` by default)
and points them at the bundle's checkpoint; and, under ``torchrun`` with
``configs/multi_gpu_evaluate.json``, gives every rank a share of the volumes and gathers the rows
on rank 0, which writes:

* ``results.csv``: one row per (volume, setting, method), in the single-process order;
* ``summary.csv``: mean and sample standard deviation over volumes per (setting, method);
* ``results.md``: :func:`scripts.report.markdown_table` (quality per setting, cost per method);
* ``figures/<volume>_<setting>.png`` for the first volume (or ``figure_volume``), drawn by the rank
  that evaluates it.

Degradation seeds depend only on the volume name, the setting and the base seed
(:func:`scripts.protocol.setting_seed`), so the rows do not depend on how volumes are sharded;
only the cost columns (time, memory) do.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.flags import as_bool
from scripts.inference import find_scans
from scripts.protocol import METHODS, PROTOCOL_SETTINGS, Setting, run_protocol, volume_name
from scripts.report import markdown_table, write_csv

__all__ = [
    "SUMMARY_METRICS",
    "load_volumes",
    "parse_settings",
    "shard",
    "summary_rows",
    "write_summary_csv",
    "ProtocolEvaluator",
]

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("psnr", "ssim", "psnr_head", "ssim_head", "seconds", "peak_rss_mb")
_SETTING_NAME = re.compile(
    r"^s(?P<scale>[0-9.]+)_m(?P<motion>[0-9.]+)_R(?P<acceleration>[0-9.]+)(?:_pe(?P<pe_axis>[0-9]))?$"
)


def load_volumes(
    datalist: str | os.PathLike | Sequence[Any] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    data_list_key: str = "validation",
    base_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Ground-truth volumes to evaluate, from exactly one of ``datalist`` and ``dataset_dir``.

    Args:
        datalist: a MONAI datalist JSON file (``{"validation": [{"image": "a.nii.gz"}, ...]}``;
            relative paths are relative to ``base_dir``, default the file's folder), or the list
            itself (dicts with ``"image"``, or paths).
        dataset_dir: a folder of NIfTI volumes (all of them, sorted by name).
        data_list_key: the datalist's key to read.
        base_dir: folder that relative datalist paths are relative to.
    """
    if (datalist is None) == (dataset_dir is None):
        raise ValueError("give exactly one of 'datalist' (a MONAI datalist JSON) and 'dataset_dir' (a folder).")
    if dataset_dir is not None:
        folder = Path(dataset_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset_dir '{folder}' is not a folder of NIfTI volumes.")
        items = find_scans(folder)
        if len(items) == 1 and Path(items[0]["image"]) == folder:
            raise ValueError(f"dataset_dir '{folder}' holds no NIfTI volume (.nii or .nii.gz).")
        return [item["image"] for item in items]
    if isinstance(datalist, (str, os.PathLike)):
        from monai.data import load_decathlon_datalist

        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist '{path}' not found; expected a MONAI datalist JSON file.")
        with open(path) as f:
            keys = list(json.load(f))
        if data_list_key not in keys:
            raise ValueError(f"datalist '{path}' has no '{data_list_key}' list (keys: {keys}).")
        items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=data_list_key, base_dir=base_dir)
    else:
        root = Path(base_dir) if base_dir is not None else None
        items = [item if isinstance(item, Mapping) else {"image": item} for item in datalist]
        items = [{"image": str(root / item["image"]) if root else str(item["image"])} for item in items]
    volumes = [str(item["image"]) for item in items]
    if not volumes:
        raise ValueError("the datalist is empty; nothing to evaluate.")
    missing = [v for v in volumes if not Path(v).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} volume(s) of the datalist not found, e.g. '{missing[0]}'.")
    return volumes


def parse_settings(settings: str | Sequence[str | Mapping[str, Any]] | None = None) -> tuple[Setting, ...]:
    """Protocol settings: ``None``/``"all"`` (the nine), names like ``"s5_m0.03_R4"``, or dicts of :class:`Setting`."""
    if settings is None or settings == "all":
        return PROTOCOL_SETTINGS
    if isinstance(settings, str):
        settings = [settings]
    out = []
    for item in settings:
        if isinstance(item, Mapping):
            out.append(Setting(**item))
            continue
        match = _SETTING_NAME.match(str(item))
        if not match:
            raise ValueError(
                f"setting {item!r} is not a name like 's5_m0.03_R4' (scale, motion, acceleration; "
                "optionally '_pe1' for the phase-encode axis)."
            )
        pe_axis = None if match["pe_axis"] is None else int(match["pe_axis"])
        out.append(
            Setting(float(match["motion"]), float(match["acceleration"]), float(match["scale"]), pe_axis=pe_axis)
        )
    names = [s.name for s in out]
    if len(set(names)) != len(names) or not out:
        raise ValueError(f"settings must be a non-empty list without repeats, got {names}.")
    return tuple(out)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items ``rank, rank + world_size, ...``: every item on exactly one rank, balanced to within one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}.")
    return list(items[rank::world_size])


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (NaN for one volume) of :data:`SUMMARY_METRICS` per (setting, method), in run order."""
    out = []
    keys = list(dict.fromkeys((r["setting"], r["method"]) for r in rows))
    for setting, method in keys:
        sel = [r for r in rows if r["setting"] == setting and r["method"] == method]
        summary: dict[str, Any] = {"setting": setting, "method": method, "n": len(sel)}
        for metric in SUMMARY_METRICS:
            values = np.asarray([float(r[metric]) for r in sel], dtype=np.float64)
            summary[f"{metric}_mean"] = float(values.mean())
            summary[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(summary)
    return out


def write_summary_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write :func:`summary_rows` of ``rows`` to ``path``."""
    summary = summary_rows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return path


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ProtocolEvaluator:
    """Run the protocol on ``volumes`` and write the reports; ``run()`` returns all rows on rank 0 (``[]`` elsewhere).

    Args:
        volumes: ground-truth volumes (see :func:`load_volumes`).
        output_dir: where ``results.csv``, ``summary.csv``, ``results.md`` and ``figures/`` go.
        methods: registered method names; None for every registered one.
        settings: see :func:`parse_settings`.
        seed: base seed of the degradations.
        figures: draw one figure per setting for ``figure_volume`` (default: the first volume).
        plugins: modules imported first; importing them registers methods.
        checkpoint, network_config, device: where :mod:`scripts.prinr_methods` gets its network
            (see :func:`scripts.prinr_methods.configure`); ignored when that module is not a plugin.
        diffusion_seed: seed of stage 1's sampling noise.
        distributed: shard the volumes over the initialised process group and gather on rank 0.
        overwrite: replace existing reports in ``output_dir`` (otherwise fail before any work).
    """

    def __init__(
        self,
        volumes: Sequence[str | os.PathLike],
        output_dir: str | os.PathLike,
        methods: Sequence[str] | None = None,
        settings: str | Sequence[str | Mapping[str, Any]] | None = None,
        seed: int = 0,
        figures: bool = True,
        figure_volume: str | None = None,
        plugins: Sequence[str] = ("scripts.prinr_methods",),
        checkpoint: str | os.PathLike | None = None,
        network_config: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        diffusion_seed: int = 0,
        distributed: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.volumes = [str(v) for v in volumes]
        if not self.volumes:
            raise ValueError("no volume to evaluate.")
        names = [volume_name(v) for v in self.volumes]
        if len(set(names)) != len(names):
            raise ValueError(f"volume names must be unique (they seed the degradation), got {names}.")
        self.output_dir = Path(output_dir)
        self.plugins = [importlib.import_module(p) for p in plugins]
        self.methods = list(METHODS) if methods is None else list(methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; registered: {list(METHODS)}")
        self.settings = parse_settings(settings)
        self.seed = int(seed)
        self.figure_volume = figure_volume or (names[0] if as_bool(figures) else None)
        if self.figure_volume is not None and self.figure_volume not in names:
            raise ValueError(f"figure_volume {self.figure_volume!r} is not one of the volumes {names}.")
        self.distributed = as_bool(distributed)
        self.overwrite = as_bool(overwrite)
        existing = [str(p) for p in self.reports.values() if p.exists()]
        if existing and not self.overwrite:  # checked on every rank, before any work
            raise FileExistsError(f"{existing[0]} already exists; pass '--overwrite true' to replace it.")
        for module in self.plugins:
            if hasattr(module, "configure"):
                module.configure(checkpoint=checkpoint, config_file=network_config, device=device, seed=diffusion_seed)

    @property
    def reports(self) -> dict[str, Path]:
        return {name: self.output_dir / name for name in ("results.csv", "summary.csv", "results.md")}

    def run(self) -> list[dict[str, Any]]:
        rank, world = _distributed() if self.distributed else (0, 1)
        mine = shard(self.volumes, rank, world)
        prefix = f"[rank {rank}/{world}] " if world > 1 else ""
        log: Callable[[str], None] = lambda msg: logger.info("%s%s", prefix, msg)  # noqa: E731
        log(f"evaluating {len(mine)} of {len(self.volumes)} volume(s), {len(self.settings)} setting(s), {self.methods}")
        rows: list[dict[str, Any]] = []
        if mine:
            figures = self.figure_volume in {volume_name(v) for v in mine}
            rows = run_protocol(
                mine,
                settings=self.settings,
                methods=self.methods,
                seed=self.seed,
                figure_dir=self.output_dir / "figures" if figures else None,
                figure_volume=self.figure_volume if figures else None,
                log=log,
            )
            for module in self.plugins:
                if hasattr(module, "finalize_rows"):
                    module.finalize_rows(rows)
        if world > 1:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            torch.distributed.gather_object(rows, gathered, dst=0)
            if rank != 0:
                return []
            rows = [row for part in gathered for row in part]
        rows = self._in_protocol_order(rows)
        self.write(rows)
        return rows

    def _in_protocol_order(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The single-process order: volume (as listed), then setting, then method."""
        volume_index = {volume_name(v): i for i, v in enumerate(self.volumes)}
        setting_index = {s.name: i for i, s in enumerate(self.settings)}
        method_index = {m: i for i, m in enumerate(self.methods)}
        return sorted(
            rows, key=lambda r: (volume_index[r["volume"]], setting_index[r["setting"]], method_index[r["method"]])
        )

    def write(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
        """Write ``results.csv``, ``summary.csv`` and ``results.md`` for ``rows``."""
        paths = self.reports
        write_csv(rows, paths["results.csv"])
        write_summary_csv(rows, paths["summary.csv"])
        header = (
            f"# Evaluation\n\nVolumes: {', '.join(volume_name(v) for v in self.volumes)}; base seed {self.seed}. "
            "PSNR/SSIM after dividing by the ground truth's 99.5th percentile and clipping to [0, 1]; "
            "'head' = inside the ground-truth head mask. PR-INR rows report each method's stand-alone cost "
            "(see scripts/prinr_methods.py).\n\n"
        )
        paths["results.md"].write_text(header + markdown_table(rows))
        logger.info("wrote %s, %s and %s", *paths.values())
        return paths

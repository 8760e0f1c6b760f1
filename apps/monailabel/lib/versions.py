"""Model versions: the shipped weights, then one ``model_<UTC time>.pt`` per fine-tuning run in the app's model folder.

A new version is written under a temporary name and renamed, so inference never loads a partial
file, and earlier versions are kept so that a run can be rolled back by deleting its file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

PREFIX = "model_"
SUFFIX = ".pt"


def utc_stamp() -> str:
    """UTC date and time down to microseconds; such names sort in time order."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


class ModelVersions:
    """The weights versions of one model: ``shipped`` first, then the files published into ``folder``."""

    def __init__(self, folder: str | os.PathLike, shipped: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)  # MONAI Label's model upload copies into next_path()
        self.shipped = Path(shipped)

    def published(self) -> list[Path]:
        """The fine-tuned versions, oldest first (the names sort by time)."""
        return sorted(p for p in self.folder.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())

    def latest(self) -> Path:
        """The newest published version, or the shipped weights when there is none."""
        published = self.published()
        return published[-1] if published else self.shipped

    def next_path(self) -> Path:
        """Where the next version goes: ``model_<stamp>.pt``."""
        return self.folder / f"{PREFIX}{utc_stamp()}{SUFFIX}"

    def publish(self, weights: str | os.PathLike) -> Path:
        """Copy ``weights`` in as the newest version, atomically; return its path."""
        target = self.next_path()
        handle, temporary = tempfile.mkstemp(prefix=".publishing-", suffix=".part", dir=self.folder)
        os.close(handle)
        try:
            shutil.copyfile(weights, temporary)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return target

    def label(self, path: str | os.PathLike) -> str:
        """How a version is reported to clients: ``shipped`` or the published file's name."""
        return "shipped" if Path(path) == self.shipped else Path(path).name

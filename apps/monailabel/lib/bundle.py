"""The PR-INR bundle that the app serves, used through its own configs and code.

The bundle folder goes on ``sys.path`` so that its package imports as ``scripts``, exactly as its
configs expect (``"$import scripts.inference"``). Configs are read with MONAI's ``ConfigParser``, so
the app builds the same network, transforms and inferer as ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from monai.bundle import ConfigParser

REQUIRED_FILES = ("configs/inference.json", "configs/metadata.json", "scripts/__init__.py", "models/model.pt")


class Bundle:
    """The bundle at ``path``: its configs, its metadata and its shipped weights."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()
        missing = [name for name in REQUIRED_FILES if not (self.path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"bundle_path '{self.path}' is not the PR-INR bundle ({', '.join(missing)} missing); "
                "pass the bundle folder with --conf bundle_path <folder>."
            )
        if str(self.path) not in sys.path:
            sys.path.insert(0, str(self.path))
        metadata = json.loads((self.path / "configs" / "metadata.json").read_text())
        self.name = metadata["name"]
        self.version = metadata["version"]

    @property
    def config_dir(self) -> Path:
        return self.path / "configs"

    @property
    def weights(self) -> Path:
        """The shipped weights, ``models/model.pt``: the model version used until a fine-tuning run publishes one."""
        return self.path / "models" / "model.pt"

    def config(self, name: str, **overrides) -> ConfigParser:
        """A fresh parser of ``configs/<name>`` rooted at the bundle, with ``overrides`` (ids like ``a#b``) applied."""
        parser = ConfigParser()
        parser.read_config(str(self.config_dir / name))
        parser.update({"bundle_root": str(self.path), **overrides})
        return parser

"""Make the bundle's Python package importable as ``scripts`` and locate the shared data."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundle"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if str(BUNDLE_DIR) not in sys.path:
    sys.path.insert(0, str(BUNDLE_DIR))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def app_python(name: str) -> Path:
    """Interpreter of an app's own environment (``apps/<name>/setup.sh``), from ``PRINR_<NAME>_PYTHON``.

    Defaults to ``.venv-<name>/bin/python`` in the repository. Skips when it is missing, unless
    ``PRINR_REQUIRE_APP_ENVS=1`` (set by ``.ci/run``), where a missing environment is a failure.
    """
    python = Path(os.environ.get(f"PRINR_{name.upper()}_PYTHON", REPO_ROOT / f".venv-{name}" / "bin" / "python"))
    if not python.exists():
        message = f"the {name} app environment is missing ({python}); build it with apps/{name}/setup.sh"
        if os.environ.get("PRINR_REQUIRE_APP_ENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def load_repository_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` of the repository (not a package: the bundle's ``scripts`` shadows it)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_whole_phase_encode_lines(mask: torch.Tensor, pe_axis: int) -> None:
    """A ``(C, X, Y, Z)`` sampling mask of axial slices keeps or drops whole phase-encode lines.

    It is constant along the read-out axis (the other in-plane one) and varies along ``pe_axis``.
    """
    mask = mask.to(torch.float32)
    readout_axis = 1 - pe_axis
    assert torch.equal(mask, mask.amax(dim=readout_axis + 1, keepdim=True).expand_as(mask))
    assert not torch.equal(mask, mask.amax(dim=pe_axis + 1, keepdim=True).expand_as(mask))

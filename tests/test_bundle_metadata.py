"""The bundle's configs/metadata.json: valid against the Model Zoo schema and consistent with the repo."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundle"
META_FILE = BUNDLE_DIR / "configs" / "metadata.json"
SCHEMA_FILE = REPO_ROOT.parent / "shared" / "schema" / "meta_schema_20240725.json"
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(META_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schema_file() -> Path:
    # verify_metadata downloads the schema when --filepath does not exist: never let a test do that.
    if not SCHEMA_FILE.is_file():
        pytest.skip(f"shared metadata schema not found at {SCHEMA_FILE}")
    return SCHEMA_FILE


def requirement_pins() -> dict[str, str]:
    """Package name (lower case) -> version specifier text, from requirements.txt."""
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
            pins[name.lower()] = line[len(name) :]
    return pins


def test_verify_metadata_cli(schema_file: Path) -> None:
    """The exact command a bundle author runs: python -m monai.bundle verify_metadata, offline."""
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        str(schema_file),
    ]
    proc = subprocess.run(cmd, cwd=BUNDLE_DIR, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "metadata is verified with no error" in output, output
    assert "skipped downloading" in output, output


def test_verify_metadata_rejects_broken_metadata(metadata: dict, schema_file: Path, tmp_path: Path) -> None:
    """The check is not vacuous: dropping a required key makes verification fail."""
    from monai.bundle import verify_metadata

    broken = dict(metadata)
    del broken["network_data_format"]
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))


def test_version_and_changelog(metadata: dict) -> None:
    assert SEMVER.match(metadata["version"]), metadata["version"]
    assert metadata["version"] in metadata["changelog"]
    for key in metadata["changelog"]:
        assert SEMVER.match(key), f"changelog key {key!r} is not a semantic version"
    assert metadata["name"]


def test_network_data_format(metadata: dict) -> None:
    fmt = metadata["network_data_format"]
    image = fmt["inputs"]["image"]
    pred = fmt["outputs"]["pred"]
    for tensor in (image, pred):
        assert tensor["type"] == "image"
        assert tensor["num_channels"] == 1
        assert tensor["dtype"] == "float32"
        assert tensor["channel_def"] == {"0": "image"}
        assert len(tensor["spatial_shape"]) == 3
    # Slice axis last: same in-plane grid, finer grid along the slice axis.
    assert pred["spatial_shape"][:2] == image["spatial_shape"][:2]
    assert pred["spatial_shape"][2] > image["spatial_shape"][2]
    assert image["is_patch_data"] is False


def test_versions_match_requirements(metadata: dict) -> None:
    """metadata.json and requirements.txt must not drift apart."""
    pins = requirement_pins()
    assert pins["monai"] == f"=={metadata['monai_version']}"
    assert pins["torch"] == f"=={metadata['pytorch_version']}"
    for name in metadata["required_packages_version"]:
        assert name.lower() in pins, f"{name} is in metadata.json but not in requirements.txt"


def test_intended_use_and_references(metadata: dict) -> None:
    assert "not for clinical" in metadata["intended_use"].lower()
    assert any("Progressive Refinement Implicit Neural Representation" in ref for ref in metadata["references"])


def test_logging_conf_is_accepted_by_monai() -> None:
    """configs/logging.conf parses and passes MONAI's check for executable logging INI fields."""
    import configparser

    logging_file = BUNDLE_DIR / "configs" / "logging.conf"
    parser = configparser.RawConfigParser()
    parser.read(logging_file, encoding="utf-8")
    assert parser.get("formatter_fullFormatter", "format") == "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

    from monai.bundle import workflows

    check = getattr(workflows, "_reject_executable_logging_config", None)
    if check is None:
        pytest.skip("this MONAI version has no logging config check")
    check(str(logging_file))  # raises ValueError when MONAI would refuse to apply the file


def test_verify_net_in_out_cli() -> None:
    """The Model Zoo's network check: network_def maps the metadata's input shape to its output shape."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def"]
    cmd += ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    proc = subprocess.run(cmd, cwd=BUNDLE_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr

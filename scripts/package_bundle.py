"""Package the bundle as a Model Zoo zip: ``<name>_v<version>.zip`` holding one top-level folder ``<name>/``.

``python -m monai.bundle download --name <name> --url <url of the zip>`` saves the zip as
``<bundle_dir>/<name>.zip`` and extracts it into ``<bundle_dir>``, so the zip's single top-level
folder must be the bundle name. The zip is deterministic: entries sorted by path, fixed timestamps
(1980-01-01 00:00:00, the earliest a zip can store), fixed permissions (0644) and compression level,
so packaging the same files twice gives byte-identical zips (same sha256).

Left out: Python caches (``__pycache__``, ``*.pyc``), hidden files and folders, what runs write
(top-level ``logs/``, ``runs/``, ``outputs/``, ``eval/``, ``cache/``, ``mlruns/``), TensorBoard event
files, ``*.log`` files, and exports derived from ``models/model.pt`` (``models/model.ts``, ONNX and
TensorRT files; ``--include-exports`` keeps them), which ``ckpt_export`` reproduces on demand.
Files larger than ``--max-file-size`` (25 MiB, the Model Zoo's limit) are not zipped: they are
listed with their sha256 in ``<name>/large_files.yml`` (Model Zoo format, read by
``python -m monai.bundle download_large_files``) and must be uploaded to the URL given by
``--large-file-url``.

    python scripts/package_bundle.py [--bundle-dir bundle] [--output-dir dist] [--name NAME]
        [--max-file-size BYTES] [--large-file-url 'https://host/{name}/v{version}/{path}'] [--include-exports]

Prints the zip's path and sha256.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE_DIR = REPO_ROOT / "bundle"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "dist"
# The bundle's filesystem name (Model Zoo folder, zip folder, `--name` of `monai.bundle download`/`load`);
# metadata.json's "name" is the human-readable title.
BUNDLE_NAME = "prinr_brain_mri_reconstruction"
MAX_FILE_SIZE = 25 * 1024 * 1024
LARGE_FILES_NAME = "large_files.yml"

ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644  # regular file, rw-r--r--
COMPRESS_LEVEL = 9

REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE")
EXCLUDED_DIR_NAMES = {"__pycache__"}
EXCLUDED_TOP_LEVEL_DIRS = {"logs", "runs", "outputs", "eval", "cache", "mlruns"}
EXCLUDED_FILE_PATTERNS = ("*.pyc", "*.pyo", "events.out.tfevents.*", "*.log", "*~", "*.swp")
EXPORT_PATTERNS = ("models/model.ts", "models/*.onnx", "models/*.plan", "models/*.engine")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass(frozen=True)
class LargeFile:
    path: str
    url: str
    hash_val: str
    hash_type: str = "sha256"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_version(bundle_dir: Path) -> str:
    """The version in ``configs/metadata.json``; it must be a semantic version listed in the changelog."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))
    version = str(meta.get("version", ""))
    if not SEMVER.match(version):
        raise ValueError(f"metadata.json version {version!r} is not a semantic version (MAJOR.MINOR.PATCH).")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"metadata.json version {version} has no entry in its changelog.")
    return version


def is_excluded(relative: PurePosixPath, include_exports: bool = False) -> bool:
    """Whether a bundle file (path relative to the bundle root) is left out of the package."""
    parts = relative.parts
    if any(part.startswith(".") for part in parts):
        return True
    if any(part in EXCLUDED_DIR_NAMES for part in parts[:-1]):
        return True
    if len(parts) > 1 and parts[0] in EXCLUDED_TOP_LEVEL_DIRS:
        return True
    if any(fnmatch.fnmatchcase(parts[-1], pattern) for pattern in EXCLUDED_FILE_PATTERNS):
        return True
    if not include_exports and any(fnmatch.fnmatchcase(relative.as_posix(), p) for p in EXPORT_PATTERNS):
        return True
    return False


def collect_files(bundle_dir: Path, include_exports: bool = False) -> list[PurePosixPath]:
    """The bundle's files to package, as sorted POSIX paths relative to ``bundle_dir``."""
    files = []
    for root, dirs, names in os.walk(bundle_dir):
        root_path = Path(root)
        relative_root = PurePosixPath(root_path.relative_to(bundle_dir).as_posix())
        # prune excluded folders early (hidden, caches, run outputs at the top level)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in EXCLUDED_DIR_NAMES
            and not (relative_root == PurePosixPath(".") and d in EXCLUDED_TOP_LEVEL_DIRS)
        ]
        for name in names:
            relative = relative_root / name if relative_root != PurePosixPath(".") else PurePosixPath(name)
            path = root_path / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link; the package holds regular files only.")
            if not path.is_file() or is_excluded(relative, include_exports):
                continue
            files.append(relative)
    return sorted(files, key=lambda p: p.as_posix())


def large_files_yaml(large_files: list[LargeFile]) -> str:
    """``large_files.yml`` in the Model Zoo's format; strings are JSON-quoted (valid YAML scalars)."""
    lines = ["large_files:"]
    for item in large_files:
        lines.append(f"  - path: {json.dumps(item.path)}")
        lines.append(f"    url: {json.dumps(item.url)}")
        lines.append(f"    hash_val: {json.dumps(item.hash_val)}")
        lines.append(f"    hash_type: {json.dumps(item.hash_type)}")
    return "\n".join(lines) + "\n"


def _zip_info(arcname: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that the permissions below are honoured
    info.external_attr = FILE_MODE << 16
    return info


def package_bundle(
    bundle_dir: str | os.PathLike = DEFAULT_BUNDLE_DIR,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    name: str = BUNDLE_NAME,
    max_file_size: int = MAX_FILE_SIZE,
    large_file_url: str | None = None,
    include_exports: bool = False,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` and return its path (see the module docstring).

    ``large_file_url`` is a template for the download URL of each file over ``max_file_size``
    bytes, with ``{name}``, ``{version}`` and ``{path}`` (the file's path in the bundle) filled in;
    it is required when there are such files.
    """
    bundle_dir = Path(bundle_dir).resolve()
    output_dir = Path(output_dir)
    if not NAME_PATTERN.match(name):
        raise ValueError(f"bundle name {name!r} must be lower-case letters, digits and underscores (no dots).")
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle_dir} is not a complete bundle: missing {', '.join(missing)}.")
    version = bundle_version(bundle_dir)
    files = collect_files(bundle_dir, include_exports)

    zipped, large = [], []
    for relative in files:
        path = bundle_dir / relative
        if path.stat().st_size > max_file_size:
            if large_file_url is None:
                raise ValueError(
                    f"{relative} is larger than {max_file_size} bytes: it goes to {LARGE_FILES_NAME} instead of "
                    "the zip and needs a download URL; pass --large-file-url (e.g. "
                    "'https://host/{name}/v{version}/{path}') and upload the file there."
                )
            url = large_file_url.format(name=name, version=version, path=relative.as_posix())
            large.append(LargeFile(relative.as_posix(), url, sha256_file(path)))
        else:
            zipped.append(relative)
    entries = {f"{name}/{relative.as_posix()}": bundle_dir / relative for relative in zipped}
    if large:
        arcname = f"{name}/{LARGE_FILES_NAME}"
        if arcname in entries:
            raise ValueError(f"the bundle has its own {LARGE_FILES_NAME} and files over {max_file_size} bytes.")
        entries[arcname] = large_files_yaml(large).encode()

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    handle, temporary = tempfile.mkstemp(suffix=".zip.part", dir=output_dir)
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w") as archive:
            for arcname in sorted(entries):
                source = entries[arcname]
                data = source if isinstance(source, bytes) else source.read_bytes()
                archive.writestr(_zip_info(arcname), data, compresslevel=COMPRESS_LEVEL)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-dir", type=Path, default=DEFAULT_BUNDLE_DIR, help="bundle root (default: bundle/)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the zip goes (dist/)")
    parser.add_argument("--name", default=BUNDLE_NAME, help=f"bundle name, the zip's folder (default: {BUNDLE_NAME})")
    parser.add_argument(
        "--max-file-size", type=int, default=MAX_FILE_SIZE, help="bytes; larger files go to large_files.yml"
    )
    parser.add_argument("--large-file-url", help="URL template of large files: {name}, {version}, {path}")
    parser.add_argument("--include-exports", action="store_true", help="also package models/model.ts etc.")
    args = parser.parse_args(argv)
    try:
        target = package_bundle(
            args.bundle_dir, args.output_dir, args.name, args.max_file_size, args.large_file_url, args.include_exports
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
    print(f"{target}  ({len(names)} files, sha256 {sha256_file(target)})")
    if f"{args.name}/{LARGE_FILES_NAME}" in names:
        print(f"large files listed in {args.name}/{LARGE_FILES_NAME}: upload them to their URLs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model Zoo readiness: deterministic packaging, download from a URL, the downloaded copy run and loaded
outside the repository, and the TorchScript export of ``ckpt_export`` against the eager pipeline.

The zip is served from a local HTTP server (127.0.0.1, a free port) and fetched with
``python -m monai.bundle download --name <name> --url <url>``. Everything that uses the downloaded
copy runs in a subprocess whose working directory is outside the repository, with ``PYTHONPATH``
naming the downloaded bundle only, so its own ``scripts`` package is the one imported.
"""

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_repository_script
from monai.bundle import ConfigParser

from scripts.networks import PRINRPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundle"
SAMPLE = BUNDLE_DIR / "sample_data" / "icbm152_t1_thick5_motion3_r4.nii.gz"
SAMPLE_OUTPUT = "icbm152_t1_thick5_motion3_r4_recon.nii.gz"
# Settings of configs/inference.json for the sample (1 x 1 x 5 mm: scale 5, slice axis already last).
SAMPLE_SETTINGS = {"scale": 5.0, "acceleration": 4.0, "motion": 0.03}
# TorchScript vs eager: max |difference| relative to the eager output's 99.5th percentile (measured: 0, bit-identical
# on CPU; the bound leaves room for other BLAS/thread set-ups).
TORCHSCRIPT_RTOL = 1e-5


package_tool = load_repository_script("package_bundle")
NAME = package_tool.BUNDLE_NAME
VERSION = json.loads((BUNDLE_DIR / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
ZIP_NAME = f"{NAME}_v{VERSION}.zip"


def clean_env(pythonpath: Path | None = None) -> dict[str, str]:
    """The test's environment without any PYTHONPATH (or with only ``pythonpath``); no proxy for the local server."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run(command, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def outside_repo(path: Path) -> Path:
    assert REPO_ROOT not in path.resolve().parents, f"{path} must be outside the repository"
    return path


def eager_network(**kwargs) -> PRINRPipeline:
    """The shipped weights in the pipeline ``configs/inference.json`` builds (``kwargs`` set over its network_def)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_DIR / "configs" / "inference.json"))
    for key, value in kwargs.items():
        parser[f"network_def#{key}"] = value
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(BUNDLE_DIR / "models" / "model.pt", weights_only=True))
    return network


def sample_stack() -> torch.Tensor:
    image = nib.load(str(SAMPLE))
    assert np.allclose(image.header.get_zooms(), (1.0, 1.0, 5.0))  # thick-slice axis last: the network's layout
    return torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None, None]


# --- fixtures: package, serve, download ------------------------------------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """The zip written by the repository tool's CLI."""
    dist = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, REPO_ROOT / "scripts" / "package_bundle.py", "--output-dir", dist], REPO_ROOT, None)
    target = dist / ZIP_NAME
    assert target.is_file() and str(target) in result.stdout
    return target


@contextlib.contextmanager
def serve_directory(directory: Path):
    """An HTTP server for ``directory`` on 127.0.0.1 (a free port) in a thread; yields its base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def zip_url(packaged):
    """URL of the packaged zip on a local HTTP server."""
    with serve_directory(packaged.parent) as base_url:
        yield f"{base_url}/{packaged.name}"


@pytest.fixture(scope="module")
def downloaded(zip_url, tmp_path_factory) -> Path:
    """The bundle as ``python -m monai.bundle download --name ... --url ...`` leaves it."""
    work = outside_repo(tmp_path_factory.mktemp("download_work"))
    bundle_dir = tmp_path_factory.mktemp("bundles")
    command = [sys.executable, "-m", "monai.bundle", "download", "--name", NAME, "--url", zip_url]
    run([*command, "--bundle_dir", bundle_dir, "--progress", "False"], work, clean_env())
    root = bundle_dir / NAME
    assert (root / "configs" / "metadata.json").is_file() and (root / "models" / "model.pt").is_file()
    return outside_repo(root)


# --- packaging -------------------------------------------------------------------------------


def test_package_is_deterministic_and_mirrors_the_bundle(packaged, tmp_path):
    again = package_tool.package_bundle(BUNDLE_DIR, tmp_path)
    assert again.name == packaged.name
    assert again.read_bytes() == packaged.read_bytes(), "two runs must give byte-identical zips"

    expected = package_tool.collect_files(BUNDLE_DIR)
    with zipfile.ZipFile(packaged) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        assert names == sorted(names)
        assert {PurePosixPath(n).parts[0] for n in names} == {NAME}, "a single top-level folder, the bundle name"
        assert names == [f"{NAME}/{p.as_posix()}" for p in expected]
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
            assert archive.read(info) == (BUNDLE_DIR / info.filename.split("/", 1)[1]).read_bytes()
    relative = {n.split("/", 1)[1] for n in names}
    for required in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert required in relative
    assert "sample_data/icbm152_t1_thick5_motion3_r4.nii.gz" in relative
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in relative)
    assert not any(n.split("/")[0] in {"outputs", "eval", "logs", "runs", "cache"} for n in relative)


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_package_leaves_out_run_outputs_and_lists_large_files(tmp_path):
    bundle = tmp_path / "bundle"
    base = {"configs/metadata.json", "configs/inference.json", "configs/logging.conf", "docs/README.md", "LICENSE"}
    for name in base:
        _write(bundle / name, (BUNDLE_DIR / name).read_bytes())
    kept = ["scripts/__init__.py", "scripts/networks/net.py", "models/model.pt", "docs/figures/a.png"]
    for name in kept:
        _write(bundle / name, b"kept")
    left_out = [
        "scripts/__pycache__/net.cpython-311.pyc",
        "scripts/stale.pyc",
        "logs/train.log",
        "runs/stage1/events.out.tfevents.1700000000.host.1.0",
        "models/events.out.tfevents.1700000000.host.2.0",
        "outputs/sample_recon.nii.gz",
        "eval/report.md",
        "cache/pool/0.pt",
        "docs/build.log",
        ".ipynb_checkpoints/x.json",
        "scripts/.DS_Store",
        "models/model.ts",
    ]
    for name in left_out:
        _write(bundle / name)
    big = _write(bundle / "models" / "big_weights.pt", os.urandom(64 * 1024))

    with pytest.raises(ValueError, match="--large-file-url"):
        package_tool.package_bundle(bundle, tmp_path / "dist", max_file_size=32 * 1024)
    with pytest.raises(ValueError, match="no dots"):
        package_tool.package_bundle(bundle, tmp_path / "dist", name="prinr.v1")

    url = "https://example.org/{name}/v{version}/{path}"
    target = package_tool.package_bundle(bundle, tmp_path / "dist", max_file_size=32 * 1024, large_file_url=url)
    with zipfile.ZipFile(target) as archive:
        names = {n.split("/", 1)[1] for n in archive.namelist()}
        listing = archive.read(f"{NAME}/large_files.yml").decode()
    assert names == base | set(kept) | {"large_files.yml"}
    expected_listing = (
        "large_files:\n"
        '  - path: "models/big_weights.pt"\n'
        f'    url: "https://example.org/{NAME}/v{VERSION}/models/big_weights.pt"\n'
        f'    hash_val: "{hashlib.sha256(big.read_bytes()).hexdigest()}"\n'
        '    hash_type: "sha256"\n'
    )
    assert listing == expected_listing

    with_exports = package_tool.package_bundle(
        bundle, tmp_path / "dist_exports", max_file_size=32 * 1024, large_file_url=url, include_exports=True
    )
    with zipfile.ZipFile(with_exports) as archive:
        assert f"{NAME}/models/model.ts" in archive.namelist()


def test_large_files_are_fetched_and_verified_by_monai(tmp_path, monkeypatch):
    """A file over the limit is fetched from its URL and checked against its hash, as the Model Zoo does."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR / "configs", bundle / "configs", ignore=shutil.ignore_patterns("*.pyc"))
    for name in ("docs/README.md", "LICENSE"):
        _write(bundle / name, (BUNDLE_DIR / name).read_bytes())
    weights = _write(bundle / "models" / "model.pt", os.urandom(64 * 1024))
    uploads = tmp_path / "uploads"
    with serve_directory(uploads) as base_url:
        target = package_tool.package_bundle(
            bundle, tmp_path / "dist", max_file_size=32 * 1024, large_file_url=base_url + "/{name}/v{version}/{path}"
        )
        _write(uploads / NAME / f"v{VERSION}" / "models" / "model.pt", weights.read_bytes())  # the "upload"
        with zipfile.ZipFile(target) as archive:
            assert f"{NAME}/models/model.pt" not in archive.namelist()
            archive.extractall(tmp_path / "extracted")
        extracted = tmp_path / "extracted" / NAME
        try:
            import yaml  # noqa: F401  (monai's download_large_files reads large_files.yml with PyYAML)
        except ImportError:
            from monai.apps.utils import download_url

            text = (extracted / "large_files.yml").read_text()
            fields = dict(re.findall(r'(path|url|hash_val|hash_type): "([^"]*)"', text))
            download_url(
                fields["url"], str(extracted / fields["path"]), fields["hash_val"], fields["hash_type"], progress=False
            )
        else:
            from monai.bundle import download_large_files

            download_large_files(bundle_path=str(extracted))
    assert (extracted / "models" / "model.pt").read_bytes() == weights.read_bytes()


# --- the downloaded copy ---------------------------------------------------------------------


def test_download_extracts_the_packaged_bundle(downloaded, packaged):
    with zipfile.ZipFile(packaged) as archive:
        names = [n.split("/", 1)[1] for n in archive.namelist()]
    for name in names:
        assert (downloaded / name).read_bytes() == (BUNDLE_DIR / name).read_bytes(), name
    meta = json.loads((downloaded / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] == VERSION


@pytest.mark.slow
def test_downloaded_bundle_runs_outside_the_repository_like_the_source_tree(downloaded, tmp_path):
    work = outside_repo(tmp_path / "work")
    work.mkdir()
    env = clean_env(downloaded)
    probe = run([sys.executable, "-c", "import scripts; print(scripts.__file__)"], work, env)
    assert Path(probe.stdout.strip()).resolve() == (downloaded / "scripts" / "__init__.py").resolve()

    def infer(bundle_root: Path, cwd: Path, env: dict, output_dir: Path) -> nib.Nifti1Image:
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", bundle_root / "configs/inference.json"]
        run([*command, "--bundle_root", bundle_root, "--output_dir", output_dir], cwd, env)
        return nib.load(str(output_dir / SAMPLE_OUTPUT))

    from_download = infer(downloaded, work, env, tmp_path / "out_download")
    from_source = infer(BUNDLE_DIR, BUNDLE_DIR, clean_env(BUNDLE_DIR), tmp_path / "out_source")
    assert from_download.shape == from_source.shape == (160, 192, 160)
    np.testing.assert_array_equal(from_download.affine, from_source.affine)
    np.testing.assert_array_equal(from_download.get_fdata(), from_source.get_fdata())


LOAD_SCRIPT = """
import sys, torch, monai.bundle
network = monai.bundle.load(  # source is not used: the weights are already in bundle_dir
    name={name!r}, bundle_dir={bundle_dir!r}, source="github", workflow_type="inference", device="cpu",
    net_override={{"slice_batch": 4}},
)
import scripts
assert scripts.__file__.startswith({root!r}), scripts.__file__
image = 100 * torch.rand(1, 1, 64, 64, 8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    pred = network.eval()(image)
result = {{"type": type(network).__name__, "slice_batch": network.slice_batch, "image": image, "pred": pred}}
torch.save(result, {out!r})
"""


@pytest.mark.slow
def test_monai_bundle_load_of_the_downloaded_copy(downloaded, tmp_path):
    """``monai.bundle.load`` (offline: the weights are there) builds network_def from the downloaded config."""
    out = tmp_path / "loaded.pt"
    script = LOAD_SCRIPT.format(name=NAME, bundle_dir=str(downloaded.parent), root=str(downloaded), out=str(out))
    run([sys.executable, "-c", script], outside_repo(tmp_path), clean_env(downloaded))
    loaded = torch.load(out, weights_only=True)
    assert loaded["type"] == "PRINRPipeline" and loaded["slice_batch"] == 4
    meta = json.loads((BUNDLE_DIR / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]
    assert list(loaded["image"].shape[2:]) == meta["inputs"]["image"]["spatial_shape"]
    pred = meta["outputs"]["pred"]
    assert list(loaded["pred"].shape) == [1, pred["num_channels"], *pred["spatial_shape"]]
    with torch.no_grad():
        expected = eager_network(slice_batch=4)(loaded["image"])
    torch.testing.assert_close(loaded["pred"], expected, rtol=0, atol=0)


# --- TorchScript export ----------------------------------------------------------------------

TINY_STAGES = {
    "detail": {"encoder_channels": (8, 16), "gate_hidden": 4, "hidden_features": 8, "num_frequencies": 2},
    "volume": {"encoder_channels": 4, "hidden_features": 8, "num_frequencies": 2, "chunk_size": 997},
}


@pytest.mark.parametrize("use_diffusion", [True, False])
def test_torch_jit_script_of_the_pipeline_matches_eager_and_leaves_it_unchanged(use_diffusion):
    """In-process check of what ckpt_export does, on a tiny pipeline with attention at every level."""
    from scripts.kspace import fft2c
    from scripts.networks import MotionAwareDiffusion

    torch.manual_seed(0)
    diffusion = MotionAwareDiffusion(
        channels=(8, 16),
        attention_levels=(True, True),
        norm_num_groups=8,
        num_head_channels=8,
        num_inference_steps=2,
        num_samples=2,  # the averaging loop is scripted too
    )
    for parameter in diffusion.unet.out.parameters():
        torch.nn.init.normal_(parameter, std=0.1)  # MONAI zero-initialises it; make stage 1 matter
    network = PRINRPipeline(diffusion, slice_batch=3, use_diffusion=use_diffusion, **TINY_STAGES).eval()
    modules_before = list(network.modules())
    scripted = torch.jit.script(network)
    assert list(network.modules()) == modules_before
    assert type(network.diffusion.unet).__name__ == "DiffusionModelUNet"  # the eager model is not modified

    generator = torch.Generator().manual_seed(1)
    image = 50 * torch.rand(2, 1, 13, 11, 5, generator=generator)
    mask = torch.rand(1, 1, 13, 1, 1, generator=generator) > 0.5
    kspace = fft2c(image, dims=(2, 3)) * mask
    acceleration = torch.tensor([2.0, 4.0])
    with torch.no_grad():
        for args, kwargs in (
            ((image,), {}),
            ((image[:1, :, :9, :7], 1.7, 8.0, 0.05), {"seed": 5}),
            ((image, 2.5, acceleration, 0.03, kspace, mask), {"seed": 3}),
            ((image, 4.0, torch.tensor([1.0, 2.0]), 0.0), {}),  # one volume declared clean, one not
        ):
            torch.testing.assert_close(scripted(*args, **kwargs), network(*args, **kwargs), rtol=0, atol=1e-6)
        stages = scripted.reconstruct(image, 3.0, 4.0, 0.0)
        eager_stages = network.reconstruct(image, 3.0, 4.0, 0.0)
    assert stages.keys() == eager_stages.keys() == {"stage1", "stage2", "stage3"}
    for key, value in eager_stages.items():
        torch.testing.assert_close(stages[key], value, rtol=0, atol=1e-6)
    with pytest.raises(torch.jit.Error, match="scale must be a finite float"):
        scripted(image, 0.5)


EXPORT_COMMAND = [
    "-m", "monai.bundle", "ckpt_export", "network_def",
    "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
    "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
]  # fmt: skip

TORCHSCRIPT_SCRIPT = """
import importlib.util, sys, torch, nibabel as nib, numpy as np, monai.bundle
assert importlib.util.find_spec("scripts") is None, "the bundle's scripts must not be importable here"
extra = {{"metadata.json": "", "inference.json": ""}}
model = torch.jit.load({model!r}, map_location="cpu", _extra_files=extra)
sample = torch.from_numpy(np.asarray(nib.load({sample!r}).dataobj, dtype=np.float32))[None, None]
inputs = torch.load({inputs!r}, weights_only=True)
with torch.no_grad():
    out = {{
        "sample": model(sample, {scale}, {acceleration}, {motion}, seed=0),
        "default": model(inputs["small"]),
        "kspace": model(inputs["odd"], 2.5, inputs["acceleration"], 0.02, inputs["kspace"], inputs["mask"], seed=3),
    }}
ts_module, meta, files = monai.bundle.load(
    name={name!r}, bundle_dir={bundle_dir!r}, source="github", load_ts_module=True, device="cpu"
)
out["version"] = meta["version"]
out["extra"] = sorted(k for k, v in extra.items() if v)
torch.save(out, {out!r})
"""


@pytest.mark.slow
def test_ckpt_export_torchscript_matches_the_eager_pipeline(downloaded, tmp_path):
    """The Zoo's ckpt_export command, run in the downloaded bundle; the .ts loads and runs without ``scripts``."""
    run([sys.executable, *EXPORT_COMMAND], downloaded, clean_env())
    model_ts = downloaded / "models" / "model.ts"
    assert model_ts.is_file()

    from scripts.kspace import fft2c

    generator = torch.Generator().manual_seed(0)
    odd = 80 * torch.rand(2, 1, 37, 29, 5, generator=generator)
    mask = torch.rand(1, 1, 37, 1, 1, generator=generator) > 0.5
    inputs = {
        "small": torch.rand(1, 1, 64, 64, 8, generator=generator),
        "odd": odd,
        "acceleration": torch.tensor([2.0, 4.0]),
        "kspace": fft2c(odd, dims=(2, 3)) * mask,
        "mask": mask,
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    out = tmp_path / "torchscript_out.pt"
    work = outside_repo(tmp_path / "fresh")
    work.mkdir()
    shutil.copy(model_ts, work / "model.ts")  # a lone file: nothing of the bundle beside it
    script = TORCHSCRIPT_SCRIPT.format(
        model=str(work / "model.ts"), sample=str(SAMPLE), inputs=str(tmp_path / "inputs.pt"), out=str(out),
        name=NAME, bundle_dir=str(downloaded.parent), **SAMPLE_SETTINGS,
    )  # fmt: skip
    run([sys.executable, "-c", script], work, clean_env())
    scripted = torch.load(out, weights_only=True)
    assert scripted["version"] == VERSION
    assert scripted["extra"] == ["inference.json", "metadata.json"]

    network = eager_network()
    with torch.no_grad():
        eager = {
            "sample": network(sample_stack(), SAMPLE_SETTINGS["scale"], 4.0, 0.03, seed=0),
            "default": network(inputs["small"]),
            "kspace": network(odd, 2.5, inputs["acceleration"], 0.02, inputs["kspace"], mask, seed=3),
        }
    assert scripted["sample"].shape == (1, 1, 160, 192, 160)
    assert scripted["default"].shape == (1, 1, 64, 64, 40) and scripted["kspace"].shape == (2, 1, 37, 29, 12)
    for key, expected in eager.items():
        reference = float(PRINRPipeline.reference_intensity(expected).max())
        difference = float((scripted[key] - expected).abs().max())
        print(f"TorchScript vs eager, {key}: max |diff| {difference:.3g} = {difference / reference:.3g} x 99.5th pct")
        assert difference <= TORCHSCRIPT_RTOL * reference, (key, difference, reference)

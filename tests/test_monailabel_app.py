"""MONAI Label app (``apps/monailabel``): a real server on a free local port, real HTTP requests.

The server runs in the app's own environment (``apps/monailabel/setup.sh``, found by
``app_python("monailabel")``) and is started as a user would, ``python -m monailabel.main start_server``.
It serves a temporary app folder whose ``main.py`` and ``lib`` link back to this repository (MONAI
Label writes ``model/``, ``logs/`` and ``bin/`` into the app folder, which must not be the repository),
so the default bundle path is this repository's ``bundle/``, and a temporary studies folder holding the
bundle's sample. One server serves the whole module; its process group is killed at the end.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_DIR, REPO_ROOT, app_python

from scripts.inference import isotropic_affine

APP_DIR = REPO_ROOT / "apps" / "monailabel"
MODEL = "prinr_reconstruction"
SAMPLE = BUNDLE_DIR / "sample_data" / "icbm152_t1_thick5_motion3_r4.nii.gz"
STUDY = "icbm152_t1_thick5_motion3_r4"
START_TIMEOUT = 300
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


# --- HTTP with the standard library (what a 3D Slicer Python console has) ----------------------


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(method, url, *, form=None, body=None, timeout=600):
    """``form``: {field: text or (file name, bytes)}, sent as multipart/form-data; ``body``: sent as JSON."""
    headers, data = {}, None
    if form:
        boundary = uuid.uuid4().hex
        parts = []
        for field, value in form.items():
            disposition = f'form-data; name="{field}"'
            if isinstance(value, tuple):
                disposition += f'; filename="{value[0]}"'
                value = value[1]
            content = value if isinstance(value, bytes) else value.encode()
            parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=timeout) as r:
            return Response(r.status, r.headers.get("Content-Type", ""), r.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.headers.get("Content-Type", ""), error.read())


def multipart_fields(response):
    """The named parts of a multipart/form-data response (MONAI Label sends ``params`` and ``image``)."""
    boundary = response.content_type.split("boundary=")[1].strip('"').encode()
    fields = {}
    for part in response.body.split(b"--" + boundary)[1:-1]:
        head, content = part[2:].split(b"\r\n\r\n", 1)
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        fields[name] = content[:-2]  # the part ends with CRLF before the next boundary
    return fields


@dataclass
class Reconstruction:
    params: dict
    image: nib.Nifti1Image

    @property
    def data(self):
        return np.asarray(self.image.dataobj)


def reconstruction(response, tmp_path):
    assert response.status == 200, response.body[-2000:]
    fields = multipart_fields(response)
    path = tmp_path / f"{uuid.uuid4().hex}.nii.gz"
    path.write_bytes(fields["image"])
    return Reconstruction(json.loads(fields["params"]), nib.load(str(path)))


# --- the server ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    app: Path
    log: Path

    def log_tail(self, chars=6000):
        return self.log.read_text(errors="replace")[-chars:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_copy(root):
    """An app folder whose files are links to the repository's app (so the repository stays clean)."""
    app = root / "app"
    app.mkdir()
    (app / "main.py").symlink_to(APP_DIR / "main.py")
    (app / "lib").symlink_to(APP_DIR / "lib", target_is_directory=True)
    return app


def start_server(root, studies, *conf):
    port = free_port()
    log = root / "server.log"
    command = [str(app_python("monailabel")), "-m", "monailabel.main", "start_server", "--app", str(root / "app")]
    command += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), *map(str, conf)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MONAI_LABEL_SESSION_PATH=str(root / "sessions"), **THREADS)
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, Server(f"http://127.0.0.1:{port}", root / "app", log)


def stop_server(process):
    """Stop the server and every process it started (training runs in a child process)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_serving(process, server):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if request("GET", f"{server.url}/info/", timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the server did not answer /info/ within {START_TIMEOUT} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    app_copy(root)
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE, studies)
    process, server = start_server(root, studies)
    try:
        wait_until_serving(process, server)
        yield server
    finally:
        stop_server(process)


# --- an uploaded scan in another orientation, and the bundle's own reconstruction of it -------------


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    """A crop of the sample with its slice axis first and one in-plane axis flipped (not RAS)."""
    sample = nib.load(str(SAMPLE))
    crop = sample.slicer[40:120, 48:144, 8:24]
    # input axis 0 -> output axis 1 (flipped), 1 -> 2, 2 (the 5 mm slices) -> 0
    image = crop.as_reoriented(np.array([[1, -1], [2, 1], [0, 1]]))
    image = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    path = tmp_path_factory.mktemp("upload") / "oblique_thick.nii.gz"
    nib.save(image, str(path))
    assert image.shape == (16, 80, 96) and np.allclose(image.header.get_zooms(), (5, 1, 1))
    return path


@pytest.fixture(scope="module")
def bundle_reference(upload, tmp_path_factory):
    """The bundle CLI's own output for the uploaded scan (shipped weights, the same defaults)."""
    output_dir = tmp_path_factory.mktemp("reference")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_DIR / "configs/inference.json")]
    command += ["--bundle_root", str(BUNDLE_DIR), "--input_image", str(upload), "--output_dir", str(output_dir)]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_DIR), **THREADS)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return nib.load(str(output_dir / "oblique_thick_recon.nii.gz"))


def infer_upload(server, path, tmp_path):
    form = {"file": (path.name, path.read_bytes())}
    return reconstruction(request("POST", f"{server.url}/infer/{MODEL}", form=form), tmp_path)


@pytest.fixture(scope="module")
def upload_before_training(server, upload, tmp_path_factory):
    return infer_upload(server, upload, tmp_path_factory.mktemp("before"))


# --- tests -----------------------------------------------------------------------------------------


def test_info_lists_the_reconstruction_model_and_its_trainer(server):
    info = request("GET", f"{server.url}/info/").json()
    model = info["models"][MODEL]
    assert model["type"] == "others" and model["dimension"] == 3
    assert {"acceleration": 4.0, "motion": 0.03, "target_spacing": 0.0, "seed": 0}.items() <= model["config"].items()
    assert MODEL in info["trainers"]
    assert info["datastore"]["total"] == 1


def test_infer_on_a_study_in_the_datastore(server, tmp_path):
    result = reconstruction(request("POST", f"{server.url}/infer/{MODEL}?image={STUDY}"), tmp_path)
    source = nib.load(str(SAMPLE))
    assert result.params["model_version"] == "shipped"
    assert result.image.shape == (160, 192, 160) and result.params["shape"] == [160, 192, 160]
    assert result.image.get_data_dtype() == np.float32
    assert np.allclose(result.image.header.get_zooms(), (1, 1, 1)) and result.params["spacing"] == [1.0, 1.0, 1.0]
    # the isotropic grid tiles the acquired 5 mm slabs: output voxel j at thick index -0.5 + (j + 0.5) / 5
    expected = isotropic_affine(torch.as_tensor(source.affine), slice_axis=2, scale=5.0).numpy()
    assert np.allclose(result.image.affine, expected, atol=1e-4)
    assert np.isfinite(result.data).all() and result.data.std() > 0


def test_infer_on_an_uploaded_scan_matches_the_bundle(upload, upload_before_training, bundle_reference):
    result = upload_before_training
    assert result.params["model_version"] == "shipped"
    assert result.image.shape == bundle_reference.shape == (80, 80, 96)
    assert np.allclose(result.image.header.get_zooms(), (1, 1, 1))
    assert np.allclose(result.image.affine, bundle_reference.affine, atol=1e-4)
    assert nib.aff2axcodes(result.image.affine) == nib.aff2axcodes(nib.load(str(upload)).affine) == ("S", "L", "A")
    reference = np.asarray(bundle_reference.dataobj)
    assert np.isfinite(result.data).all() and result.data.std() > 0
    assert np.allclose(result.data, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, tmp_path):
    unknown_model = request("POST", f"{server.url}/infer/segmentation_spleen?image={STUDY}")
    assert unknown_model.status == 404 and "segmentation_spleen" in unknown_model.json()["detail"]
    assert MODEL in unknown_model.json()["detail"]

    unknown_study = request("POST", f"{server.url}/infer/{MODEL}?image=no_such_study")
    assert unknown_study.status == 404 and "no_such_study" in unknown_study.json()["detail"]

    infer = f"{server.url}/infer/{MODEL}"
    not_an_image = request("POST", infer, form={"file": ("notes.txt", b"not an image\n")})
    assert not_an_image.status == 422 and "cannot reconstruct" in not_an_image.json()["detail"]

    corrupt = request("POST", infer, form={"file": ("scan.nii.gz", b"\x1f\x8b garbage")})
    assert corrupt.status == 422 and "cannot reconstruct" in corrupt.json()["detail"]

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), dtype=np.float32), np.eye(4)), str(flat))
    two_d = request("POST", infer, form={"file": ("flat.nii.gz", flat.read_bytes())})
    assert two_d.status == 422 and "2D image" in two_d.json()["detail"]

    bad_spacing = request("POST", f"{infer}?image={STUDY}", form={"params": json.dumps({"target_spacing": -1})})
    assert bad_spacing.status == 422 and "target_spacing" in bad_spacing.json()["detail"]

    assert request("GET", f"{server.url}/info/").status == 200


def test_a_wrong_bundle_path_stops_the_server_with_a_message(tmp_path):
    app_copy(tmp_path)
    (tmp_path / "studies").mkdir()
    process, server = start_server(tmp_path, tmp_path / "studies", "--conf", "bundle_path", tmp_path / "nowhere")
    try:
        process.wait(timeout=START_TIMEOUT)
    finally:
        stop_server(process)
    assert process.returncode != 0
    assert "is not the PR-INR bundle" in server.log_tail(20000)


def test_fine_tuning_publishes_a_new_version_that_the_next_inference_uses(
    server, upload, upload_before_training, tmp_path
):
    params = {"iterations": 2, "samples_per_volume": 1, "validate": False}
    started = request("POST", f"{server.url}/train/{MODEL}", body=params)
    assert started.status == 200, started.body
    deadline = time.monotonic() + 600
    while (task := request("GET", f"{server.url}/train/").json())["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, f"training did not finish: {task}"
        time.sleep(2)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])) + server.log_tail()

    versions = sorted((server.app / "model").glob("model_*.pt"))
    assert len(versions) == 1
    stats = request("GET", f"{server.url}/info/").json()["train_stats"][MODEL]
    assert stats["model_version"] == versions[0].name and stats["started_from"] == "shipped"
    # the in-plane stages were fine-tuned, the volumetric stage kept as shipped
    shipped = torch.load(BUNDLE_DIR / "models" / "model.pt", weights_only=True)
    tuned = torch.load(versions[0], weights_only=True)
    assert shipped.keys() == tuned.keys()
    for stage in ("diffusion", "detail"):
        assert any(not torch.equal(shipped[k], tuned[k]) for k in shipped if k.startswith(f"{stage}."))
    assert all(torch.equal(shipped[k], tuned[k]) for k in shipped if k.startswith("volume."))

    after = infer_upload(server, upload, tmp_path)
    before = upload_before_training
    assert after.params["model_version"] == versions[0].name
    assert after.image.shape == before.image.shape and np.allclose(after.image.affine, before.image.affine)
    assert np.isfinite(after.data).all() and np.abs(after.data - before.data).max() > 0

"""PR-INR as harness methods, configs/evaluate.json (one and two processes), multi-process inference, speed log parsing.

The shipped model is untrained: these tests check geometry and plumbing, not quality.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_repository_script
from monai.data import MetaTensor

import scripts.prinr_methods as pm
from scripts.baselines import bspline_baseline
from scripts.evaluation import load_volumes, parse_settings, shard, summary_rows
from scripts.flags import as_bool
from scripts.inference import isotropic_affine
from scripts.protocol import METHODS, PROTOCOL_SETTINGS, Setting, degrade, run_method

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundle"
SCORE_FIELDS = ("volume", "setting", "motion", "acceleration", "scale", "seed", "method")
SCORE_FIELDS += ("psnr", "ssim", "psnr_head", "ssim_head", "prinr_cache")
EVAL_SETTINGS = "['s5_m0_R1','s5_m0.05_R8']"
EVAL_METHODS = ["linear", *pm.PRINR_METHODS]


def head_phantom(shape, frequency=5.0):
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (sum(g**2 for g in grids) < 0.8) * (100 + 30 * np.sin(frequency * grids[0]) + 20 * grids[2])
    return head.astype(np.float32)


def write_volume(path, shape=(24, 28, 32), frequency=5.0, affine=None):
    affine = np.diag([-1.0, 1.0, 1.2, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(head_phantom(shape, frequency), affine), str(path))
    return path


def child_env():
    return dict(os.environ, PYTHONPATH=str(BUNDLE_DIR), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def bundle_command(*config_files):
    files = [f"configs/{name}" for name in config_files]
    return ["-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else str(files)]


def run_bundle(config_files, *args, nproc=1, timeout=600):
    """Run a bundle config from the bundle folder, as a user would; with ``nproc`` > 1 under torchrun (gloo)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = launcher + bundle_command(*config_files) + [str(a) for a in args]
    return subprocess.run(command, cwd=BUNDLE_DIR, env=child_env(), capture_output=True, text=True, timeout=timeout)


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def default_prinr_configuration():
    pm.configure(reset=True)
    yield
    pm.configure(reset=True)


@pytest.fixture
def tiny_acquisition():
    """A tiny ground truth (Z = 32: 6 slabs of 5 and 2 fine voxels beyond the last) and its degradation."""
    affine = torch.tensor([[-0.9, 0, 0, 10.0], [0, 1.1, 0, -5.0], [0, 0, 1.2, 3.0], [0, 0, 0, 1]], dtype=torch.float64)
    gt = MetaTensor(torch.from_numpy(head_phantom((24, 28, 32)))[None], affine=affine)
    degraded, acquisition = degrade(gt, Setting(0.03, 4.0), seed=7)
    return gt, degraded, acquisition


# --- the methods -----------------------------------------------------------------------------------


def test_prinr_methods_are_registered_and_on_the_target_grid(tiny_acquisition):
    gt, degraded, acquisition = tiny_acquisition
    assert set(pm.PRINR_METHODS) <= set(METHODS)
    outputs = {}
    for name in pm.PRINR_METHODS:
        out, seconds, _, _ = run_method(name, degraded, acquisition, gt.affine, gt.shape[1:])
        assert isinstance(out, MetaTensor) and out.shape == gt.shape and out.dtype == torch.float32, name
        assert torch.allclose(out.affine.to(torch.float64), gt.affine), name
        # finite only: the untrained diffusion UNet (zero-initialised output layer) gives constant slices
        assert torch.isfinite(out).all() and seconds >= 0, name
        outputs[name] = out

    # the full pipeline's grid coincides with the ground truth's voxel for voxel; beyond the last slab it clamps
    cached = next(r for r in pm._cache.values() if r.hits)  # the with-diffusion run, reused by the ablations
    assert cached.stages["stage3"].shape == (1, 1, 24, 28, 30) and cached.stages["stage1"].shape == (1, 1, 24, 28, 6)
    full = outputs["prinr"][0]
    assert torch.allclose(full[..., :30], cached.stages["stage3"][0, 0], atol=1e-4)
    # (up to float64 rounding of the world-coordinate resampling, about 1e-14 of the values)
    assert torch.allclose(full[..., 30], full[..., 29], atol=1e-6) and torch.allclose(
        full[..., 31], full[..., 29], atol=1e-6
    )
    assert torch.allclose(isotropic_affine(degraded.affine, 2, 5.0), gt.affine)

    # the ablations are the stage outputs through the B-spline baseline; slab centres are the thick slices
    stage1 = MetaTensor(cached.stages["stage1"][0], affine=degraded.affine)
    expected = bspline_baseline(stage1, acquisition, gt.affine, gt.shape[1:])
    assert torch.allclose(outputs["prinr_stage1_bspline"], expected.float(), atol=1e-3)
    centres = outputs["prinr_stage12_bspline"][0, :, :, 2:30:5]
    assert torch.allclose(centres, cached.stages["stage2"][0, 0], rtol=1e-4, atol=1e-3)
    # without stage 1 the result differs from the full pipeline
    assert not torch.allclose(outputs["prinr_no_diffusion"], outputs["prinr"])


def test_cache_reuses_stages_and_reports_stand_alone_cost(tiny_acquisition):
    gt, degraded, acquisition = tiny_acquisition
    rows, outputs = [], {}
    for name in ("prinr", "prinr_stage1_bspline", "prinr_stage12_bspline", "prinr_no_diffusion", "linear"):
        out, seconds, peak, increase = run_method(name, degraded, acquisition, gt.affine, gt.shape[1:])
        outputs[name] = out
        row = {"seed": acquisition["seed"], "method": name, "seconds": seconds}
        rows.append({**row, "peak_rss_mb": peak, "rss_increase_mb": increase})
    assert len(pm._cache) == 2  # one with-diffusion run shared by three methods, one without
    with_diffusion = next(r for r in pm._cache.values() if r.hits)
    assert with_diffusion.hits == 2
    stage_seconds = with_diffusion.seconds
    assert 0 <= stage_seconds["stage1"] <= stage_seconds["stage2"] <= stage_seconds["stage3"]

    measured = [r["seconds"] for r in rows]
    pm.finalize_rows(rows)
    assert [r.get("prinr_cache") for r in rows] == ["miss", "hit", "hit", "miss", None]
    assert [r.get("seconds_measured") for r in rows[:4]] == measured[:4] and rows[4]["seconds"] == measured[4]
    # a hit costs what its stages cost when they ran, plus its own B-spline
    assert rows[1]["seconds"] >= stage_seconds["stage1"] and rows[2]["seconds"] >= stage_seconds["stage2"]
    assert rows[0]["seconds"] >= stage_seconds["stage3"]
    assert all(r["peak_rss_mb"] > 0 for r in rows)
    assert not pm._ledger  # every entry consumed

    # the cache changes nothing: a fresh, uncached run gives the same images
    pm.configure(cache=False)
    for name in ("prinr_stage12_bspline", "prinr"):
        again, *_ = run_method(name, degraded, acquisition, gt.affine, gt.shape[1:])
        assert torch.equal(again, outputs[name]), name
    assert not pm._cache


def test_methods_follow_the_acquisitions_slice_axis():
    gt = MetaTensor(torch.from_numpy(head_phantom((20, 18, 22)))[None], affine=torch.diag(torch.tensor([1.0, 1, 1, 1])))
    degraded, acquisition = degrade(gt, Setting(0.0, 1.0, slice_axis=0), seed=3)
    assert degraded.shape == (1, 4, 18, 22) and acquisition["slice_axis"] == 0
    for name in ("prinr", "prinr_stage1_bspline"):
        out, *_ = run_method(name, degraded, acquisition, gt.affine, gt.shape[1:])
        assert out.shape == gt.shape and torch.isfinite(out).all(), name


def test_network_comes_from_the_config_and_any_checkpoint(tmp_path, tiny_acquisition, monkeypatch):
    network = pm.get_network()
    assert pm.get_network() is network and not network.training
    state = {f"module.{k}": v * 0 for k, v in network.state_dict().items()}  # a DDP CheckpointSaver file
    checkpoint = tmp_path / "zeros.pt"
    torch.save({"model": state, "optimizer": {}}, checkpoint)
    monkeypatch.setenv("PRINR_CHECKPOINT", str(checkpoint))
    pm.configure(reset=True)
    zeros = pm.get_network()
    assert zeros is not network and all(float(p.abs().sum()) == 0 for p in zeros.parameters())
    pm.configure(checkpoint=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        pm.get_network()


# --- evaluation helpers ----------------------------------------------------------------------------


def test_settings_volumes_and_shards(tmp_path):
    assert parse_settings("all") == parse_settings(None) == PROTOCOL_SETTINGS
    assert parse_settings(["s5_m0.03_R4", {"motion": 0.0, "acceleration": 2.0, "scale": 3.0}, "s5_m0.05_R8_pe1"]) == (
        Setting(0.03, 4.0),
        Setting(0.0, 2.0, 3.0),
        Setting(0.05, 8.0, pe_axis=1),
    )
    with pytest.raises(ValueError, match="not a name like"):
        parse_settings(["motion3"])
    assert [shard(list(range(5)), r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert shard([0], 1, 2) == []
    assert [as_bool(v) for v in (True, "true", "1", False, "false", "0", None)] == [True] * 3 + [False] * 4
    with pytest.raises(ValueError, match="must be true or false"):
        as_bool("maybe")

    write_volume(tmp_path / "b.nii.gz")
    write_volume(tmp_path / "a.nii.gz")
    (tmp_path / "list.json").write_text('{"validation": [{"image": "b.nii.gz"}], "training": []}')
    assert load_volumes(dataset_dir=tmp_path) == [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]
    assert load_volumes(tmp_path / "list.json") == [str(tmp_path / "b.nii.gz")]
    with pytest.raises(ValueError, match="no 'test' list"):
        load_volumes(tmp_path / "list.json", data_list_key="test")
    with pytest.raises(ValueError, match="exactly one"):
        load_volumes()

    rows = [
        {"setting": "s", "method": "m", "psnr": p, "ssim": 0.5, "psnr_head": 1, "ssim_head": 1, "seconds": 1}
        | {"peak_rss_mb": 1}
        for p in (10.0, 12.0)
    ]
    (summary,) = summary_rows(rows)
    assert summary["n"] == 2 and summary["psnr_mean"] == 11.0 and math.isclose(summary["psnr_std"], math.sqrt(2))


# --- configs/evaluate.json and multi_gpu_evaluate.json ---------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    (root / "volumes").mkdir()
    for i, name in enumerate(("vol_a", "vol_b", "vol_c")):
        write_volume(root / "volumes" / f"{name}.nii.gz", shape=(24, 26 + 2 * i, 30), frequency=4.0 + i)
    datalist = root / "datalist.json"
    datalist.write_text(
        '{"validation": [{"image": "volumes/vol_a.nii.gz"}, {"image": "volumes/vol_b.nii.gz"}, '
        '{"image": "volumes/vol_c.nii.gz"}]}'
    )
    return root, datalist


def eval_args(datalist, output_dir):
    return ["--datalist", datalist, "--output_dir", output_dir, "--settings", EVAL_SETTINGS, "--methods", EVAL_METHODS]


@pytest.fixture(scope="module")
def single_process_eval(eval_data):
    root, datalist = eval_data
    output_dir = root / "single"
    result = run_bundle(["evaluate.json"], *eval_args(datalist, output_dir))
    return result, output_dir


@pytest.mark.slow
def test_evaluate_config_end_to_end(single_process_eval, eval_data):
    result, output_dir = single_process_eval
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_rows(output_dir / "results.csv")
    expected = [
        (v, s, m) for v in ("vol_a", "vol_b", "vol_c") for s in ("s5_m0_R1", "s5_m0.05_R8") for m in EVAL_METHODS
    ]
    assert [(r["volume"], r["setting"], r["method"]) for r in rows] == expected
    assert all(math.isfinite(float(r["psnr"])) and float(r["seconds"]) >= 0 for r in rows)
    assert {r["prinr_cache"] for r in rows if r["method"] == "prinr_stage12_bspline"} == {"hit"}
    summary = read_rows(output_dir / "summary.csv")
    assert [(r["setting"], r["method"]) for r in summary] == list(dict.fromkeys((s, m) for _, s, m in expected))
    assert {r["n"] for r in summary} == {"3"}
    table = (output_dir / "results.md").read_text()
    for method in EVAL_METHODS:
        assert f"| s5_m0.05_R8 | {method} | 3 |" in table
    assert sorted(p.name for p in (output_dir / "figures").iterdir()) == [
        "vol_a_s5_m0.05_R8.png",
        "vol_a_s5_m0_R1.png",
    ]
    # the reports are not replaced unless asked, and nothing is computed before that check
    again = run_bundle(["evaluate.json"], *eval_args(eval_data[1], output_dir))
    assert again.returncode != 0 and "already exists" in again.stderr + again.stdout


@pytest.mark.slow
def test_two_process_evaluation_gives_the_same_rows(single_process_eval, eval_data):
    single_result, single_dir = single_process_eval
    assert single_result.returncode == 0, single_result.stderr[-3000:]
    root, datalist = eval_data
    output_dir = root / "two_processes"
    result = run_bundle(["evaluate.json", "multi_gpu_evaluate.json"], *eval_args(datalist, output_dir), nproc=2)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "[rank 0/2] evaluating 2 of 3 volume(s)" in log and "[rank 1/2] evaluating 1 of 3 volume(s)" in log
    single, multi = read_rows(single_dir / "results.csv"), read_rows(output_dir / "results.csv")
    assert [[r[k] for k in SCORE_FIELDS] for r in multi] == [[r[k] for k in SCORE_FIELDS] for r in single]
    assert (output_dir / "results.md").is_file() and (output_dir / "summary.csv").is_file()
    assert len(list((output_dir / "figures").iterdir())) == 2


@pytest.mark.slow
def test_two_process_inference_over_a_folder(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        data = rng.random((16, 18, 4)).astype(np.float32) * 100
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 4.0, 1.0])), str(scans / f"scan{i}.nii.gz"))
    outputs = {}
    for nproc, configs in ((1, ["inference.json"]), (2, ["inference.json", "multi_gpu_inference.json"])):
        output_dir = tmp_path / f"out{nproc}"
        result = run_bundle(configs, "--input_image", scans, "--output_dir", output_dir, nproc=nproc)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        outputs[nproc] = output_dir
        if nproc == 2:  # each scan reconstructed once, by one rank
            log = result.stdout + result.stderr
            assert log.count("reconstructing ") == 3 and log.count("reconstructed ") == 2
    for i in range(3):
        one, two = (nib.load(str(outputs[n] / f"scan{i}_recon.nii.gz")) for n in (1, 2))
        assert one.shape == two.shape == (16, 18, 16)
        assert np.allclose(one.affine, two.affine) and np.array_equal(one.get_fdata(), two.get_fdata())


# --- speed log parsing -----------------------------------------------------------------------------

SPEED_LOG = """\
2026-11-23 22:53:55,407 - ignite.engine.engine.SupervisedEvaluator - INFO - Engine run resuming from iteration 0
2026-11-23 22:53:55,659 - scripts.inference - INFO - reconstructing sample_data/icbm152_t1_thick5_motion3_r4.nii.gz: \
32 slices 5 mm apart along axis 2, in-plane (160, 192) at 1 mm -> 160 slices
2026-11-23 22:54:02,726 - scripts.networks.pipeline - INFO - stages 1-2 (diffusion, detail restoration): \
8/32 slices, 7.0 s
2026-11-23 22:54:23,968 - scripts.networks.pipeline - INFO - stages 1-2 (diffusion, detail restoration): \
32/32 slices, 28.3 s
2026-11-23 22:54:35,641 - scripts.networks.pipeline - INFO - stage 3 (voxel INR): 160x192x160 voxels, 11.7 s
2026-11-23 22:54:36,184 - scripts.inference - INFO - saved /tmp/out/icbm152_t1_thick5_motion3_r4_recon.nii.gz
2026-11-23 22:54:36,240 - scripts.inference - INFO - reconstructing /data/vs_seg_001_t1_4p5mm: 40 slices 4.5 mm \
apart along axis 2, in-plane (512, 512) at 0.41 mm -> 439 slices
2026-11-23 22:54:40,000 - scripts.networks.pipeline - INFO - stages 1-2 (diffusion skipped, detail restoration): \
40/40 slices, 100.5 s
2026-11-23 22:55:40,000 - scripts.networks.pipeline - INFO - stage 3 (voxel INR): 512x512x439 voxels, 60.0 s
2026-11-23 22:55:41,185 - scripts.inference - INFO - reconstructed 2 scan(s) in 200.7 s, peak resident memory 814 MB
"""


def test_speed_log_parsing():
    benchmark = load_repository_script("benchmark")
    parsed = benchmark.parse_speed_log(SPEED_LOG)
    first, second = parsed["scans"]
    assert first["name"] == "icbm152_t1_thick5_motion3_r4.nii.gz" and first["input"] == "160x192x32 @ 1/5 mm"
    assert (first["stages12_s"], first["stage3_s"], first["output"]) == (28.3, 11.7, "160x192x160")
    assert second["input"] == "512x512x40 @ 0.41/4.5 mm" and second["output_slices"] == 439
    assert math.isclose(parsed["stages12_s"], 128.8) and math.isclose(parsed["stage3_s"], 71.7)
    assert (parsed["engine_scans"], parsed["engine_s"], parsed["engine_peak_mb"]) == (2, 200.7, 814.0)
    failed = benchmark.parse_speed_log("Traceback (most recent call last):\nValueError: boom\n")
    assert failed["scans"] == [] and math.isnan(failed["engine_s"]) and math.isnan(failed["stages12_s"])
    run = {"returncode": 0, "timed_out": False, "wall_s": 46.26, "peak_rss_mb": 830.4, **parsed}
    run["scans"] = parsed["scans"][:1]
    table = benchmark.speed_table([("embedded sample", run)])
    assert "| embedded sample | 160x192x32 @ 1/5 mm | 160x192x160 | 46.3 | 830 | 128.8 | 71.7 | 200.7 |" in table


def test_bars_average_volumes_and_need_every_stage_above_bspline(tmp_path):
    bars = load_repository_script("bars")
    # PR-INR beats the best baseline by exactly the bars at 3% R4; at 5% R4 stage 1 falls below
    # B-spline, so the ablation must say "no" there although stages 1 -> 2 -> 3 rise.
    psnr = {
        "s5_m0.03_R4": {"linear": 17.0, "bspline": 18.0, "prinr_stage1_bspline": 19.0,
                        "prinr_stage12_bspline": 20.0, "prinr": 21.0, "prinr_no_diffusion": 20.5},
        "s5_m0.05_R4": {"linear": 17.0, "bspline": 18.0, "prinr_stage1_bspline": 17.9,
                        "prinr_stage12_bspline": 19.0, "prinr": 19.5, "prinr_no_diffusion": 19.0},
        "s5_m0_R1": {"linear": 25.0, "bspline": 26.0, "prinr_stage1_bspline": 26.0,
                     "prinr_stage12_bspline": 26.0, "prinr": 27.4, "prinr_no_diffusion": 27.4},
    }  # fmt: skip
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["volume", "setting", "method", "psnr", "ssim"])
        writer.writeheader()
        for setting, methods in psnr.items():
            for method, value in methods.items():
                ssim = 0.6 if method == "prinr" else 0.5
                for volume, offset in (("a", -1.0), ("b", 1.0)):  # the means are the values above
                    writer.writerow(
                        {"volume": volume, "setting": setting, "method": method, "psnr": value + offset, "ssim": ssim}
                    )
    mean = bars.means(path)
    assert mean["s5_m0.03_R4", "prinr"] == pytest.approx({"psnr": 21.0, "ssim": 0.6})
    lines = bars.tables(mean).splitlines()
    bar_rows = [line for line in lines if line.count("|") == 6 and line.startswith("| s5")]
    assert [row.rsplit(" | ", 2)[1:] for row in bar_rows] == [
        ["+3.00 / +0.100", ">= +3 dB and +0.10: met |"],
        ["+1.50 / +0.100", ">= +3 dB and +0.10: not met |"],
    ]
    ablation = {line.split(" | ")[0][2:]: line.rsplit(" | ", 1)[1][:-2] for line in lines if line.count("|") == 8}
    assert {k: v for k, v in ablation.items() if k.startswith("s5")} == {
        "s5_m0_R1": "stages 1-2 skipped (declared clean)",
        "s5_m0.03_R4": "yes",
        "s5_m0.05_R4": "no",
    }
    assert (
        "Thick slices alone (s5_m0_R1): PR-INR 27.40 dB against B-spline 26.00 dB (+1.40 dB; the bar is +1.5 dB: "
        "not met)." in lines
    )
    # a --pe-axis 1 run: its own setting names, no clean setting, no no-diffusion column
    other_axis = {(f"{setting}_pe1", method): value for (setting, method), value in mean.items()
                  if setting != "s5_m0_R1" and method != "prinr_no_diffusion"}  # fmt: skip
    lines = bars.tables(other_axis).splitlines()
    assert [line.split(" | ")[0] for line in lines if line.count("|") == 6 and line.startswith("| s5")] == [
        "| s5_m0.03_R4_pe1",
        "| s5_m0.05_R4_pe1",
    ]
    assert "| s5_m0.05_R4_pe1 | 18.00 | 17.90 | 19.00 | 19.50 | - | no |" in lines
    assert not any(line.startswith("Thick slices alone") for line in lines)
    del other_axis["s5_m0.05_R4_pe1", "prinr_stage12_bspline"]
    with pytest.raises(ValueError, match=r"no rows of \['prinr_stage12_bspline'\] for setting s5_m0.05_R4_pe1"):
        bars.tables(other_axis)

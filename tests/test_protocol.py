"""The evaluation harness: settings, seeds, the method registry, reports and the benchmark CLI."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_whole_phase_encode_lines

from scripts.baselines import linear_baseline
from scripts.protocol import (
    METHODS,
    PROTOCOL_SETTINGS,
    Setting,
    degrade,
    load_volume,
    register_method,
    run_protocol,
    setting_seed,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_volume(tmp_path):
    """A small LAS-oriented head phantom: the harness must reorient it to RAS."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 28, 30)], indexing="ij")
    head = (sum(g**2 for g in grids) < 0.8).astype(np.float32) * (100 + 30 * np.sin(5 * grids[0]))
    path = tmp_path / "tiny_head.nii.gz"
    nib.save(nib.Nifti1Image(head.astype(np.float32), np.diag([-1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def test_protocol_settings_and_seeds():
    assert len(PROTOCOL_SETTINGS) == 9
    assert {(s.motion, s.acceleration, s.scale) for s in PROTOCOL_SETTINGS} == {
        (m, a, 5.0) for m in (0.0, 0.03, 0.05) for a in (1.0, 4.0, 8.0)
    }
    setting = Setting(0.03, 4.0)
    assert setting.name == "s5_m0.03_R4"
    assert setting_seed("a", setting) == setting_seed("a", setting) != setting_seed("b", setting)
    other_axis = Setting(0.03, 4.0, pe_axis=1)
    assert other_axis.name == "s5_m0.03_R4_pe1" and setting_seed("a", other_axis) != setting_seed("a", setting)


def test_degrade_encodes_phase_along_the_setting_axis(tiny_volume):
    volume = load_volume(tiny_volume)
    for pe_axis, expected in ((None, 0), (0, 0), (1, 1)):
        _, acquisition = degrade(volume, Setting(0.0, 4.0, pe_axis=pe_axis), seed=3)
        assert acquisition["pe_axis"] == expected
        assert_whole_phase_encode_lines(acquisition["mask"], expected)


def test_setting_refuses_axes_that_are_not_slice_and_in_plane_axes():
    with pytest.raises(ValueError, match="pe_axis .* must be an in-plane axis"):
        Setting(0.03, 4.0, pe_axis=2)
    with pytest.raises(ValueError, match="pe_axis must be a spatial axis"):
        Setting(0.03, 4.0, pe_axis=3)
    with pytest.raises(ValueError, match="slice_axis must be a spatial axis"):
        Setting(0.03, 4.0, slice_axis=3)


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register_method("linear")(lambda *args: None)
    with pytest.raises(ValueError, match="names files"):
        register_method("bad name/")


def test_run_protocol_is_deterministic_and_scores_every_method(tiny_volume, tmp_path):
    settings = [Setting(0.0, 1.0), Setting(0.05, 4.0)]
    rows = run_protocol([tiny_volume], settings, ["linear", "bspline"], figure_dir=tmp_path / "fig", log=None)
    again = run_protocol([tiny_volume], settings, ["linear", "bspline"], log=None)
    assert [(r["setting"], r["method"]) for r in rows] == [(s.name, m) for s in settings for m in ("linear", "bspline")]
    for first, second in zip(rows, again, strict=True):
        assert first["psnr"] == second["psnr"] and first["ssim"] == second["ssim"]
    clean, corrupted = rows[0], rows[2]
    assert clean["psnr"] > corrupted["psnr"] and clean["ssim"] > corrupted["ssim"]
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        "tiny_head_s5_m0.05_R4.png",
        "tiny_head_s5_m0_R1.png",
    ]


def test_a_method_off_the_target_grid_is_rejected(tiny_volume):
    name = "test_wrong_grid"
    register_method(name)(lambda degraded, *_: degraded)
    try:
        with pytest.raises(ValueError, match="spatial shape"):
            run_protocol([tiny_volume], [Setting(0.0, 1.0)], [name], log=None)
    finally:
        METHODS.pop(name)


def test_benchmark_cli_with_a_plugged_in_method(tiny_volume, tmp_path):
    plugin = tmp_path / "plugin_methods.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from scripts.baselines import linear_baseline
            from scripts.protocol import register_method

            @register_method("plugged_linear")
            def plugged(degraded, acquisition, target_affine, target_shape):
                return linear_baseline(degraded, acquisition, target_affine, target_shape)
            """
        )
    )
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--volumes", str(tiny_volume)]
    command += ["--settings", "s5_m0.03_R4", "--no-figures", "--output-dir", str(out), "--plugins", "plugin_methods"]
    command += ["--methods", "linear", "plugged_linear"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(tmp_path))
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["linear", "plugged_linear"]
    assert rows[0]["psnr"] == rows[1]["psnr"]  # same inputs, same method: the harness is fair
    table = (out / "results.md").read_text()
    assert "plugged_linear" in table and "s5_m0.03_R4" in table
    assert linear_baseline is METHODS["linear"]

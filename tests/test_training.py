"""Progressive training: the data and cache pieces, then the bundle CLI on tiny synthetic volumes.

The CLI tests run the configs as a user does (``python -m monai.bundle run`` from the bundle root)
with overrides that shrink patches and epochs so that each run takes seconds on a CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.networks import MotionAwareDiffusion, PRINRPipeline, VoxelContinuousINR
from scripts.training import (
    CosineDecayLR,
    CropToOutputd,
    FixedRandomd,
    KeysPrepareBatch,
    RandSliceSamplesd,
    as_bool,
    cache_key,
    initial_weights,
    kspace_dropout_prob,
    latest_checkpoint,
    load_datalist,
    load_stage,
    pool_datalist,
    resume_checkpoint,
    write_stage,
)
from scripts.transforms import RandSimulateAcquisitiond

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundle"
STAGES = ("diffusion", "detail", "volume")
# a stage config is merged over the common one
STAGE1_CONFIGS = ["configs/train_common.json", "configs/train_stage1.json"]

# Tiny runs: 32^3 patches, one epoch of one iteration, no workers, validation at the end, scale 4 so that the
# 48-slice validation volumes keep 12 thick slices (the 3D SSIM window of stage 3 is 11).
TINY = {
    "max_epochs": 1,
    "epoch_length": 1,
    "val_interval": 1,
    "num_workers": 0,
    "progress_bar": False,
    "sampling#patch_size": [32, 32, 32],
    "sampling#crop_margin": 4,
    "crop_size": [24, 24],  # stage 3's training window, drawn from its 32x32 in-plane pool patches
    "validation_setting#scale": 4.0,
}


def head(rng: np.random.Generator, shape=(40, 40, 48)) -> np.ndarray:
    """A noisy ellipsoid 'head' with a textured inner region, in scanner-like intensities."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.9, 0.85])[:, None, None, None]) ** 2).sum(0))
    texture = 1 + 0.3 * np.sin(6 * grid[0] + rng.uniform(0, 3)) * np.cos(5 * grid[1])
    return 100.0 * (radius < 1) + 60.0 * (radius < 0.7) * texture + rng.normal(0, 2, shape)


def write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """``train/`` (3 volumes), ``val/`` (2 volumes) and the same as a datalist JSON."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    datalist = {}
    for split, folder, count in (("training", "train", 3), ("validation", "val", 2)):
        (root / folder).mkdir()
        paths = [write_nifti(root / folder / f"{folder}{i}.nii.gz", head(rng)) for i in range(count)]
        datalist[split] = [{"image": str(p)} for p in paths]
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    return args


def run_bundle(configs, overrides: dict, launcher=(), check: bool = True) -> subprocess.CompletedProcess:
    """Run the training configs from the bundle root as a user would; returns the completed process."""
    config_file = configs[0] if len(configs) == 1 else str(list(configs))
    command = [*(launcher or (sys.executable,)), "-m", "monai.bundle", "run", "--config_file", config_file]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_DIR), OMP_NUM_THREADS="1")
    result = subprocess.run(
        command + cli_args(overrides), cwd=BUNDLE_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 or not check, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def stage1_overrides(dataset: Path, tmp_path: Path, **extra) -> dict:
    return {
        "dataset_dir": str(dataset),
        "output_dir": str(tmp_path / "stage1"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": 3,
        "slices_per_volume": 2,
        **TINY,
        **extra,
    }


def trainer_state(checkpoint: str) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["trainer"]


# --- data, caching and checkpoints ------------------------------------------------------------


def test_load_datalist_from_folder_and_json(dataset):
    from_folder = load_datalist(None, dataset, "training")
    from_json = load_datalist(dataset / "datalist.json", None, "validation")
    assert [Path(i["image"]).name for i in from_folder] == ["train0.nii.gz", "train1.nii.gz", "train2.nii.gz"]
    assert [Path(i["image"]).name for i in from_json] == ["val0.nii.gz", "val1.nii.gz"]
    with pytest.raises(FileNotFoundError, match="set dataset_dir"):
        load_datalist(None, dataset / "nowhere", "training")


def test_slice_samples_share_slices_across_keys_and_broadcast_the_mask():
    stack = torch.arange(5.0).expand(1, 4, 3, 5)
    data = {"image": stack, "image_thick": stack + 10, "image_mask": torch.ones(1, 4, 1, 1, dtype=torch.bool), "m": 0.1}
    samples = RandSliceSamplesd(["image", "image_thick", "image_mask"], num_samples=4).set_random_state(0)(data)
    assert len(samples) == 4
    indices = [int(s["image"][0, 0, 0]) for s in samples]
    assert len(set(indices)) == 4  # distinct slices when the stack has enough
    for s, k in zip(samples, indices, strict=True):
        assert s["image"].shape == (1, 4, 3) and not isinstance(s["image"], MetaTensor)
        torch.testing.assert_close(s["image_thick"], s["image"] + 10)
        assert s["image_mask"].shape == (1, 4, 1) and s["m"] == 0.1
        assert torch.all(s["image"] == k)
    with pytest.raises(ValueError, match="same number of slices"):
        RandSliceSamplesd(["image", "other"], 2)({"image": stack, "other": torch.zeros(1, 4, 3, 7)})


def test_fine_target_is_cropped_to_the_reconstruction_grid():
    """Output voxel j of stage 3 is fine voxel j: the target is the first round(S * scale) fine slices."""
    fine = MetaTensor(torch.rand(1, 8, 8, 47))
    simulate = RandSimulateAcquisitiond("image", scale_range=(3.3, 3.3), keep_thick=True).set_random_state(0)
    from scripts.training import AcquisitionParametersd

    d = AcquisitionParametersd("image")(simulate({"image": fine, "target": fine}))
    assert d["clean"] is (d["acceleration"] == 1.0 and d["motion"] == 0.0)
    d = CropToOutputd("target", stack_key="image")(d)
    num_slices = d["image"].shape[-1]
    assert num_slices == 14 and d["target"].shape[-1] == round(14 * 3.3) == 46
    torch.testing.assert_close(d["target"], fine[..., :46])
    out = VoxelContinuousINR()(d["image"].as_tensor()[None], d["scale"])
    assert out.shape[-1] == d["target"].shape[-1]


def test_fixed_random_is_a_function_of_the_seed():
    transform = FixedRandomd(RandSimulateAcquisitiond("image", keep_thick=True))
    volume = MetaTensor(torch.rand(1, 16, 16, 24))
    first = transform({"image": volume, "seed": 3})
    again = transform({"image": volume, "seed": 3})
    other = transform({"image": volume, "seed": 4})
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    assert first["image"].shape != other["image"].shape or not torch.equal(first["image"], other["image"])


def test_cache_key_follows_weights_and_settings():
    torch.manual_seed(0)
    net = MotionAwareDiffusion(channels=(8, 16), num_head_channels=8)
    key = cache_key([net], {"patch_size": [96, 96, 64]})
    assert key == cache_key([net], {"patch_size": [96, 96, 64]})
    assert key != cache_key([net], {"patch_size": [64, 64, 64]})
    averaging = MotionAwareDiffusion(channels=(8, 16), num_head_channels=8, num_samples=4)
    averaging.load_state_dict(net.state_dict())
    assert key != cache_key([averaging], {"patch_size": [96, 96, 64]})  # same weights, other outputs
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert key != cache_key([net], {"patch_size": [96, 96, 64]})
    items = pool_datalist([{"image": "/a/x.nii.gz"}, {"image": "/a/y.nii.gz"}], 2, key)
    assert len(items) == 4 and len({i["seed"] for i in items}) == 4
    assert all(i["cache_key"] == key for i in items)


def test_prepare_batch_passes_scalars_as_one_float():
    batch = {"refined": torch.zeros(2, 1, 4, 4, 3), "target": torch.zeros(2, 1, 4, 4, 9)}
    batch["scale"] = torch.tensor([3.0, 3.0])
    prepare = KeysPrepareBatch("refined", "target", args=["scale"], scalars=["scale"])
    image, label, args, kwargs = prepare(batch, "cpu")
    assert args == (3.0,) and kwargs == {} and label.shape[-1] == 9
    batch["scale"] = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match="must agree across the batch"):
        prepare(batch, "cpu")


def test_latest_checkpoint_and_stage_export(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for name, iteration in (("checkpoint_epoch=9.pt", 18), ("checkpoint_final_iteration=20.pt", 20)):
        torch.save({"trainer": {"iteration": iteration, "epoch": 10}}, tmp_path / name)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_final_iteration=20.pt")
    assert resume_checkpoint(tmp_path, "true") == latest_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path / "empty", False) is None
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        resume_checkpoint(tmp_path, "false")  # a fresh run must not mix with another run's checkpoints

    model_path = tmp_path / "models" / "model.pt"
    volume = VoxelContinuousINR()
    write_stage(model_path, "volume", volume)
    state = torch.load(model_path, weights_only=True)
    PRINRPipeline().load_state_dict(state)  # a complete pipeline state dict, even from one stage
    torch.testing.assert_close(state["volume.decoder.offset.weight"], volume.decoder.offset.weight)
    with pytest.raises(ValueError, match="stage must be one of"):
        write_stage(model_path, "unet", volume)


def test_as_bool_reads_cli_strings():
    assert as_bool("false", "resume") is False and as_bool("True", "resume") is True and as_bool(True, "x")
    with pytest.raises(ValueError, match="resume must be true or false"):
        as_bool("maybe", "resume")


def test_cosine_schedule_resumes_with_a_new_length():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    schedule = CosineDecayLR(optimizer, max_epochs=2)
    rates = []
    for _ in range(3):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.5, 0.0, 0.0])  # 0 from max_epochs on, never back up

    resumed_optimizer = torch.optim.SGD([weight], lr=1.0)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = CosineDecayLR(resumed_optimizer, max_epochs=4)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.max_epochs == 4
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 4)))
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        CosineDecayLR(optimizer, max_epochs=0)


def test_kspace_dropout_refuses_augmented_kspace_samples():
    assert kspace_dropout_prob(1.0, 0.5) == 1.0  # images only: augmentations are safe
    assert kspace_dropout_prob(0.5, 0.0) == 0.5
    with pytest.raises(ValueError, match="set augment_prob 0 to train with k-space"):
        kspace_dropout_prob(0.5, 0.5)
    with pytest.raises(ValueError, match=r"kspace_dropout must be a probability in \[0, 1\]"):
        kspace_dropout_prob(1.5, 0.0)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_DIR / "configs" / name) for name in ("train_common.json", "train_stage2.json")])
    parser["kspace_dropout"] = 0.5
    with pytest.raises(RuntimeError) as failed:  # the config applies the check; MONAI chains its error
        parser.get_parsed_content("train#slicing")
    assert isinstance(failed.value.__cause__, ValueError) and "set augment_prob 0" in str(failed.value.__cause__)


# --- the bundle CLI ------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage1_trains_validates_and_resumes(dataset, tmp_path):
    overrides = stage1_overrides(dataset, tmp_path)
    first = run_bundle(STAGE1_CONFIGS, overrides)
    assert "val_psnr" in first.stdout and "val_ssim" in first.stdout
    checkpoint = latest_checkpoint(tmp_path / "stage1" / "checkpoints")
    assert trainer_state(checkpoint)["iteration"] == 1  # epoch_length 1
    assert list((tmp_path / "stage1").glob("events.out.tfevents.*"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    for name, value in saved["model"].items():
        torch.testing.assert_close(exported[f"diffusion.{name}"], value)

    resumed = run_bundle(STAGE1_CONFIGS, {**overrides, "max_epochs": 3})
    assert f"Restored all variables from {checkpoint}" in resumed.stdout + resumed.stderr
    state = torch.load(latest_checkpoint(tmp_path / "stage1" / "checkpoints"), map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 3  # one iteration per epoch: continued from 1
    assert all(s["step"] == 3 for s in state["optimizer"]["state"].values())  # optimizer state carried on
    # the cosine follows the new length: after epoch 2 of 3 the rate is a quarter of the base rate (2e-4);
    # the old length (1 epoch) would have sent it back up to the full rate
    assert "Current learning rate: 5.000000000000002e-05" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_progressive_training_writes_a_loadable_pipeline(dataset, tmp_path):
    common = {
        "bundle_root": "@bundle_root",
        "dataset_dir": "@dataset_dir",
        "datalist": "@datalist",
        "model_dir": "@model_dir",
        **TINY,
    }
    overrides = {
        "datalist": str(dataset / "datalist.json"),
        "runs_dir": str(tmp_path / "runs"),
        "model_dir": str(tmp_path / "models"),
        "cache_dir": str(tmp_path / "cache"),
        "common": common,
        "stage1#batch_size": 3,
        "stage1#slices_per_volume": 2,
        "stage2#samples_per_volume": 1,
        "stage3#samples_per_volume": 1,
    }
    run_bundle(["configs/train.json"], overrides)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    PRINRPipeline().load_state_dict(state)
    for number, stage in enumerate(STAGES, start=1):
        checkpoint = latest_checkpoint(tmp_path / "runs" / f"stage{number}" / "checkpoints")
        trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
        for name, value in trained.items():
            torch.testing.assert_close(state[f"{stage}.{name}"], value)
    # stages 2 and 3 trained on cached pools built from the stages trained before them
    assert len(list((tmp_path / "cache" / "stage2").glob("*.pt"))) == 3
    assert len(list((tmp_path / "cache" / "stage3").glob("*.pt"))) == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad, message",
    [
        ("missing", "does not exist"),
        ("flat", "is a 2D image of shape (20, 20); expected a 3D volume"),
    ],
)
def test_bad_datalist_fails_at_start_naming_the_file(dataset, tmp_path, bad, message):
    bad_file = tmp_path / f"{bad}.nii.gz"
    if bad == "flat":
        write_nifti(bad_file, np.zeros((20, 20)))
    datalist = json.loads((dataset / "datalist.json").read_text())
    datalist["training"].append({"image": str(bad_file)})
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    overrides = stage1_overrides(dataset, tmp_path, datalist=str(tmp_path / "datalist.json"))
    result = run_bundle(STAGE1_CONFIGS, overrides, check=False)
    assert result.returncode != 0
    assert f"'{bad_file}' {message}" in result.stderr
    assert not (tmp_path / "stage1").exists()  # failed before any training output


@pytest.mark.slow
def test_distributed_stage1_on_two_cpu_processes(dataset, tmp_path):
    overrides = stage1_overrides(dataset, tmp_path, batch_size=2)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = run_bundle([*STAGE1_CONFIGS, "configs/multi_gpu_train.json"], overrides, launcher)
    checkpoints = list((tmp_path / "stage1" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1  # written by rank 0 only
    # one iteration per epoch on each rank (3 volumes split over 2 ranks, batch 2)
    assert trainer_state(str(checkpoints[0]))["iteration"] == 1
    assert result.stdout.count("Epoch[1] Metrics -- val_psnr") == 1  # validation logged by rank 0
    assert len(list((tmp_path / "stage1").glob("events.out.tfevents.*"))) == 3  # rank 0's three writers
    PRINRPipeline().load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))


def test_finetune_starts_from_the_shipped_stage_weights(tmp_path):
    from scripts.networks import MotionAwareDiffusion, PRINRPipeline
    from scripts.training import initial_weights

    torch.manual_seed(1)
    shipped = PRINRPipeline()
    model_path = tmp_path / "model.pt"
    torch.save(shipped.state_dict(), model_path)
    torch.manual_seed(2)
    fresh = MotionAwareDiffusion()
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert initial_weights(fresh, model_path, "diffusion", "false") is fresh
    assert all(torch.equal(v, untouched[k]) for k, v in fresh.state_dict().items())
    tuned = initial_weights(MotionAwareDiffusion(), model_path, "diffusion", "true")
    assert all(torch.equal(v, shipped.diffusion.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert tuned.training and all(p.requires_grad for p in tuned.parameters())


def test_finetune_adds_zero_weights_for_new_conditioning_channels(tmp_path):
    """Stage-3 weights saved without the (R, motion) maps fine-tune into the network that has them, unchanged."""
    torch.manual_seed(3)
    saved = VoxelContinuousINR(encoder_channels=8, num_res_units=1, hidden_features=8, use_degradation_maps=False)
    model_path = tmp_path / "model.pt"
    torch.save({f"volume.{k}": v for k, v in saved.state_dict().items()}, model_path)
    grown = initial_weights(
        VoxelContinuousINR(encoder_channels=8, num_res_units=1, hidden_features=8), model_path, "volume", True
    )
    first = grown.encoder[0].conv.weight
    assert first.shape[1] == 4 and torch.equal(first[:, :2], saved.encoder[0].conv.weight)
    assert not first[:, 2:].any()
    stack = torch.rand(1, 1, 12, 10, 4)
    with torch.no_grad():
        expected = saved.eval()(stack, 2.0)
        assert torch.allclose(grown.eval()(stack, 2.0, acceleration=8.0, motion=0.05), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="size mismatch"):  # an inference load stays strict
        load_stage(model_path, "volume", VoxelContinuousINR(encoder_channels=8, num_res_units=1, hidden_features=8))


def test_rand_in_plane_crop_takes_one_window_from_stacks_of_any_depth():
    from scripts.training import RandInPlaneCropd

    affine = torch.diag(torch.tensor([1.0, 1.0, 5.0, 1.0]))
    stack = MetaTensor(torch.arange(20 * 16 * 3, dtype=torch.float32).reshape(1, 20, 16, 3), affine=affine)
    fine = MetaTensor(torch.arange(20 * 16 * 15, dtype=torch.float32).reshape(1, 20, 16, 15))
    crop = RandInPlaneCropd(["stack", "fine"], (8, 6)).set_random_state(seed=4)
    out = crop({"stack": stack, "fine": fine, "scale": 5.0})
    assert out["stack"].shape == (1, 8, 6, 3) and out["fine"].shape == (1, 8, 6, 15) and out["scale"] == 5.0
    h, w = (int(v) for v in torch.nonzero(stack[0, :, :, 0] == out["stack"][0, 0, 0, 0])[0])
    assert torch.equal(out["fine"], fine[:, h : h + 8, w : w + 6])  # the same window from both
    assert torch.allclose(out["stack"].affine[:3, 3], torch.tensor([h, w, 0.0], dtype=torch.float64))
    starts = {tuple(crop({"stack": stack, "fine": fine})["stack"][0, 0, 0, :1].tolist()) for _ in range(20)}
    assert len(starts) > 1  # a new window per draw
    with pytest.raises(ValueError, match="at least"):
        RandInPlaneCropd(["stack"], (32, 6))({"stack": stack})

"""The PR-INR stage networks and pipeline: shapes at odd sizes, determinism, data consistency, INR queries."""

import io

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.kspace import data_consistency, fft2c, ifft2c
from scripts.networks import (
    ImplicitDetailRestoration,
    MotionAwareDiffusion,
    PRINRPipeline,
    VoxelContinuousINR,
    output_positions,
    output_size,
)
from scripts.networks.volume import slab_consistent
from scripts.training import CoarseSlicesd, RefinedSlicesd
from scripts.transforms import ThickSliceAcquisition

H, W, S = 37, 29, 5

TINY_DIFFUSION = {"channels": (8, 16), "norm_num_groups": 8, "num_head_channels": 8, "num_inference_steps": 2}
TINY_DETAIL = {"encoder_channels": (8, 16), "gate_hidden": 4, "hidden_features": 8, "num_frequencies": 2}
TINY_VOLUME = {"encoder_channels": 4, "hidden_features": 8, "num_frequencies": 2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_diffusion() -> MotionAwareDiffusion:
    """A tiny diffusion model whose zero-initialised output layer (MONAI's choice) is randomised,
    as after training, so its prediction depends on the noisy input."""
    net = MotionAwareDiffusion(**TINY_DIFFUSION)
    for parameter in net.unet.out.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return net.eval()


def tiny_pipeline(**kwargs) -> PRINRPipeline:
    return PRINRPipeline(tiny_diffusion(), TINY_DETAIL, TINY_VOLUME, slice_batch=5, **kwargs).eval()


def slices(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, H, W)


def pixel_centres(n: int) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), dim=-1)
    return grid.reshape(1, H * W, 2).float().expand(n, -1, -1)


def test_diffusion_shapes_and_training_loss():
    net = tiny_diffusion().train()
    corrupted = slices()
    coarse = net.sample(corrupted, 4.0, 0.03, torch.Generator().manual_seed(1))
    assert coarse.shape == corrupted.shape and torch.isfinite(coarse).all()
    loss = net.training_loss(slices(), corrupted, torch.tensor([1.0, 2.0, 8.0]), 0.06, torch.Generator())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.unet.parameters() if p.requires_grad)


def test_diffusion_sdedit_schedule():
    net = MotionAwareDiffusion(num_inference_steps=4, start_fraction=0.5)
    assert net.timesteps == (499, 374, 249, 124)  # the last DDIM step lands at -1: the x0 estimate itself
    net = MotionAwareDiffusion(num_inference_steps=8, start_fraction=1.0)
    assert len(net.timesteps) == 8 and net.timesteps[0] == 999


def test_diffusion_sampling_is_seeded():
    net = tiny_diffusion()
    corrupted = slices()
    first = net.sample(corrupted, 2.0, 0.01, torch.Generator().manual_seed(7))
    again = net.sample(corrupted, 2.0, 0.01, torch.Generator().manual_seed(7))
    other = net.sample(corrupted, 2.0, 0.01, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_diffusion_averages_independent_chains():
    single = tiny_diffusion()
    averaged = MotionAwareDiffusion(**TINY_DIFFUSION, num_samples=3)
    averaged.load_state_dict(single.state_dict())
    corrupted = slices()
    chains = torch.Generator().manual_seed(5)  # the three chains draw their noise from it in turn
    expected = torch.stack([single.sample(corrupted, 4.0, 0.05, chains) for _ in range(3)]).mean(0)
    result = averaged.sample(corrupted, 4.0, 0.05, torch.Generator().manual_seed(5))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    first_chain = single.sample(corrupted, 4.0, 0.05, torch.Generator().manual_seed(5))
    assert (result - first_chain).abs().max() > 1e-3  # not one chain
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"num_samples must be an integer >= 1, got {bad!r}"):
            MotionAwareDiffusion(**TINY_DIFFUSION, num_samples=bad)


def test_detail_shapes_with_and_without_kspace():
    net = ImplicitDetailRestoration(**TINY_DETAIL)
    corrupted, coarse = slices(), slices()
    kspace = fft2c(corrupted, dims=(2, 3))
    mask = torch.rand(1, 1, H, 1) > 0.5
    for measured, sampled in ((None, None), (kspace * mask, mask)):
        out = net(corrupted, coarse, 4.0, 0.02, measured, sampled)
        assert out.shape == corrupted.shape and torch.isfinite(out).all()
    out.square().mean().backward()  # trainable end to end: encoder, gate and decoder get gradients
    assert all(p.grad is not None for p in net.parameters())


def test_consistency_channel_with_full_mask_is_the_measured_image():
    measured_image, coarse = slices(), slices()
    kspace = fft2c(measured_image, dims=(2, 3))
    mask = torch.ones(1, 1, H, 1, dtype=torch.bool)
    channel = ImplicitDetailRestoration.consistency_channel(coarse, kspace, mask)
    torch.testing.assert_close(channel, measured_image, rtol=0, atol=1e-5)
    assert ImplicitDetailRestoration.consistency_channel(coarse) is coarse


def test_data_consistency_keeps_measured_lines_in_kspace():
    # A mask symmetric under k -> H - 1 - k (the centred, odd-size mirror), so real images whose
    # k-space lies on measured (or unmeasured) lines stay on them.
    rows = torch.zeros(H, dtype=torch.bool)
    rows[16:21] = True
    for k in (3, 9, 12):
        rows[k] = rows[H - 1 - k] = True
    mask = rows.view(1, 1, H, 1)
    generator = torch.Generator().manual_seed(3)

    def real_image_on(lines: torch.Tensor) -> torch.Tensor:
        kspace = torch.randn(1, 1, H, W, dtype=torch.complex128, generator=generator) * lines
        return ifft2c(kspace, dims=(2, 3)).real

    truth = 1 + torch.rand(1, 1, H, W, dtype=torch.float64, generator=generator)
    unmeasured_detail, measured_error = 0.05 * real_image_on(~mask), 0.05 * real_image_on(mask)
    estimate = truth + unmeasured_detail + measured_error
    measured = fft2c(truth, dims=(2, 3)) * mask

    projected = data_consistency(estimate, measured, mask, dims=(2, 3))
    projected_kspace = fft2c(projected, dims=(2, 3))
    full_mask = mask.expand(projected_kspace.shape)
    torch.testing.assert_close(projected_kspace[full_mask], measured[full_mask])
    torch.testing.assert_close(projected_kspace[~full_mask], fft2c(estimate, dims=(2, 3))[~full_mask])
    torch.testing.assert_close(projected, truth + unmeasured_detail)


@pytest.mark.parametrize("chunk_size", [997, 1 << 20])
def test_detail_query_at_pixel_centres_matches_grid(chunk_size):
    net = ImplicitDetailRestoration(**TINY_DETAIL, chunk_size=chunk_size)
    corrupted, coarse = slices(2), slices(2)
    grid = net(corrupted, coarse, 2.0, 0.01)
    features = net.encode(corrupted, coarse, 2.0, 0.01)
    queried = net.query(features, pixel_centres(2)).view(grid.shape)
    torch.testing.assert_close(queried, grid)


def test_detail_base_is_a_per_pixel_blend_of_corrupted_and_coarse():
    net = ImplicitDetailRestoration(**TINY_DETAIL)
    corrupted, coarse = slices(2), slices(2)
    base = net.encode(corrupted, coarse, 4.0, 0.03)[:, :1]
    assert (base >= torch.minimum(corrupted, coarse) - 1e-6).all() and (
        base <= torch.maximum(corrupted, coarse) + 1e-6
    ).all()
    assert not torch.allclose(base, coarse) and not torch.allclose(base, corrupted)


def test_detail_query_between_pixels_blends_neighbours():
    net = ImplicitDetailRestoration(**TINY_DETAIL)
    torch.nn.init.zeros_(net.decoder.head.output.weight)
    torch.nn.init.zeros_(net.decoder.head.output.bias)  # residual 0: the query is the bilinear base image
    coarse = slices(1)
    features = net.encode(coarse, coarse)  # corrupted == coarse: the base is the coarse image whatever the blend
    coords = torch.tensor([[[3.5, 4.0], [3.0, 4.25], [-2.0, 100.0]]])
    expected = torch.stack(
        (
            (coarse[0, 0, 3, 4] + coarse[0, 0, 4, 4]) / 2,
            0.75 * coarse[0, 0, 3, 4] + 0.25 * coarse[0, 0, 3, 5],
            coarse[0, 0, 0, W - 1],
        )
    )
    torch.testing.assert_close(net.query(features, coords)[0], expected)


@pytest.mark.parametrize("scale", [5.0, 2.5, 1.7])
def test_volume_grid_shape_and_positions(scale):
    net = VoxelContinuousINR(**TINY_VOLUME)
    stack = torch.rand(2, 1, H, W, S)
    out = net(stack, scale)
    assert out.shape == (2, 1, H, W, round(S * scale)) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    positions = output_positions(S, scale)
    assert positions.numel() == output_size(S, scale)
    torch.testing.assert_close(positions, (torch.arange(positions.numel(), dtype=torch.float64) + 0.5) / scale - 0.5)


def test_volume_untrained_residual_zero_is_cubic_interpolation():
    net = VoxelContinuousINR(**TINY_VOLUME).double()
    torch.nn.init.zeros_(net.decoder.head.output.weight)
    torch.nn.init.zeros_(net.decoder.head.output.bias)
    stack = torch.rand(1, 1, H, W, S, dtype=torch.float64)
    out = net(stack, 2.5)
    z = output_positions(S, 2.5).clamp(0, S - 1)
    low = z.floor().long().clamp(max=S - 2)
    t = z - low

    def at(k):
        return stack[..., k.clamp(0, S - 1)]

    # Catmull-Rom: p1 + t (p2 - p0) / 2 + t^2 (2 p0 - 5 p1 + 4 p2 - p3) / 2 + t^3 (3 (p1 - p2) + p3 - p0) / 2
    p0, p1, p2, p3 = at(low - 1), at(low), at(low + 1), at(low + 2)
    expected = (
        p1 + t * (p2 - p0) / 2 + t**2 * (2 * p0 - 5 * p1 + 4 * p2 - p3) / 2 + t**3 * (3 * (p1 - p2) + p3 - p0) / 2
    )
    torch.testing.assert_close(out, expected)

    # a quadratic along z is reproduced exactly between the second and the second-to-last slice
    ramp = (torch.arange(S, dtype=torch.float64) ** 2).expand(1, 1, H, W, S).contiguous()
    inner = (z >= 1) & (z <= S - 2)
    torch.testing.assert_close(net(ramp, 2.5)[..., inner], (z[inner] ** 2).expand(1, 1, H, W, -1))


@pytest.mark.parametrize("chunk_size", [997, 1 << 20])
def test_volume_queries_match_grid(chunk_size):
    net = VoxelContinuousINR(**TINY_VOLUME)
    stack = torch.rand(2, 1, H, W, S)
    reference = net(stack, 5.0)  # default chunking
    net.chunk_size = chunk_size
    grid = net(stack, 5.0)
    torch.testing.assert_close(grid, reference)

    features = net.encode(stack)
    depth = grid.shape[-1]
    z = output_positions(S, 5.0).float()
    hw = pixel_centres(1)[0]
    coords = torch.cat((hw.repeat_interleave(depth, 0), z.repeat(H * W)[:, None]), dim=1)
    queried = net.query(features, coords.expand(2, -1, -1)).view(grid.shape)
    torch.testing.assert_close(queried, grid)

    # integer slice positions: z_j = k for j = 5k + 2 at scale 5
    for k in range(S):
        at_slice = torch.cat((hw, torch.full((H * W, 1), float(k))), dim=1).expand(2, -1, -1)
        torch.testing.assert_close(net.query(features, at_slice).view(2, 1, H, W), grid[..., 5 * k + 2])


def test_volume_reads_the_acquisition_it_is_given():
    """Stage 3 sees (R, motion) as two encoder channels; without the maps it has two channels only."""
    net = VoxelContinuousINR(**TINY_VOLUME)
    assert net.encoder[0].conv.in_channels == 4
    torch.nn.init.normal_(net.encoder[0].conv.weight)  # make the maps count
    stack = torch.rand(2, 1, H, W, S)
    mild = net(stack, 2.0, None, 2.0, 0.01)
    severe = net(stack, 2.0, None, torch.tensor([2.0, 8.0]), torch.tensor([0.01, 0.05]))
    torch.testing.assert_close(severe[0], mild[0])  # per volume
    assert not torch.allclose(severe[1], mild[1])
    with pytest.raises(ValueError, match="acceleration must be >= 1"):
        net(stack, 2.0, None, 0.5, 0.0)
    assert VoxelContinuousINR(**TINY_VOLUME, use_degradation_maps=False).encoder[0].conv.in_channels == 2


@pytest.mark.parametrize("scale", [5.0, 2.3])  # 2.3: 11.5 output voxels rounded to 12, the grid is not symmetric
def test_volume_in_eval_mode_averages_the_two_slice_orders(scale):
    net = VoxelContinuousINR(**TINY_VOLUME)
    stack = torch.rand(2, 1, H, W, S)
    with torch.no_grad():
        single = net(stack, scale)  # training mode: one reading
        ensemble = net.eval()(stack, scale)
        depth = ensemble.shape[-1]
        z = output_positions(S, scale).float()
        hw = pixel_centres(1)[0].repeat_interleave(depth, 0)
        forward = torch.cat((hw, z.repeat(H * W)[:, None]), dim=1).expand(2, -1, -1)
        mirrored = torch.cat((hw, (S - 1 - z).repeat(H * W)[:, None]), dim=1).expand(2, -1, -1)
        readings = net.query(net.encode(stack), forward) + net.query(net.encode(stack.flip(-1)), mirrored)
    torch.testing.assert_close(ensemble, (readings / 2).view(ensemble.shape))
    assert not torch.allclose(ensemble, single)
    net.slice_order_ensemble = False
    torch.testing.assert_close(net(stack, scale), single)


@pytest.mark.parametrize("scale", [5.0, 2.5])
def test_pipeline_shapes(scale):
    pipeline = tiny_pipeline()
    image = 100 * torch.rand(1, 1, H, W, S)
    with torch.no_grad():
        stages = pipeline.reconstruct(image, scale, acceleration=4.0, motion=0.03)
    assert stages["stage1"].shape == stages["stage2"].shape == image.shape
    assert stages["stage3"].shape == (1, 1, H, W, round(S * scale))
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in stages.values())
    # raw intensities in, raw intensities out (the stages only see the normalised volume)
    assert 20 < stages["stage3"].mean() < 200


def test_pipeline_kspace_batch_and_seed():
    pipeline = tiny_pipeline()
    image = 50 * torch.rand(2, 1, 13, 11, 3)
    mask = torch.rand(1, 1, 13, 1, 1) > 0.5
    kspace = fft2c(image, dims=(2, 3)) * mask
    kwargs = {"acceleration": torch.tensor([2.0, 4.0]), "motion": torch.tensor([0.0, 0.05]), "kspace": kspace}
    with torch.no_grad():
        first = pipeline(image, 2.0, mask=mask, seed=3, **kwargs)
        again = pipeline(image, 2.0, mask=mask, seed=3, **kwargs)
        other = pipeline(image, 2.0, mask=mask, seed=4, **kwargs)
    assert first.shape == (2, 1, 13, 11, 6)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_pipeline_without_diffusion_feeds_the_corrupted_slices():
    pipeline = tiny_pipeline(use_diffusion=False)
    image = 10 * torch.rand(1, 1, H, W, S)
    with torch.no_grad():
        stages = pipeline.reconstruct(image, 3.0)
    torch.testing.assert_close(stages["stage1"], image)


@pytest.mark.parametrize("size", [25, 12, 9])  # scales 5, 2.4, 1.8 over 5 slices
def test_slab_consistent_volume_averages_back_to_the_slices(size):
    stack, volume = torch.rand(2, 1, 4, 3, S, dtype=torch.float64), torch.rand(2, 1, 4, 3, size, dtype=torch.float64)
    corrected = slab_consistent(volume, stack)
    torch.testing.assert_close(ThickSliceAcquisition(size / S)(corrected[0]).as_tensor(), stack[0])
    # a volume that already averages to the slices is left as it is
    torch.testing.assert_close(slab_consistent(corrected, stack), corrected)


def test_volume_encoder_in_tiles_equals_the_whole_encoder():
    """Tiling along H (with the receptive-field halo) bounds memory on large scans without changing the output."""
    net = VoxelContinuousINR(**TINY_VOLUME, num_res_units=2).eval()
    stack, clean = torch.rand(2, 1, H, W, S), torch.tensor([True, False])
    with torch.no_grad():
        whole = net(stack, 3.0, clean)
        net.encoder_tile_voxels = 2 * W * S * 4  # 4 rows per tile, 10 tiles
        tiled = net(stack, 3.0, clean)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def test_declared_clean_volume_skips_stages_1_and_2_and_stage_3_reproduces_its_slices():
    pipeline = tiny_pipeline()
    image = 10 + 10 * torch.rand(2, 1, H, W, S)
    acceleration, motion = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.02])
    with torch.no_grad():
        stages = pipeline.reconstruct(image, 5.0, acceleration, motion)
        pipeline.volume.slab_consistency = False
        unconstrained = pipeline.reconstruct(image, 5.0, acceleration, motion)
    # volume 0 is declared clean: its slices are measurements, kept by stages 1-2 and reproduced by stage 3
    torch.testing.assert_close(stages["stage1"][0], image[0])  # up to normalising and back
    torch.testing.assert_close(stages["stage2"][0], image[0])
    torch.testing.assert_close(ThickSliceAcquisition(5.0)(stages["stage3"][0]).as_tensor(), image[0])
    assert not torch.allclose(unconstrained["stage3"][0], stages["stage3"][0])
    # volume 1 has motion: every stage runs and stage 3 is not constrained
    assert not torch.allclose(stages["stage2"][1], image[1])
    torch.testing.assert_close(stages["stage3"][1], unconstrained["stage3"][1], rtol=0, atol=0)


def test_pool_transforms_compute_what_the_pipeline_computes():
    """The stage-2 and stage-3 training pools hold the pipeline's own stage outputs, clean samples included."""
    pipeline = tiny_pipeline()
    image = 10 * torch.rand(1, 1, H, W, S)
    reference = pipeline.reference_intensity(image)  # pools hold volumes already normalised to ~[0, 1]
    for acceleration, motion in ((4.0, 0.03), (1.0, 0.0)):
        item = {"image": image[0] / reference[0], "seed": 7, "acceleration": acceleration, "motion": motion}
        with torch.no_grad():
            pooled = RefinedSlicesd("image", pipeline, use_kspace=False)(CoarseSlicesd("image", pipeline)(item))
            stages = pipeline.reconstruct(image, 5.0, acceleration, motion, seed=7)
        torch.testing.assert_close(pooled["coarse"], stages["stage1"][0] / reference[0])
        torch.testing.assert_close(pooled["refined"], stages["stage2"][0] / reference[0])


def test_pipeline_state_dict_round_trip(tmp_path):
    pipeline = tiny_pipeline()
    path = tmp_path / "model.pt"
    torch.save(pipeline.state_dict(), path)
    restored = tiny_pipeline()
    restored.load_state_dict(torch.load(path, weights_only=True))
    image = torch.rand(1, 1, 13, 11, 3)
    with torch.no_grad():
        torch.testing.assert_close(restored(image, 2.0), pipeline(image, 2.0), rtol=0, atol=0)
    assert set(pipeline.state_dict()) == set(restored.state_dict())
    assert any(key.startswith("diffusion.") for key in pipeline.state_dict())
    assert any(key.startswith("volume.") for key in pipeline.state_dict())


def test_pipeline_from_bundle_config():
    config = {
        "network_def": {
            "_target_": "scripts.networks.PRINRPipeline",
            "diffusion": {"_target_": "scripts.networks.MotionAwareDiffusion", **TINY_DIFFUSION},
            "detail": TINY_DETAIL,
            "volume": TINY_VOLUME,
            "slice_batch": 2,
        }
    }
    parser = ConfigParser(config)
    pipeline = parser.get_parsed_content("network_def")
    assert isinstance(pipeline, PRINRPipeline) and pipeline.slice_batch == 2
    buffer = io.BytesIO()
    torch.save(pipeline.state_dict(), buffer)
    buffer.seek(0)
    tiny_pipeline().load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p(torch.rand(1, H, W, S), 2.0),  # 4D
        lambda p: p(torch.rand(1, 2, H, W, S), 2.0),  # 2 channels
        lambda p: p(torch.rand(1, 1, H, W, S), 0.5),  # scale < 1
        lambda p: p(torch.rand(1, 1, H, W, S), 2.0, acceleration=0.5),
        lambda p: p(torch.rand(1, 1, H, W, S), 2.0, motion=torch.zeros(3)),  # wrong batch
        lambda p: p(torch.rand(1, 1, H, W, S), 2.0, kspace=torch.zeros(1, 1, H, W, S, dtype=torch.complex64)),
        lambda p: p(torch.rand(1, 1, H, W, S), 2.0, kspace=torch.zeros(1, 1, H, W, S), mask=torch.ones(1, dtype=bool)),
        lambda p: p.diffusion.sample(torch.rand(2, 2, H, W)),
        lambda p: p.detail(torch.rand(2, 1, H, W), torch.rand(2, 1, H, W + 1)),
        lambda p: p.volume(torch.rand(1, H, W, S), 2.0),
        lambda p: p.volume(torch.rand(2, 1, H, W, S), 2.0, torch.tensor([True])),  # one flag for two stacks
        lambda p: p.volume.query(torch.rand(1, 9, H, W, S), torch.rand(1, 10, 2)),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call(tiny_pipeline())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_matches_cpu():
    pipeline = tiny_pipeline()
    image = 10 * torch.rand(1, 1, H, W, S)
    mask = torch.rand(1, 1, H, 1, 1) > 0.5
    kspace = fft2c(image, dims=(2, 3)) * mask
    with torch.no_grad():
        cpu = pipeline(image, 2.5, 4.0, 0.03, kspace, mask)
        gpu = pipeline.cuda()(image.cuda(), 2.5, 4.0, 0.03, kspace.cuda(), mask.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))

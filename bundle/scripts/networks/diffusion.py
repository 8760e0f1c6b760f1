"""Stage 1: motion-aware conditional diffusion giving a coarse, artefact-reduced version of each slice."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from .inputs import acquisition_code, check_slices, constant_maps
from .padding import crop_to, pad_to_multiple
from .scriptable import scriptable_diffusion_unet


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device so seeds match across devices.

    TorchScript cannot read a generator's device: scripted code draws from CPU generators only
    (the pipeline's own generator is one).
    """
    if generator is None:
        device = x.device
    elif torch.jit.is_scripting():
        device = torch.device("cpu")
    else:
        device = generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class MotionAwareDiffusion(nn.Module):
    """Conditional 2D diffusion model restoring motion-corrupted, undersampled slices at half resolution.

    The UNet sees the noisy estimate concatenated with the condition: the corrupted slice and, when
    ``use_degradation_maps``, two constant maps holding the encoded acceleration and motion severity
    (see :func:`scripts.networks.inputs.acquisition_code`). All work happens at half in-plane
    resolution (2x2 average pooling) because the stage only has to give a coarse estimate that
    stage 2 refines; intensities are mapped from [0, 1] to [-1, 1], the range the schedule assumes.

    The network predicts the clean sample (``prediction_type="sample"``) rather than the noise: with
    very few DDIM steps, each step's x0 estimate is directly the network's output instead of being
    recovered by dividing by a small ``sqrt(alpha_bar)``, which amplifies epsilon errors, and the
    last step returns that estimate itself.

    Sampling is SDEdit-like: it noises the corrupted slice to ``timesteps[0]`` (about
    ``start_fraction`` of the schedule) and runs ``num_inference_steps`` deterministic DDIM steps
    (eta = 0) back to zero, so the only randomness is the initial noise, drawn from the given
    generator. Training draws timesteps only from that range, the only one sampling visits.
    ``num_samples`` chains from independent noise are averaged: each chain is one draw of the clean
    slice given the corrupted one, and their mean approaches the posterior mean, which is what
    minimises the squared error that PSNR measures (one chain carries its own noise-driven detail).

    The sampling loop is written for TorchScript: a fixed number of steps whose DDIM coefficients
    are precomputed (in float32, exactly as MONAI's ``DDIMScheduler.step`` and ``add_noise`` compute
    them) into the non-persistent buffer ``ddim_coefficients``, so :meth:`sample` needs no scheduler
    object. ``torch.jit.script`` first calls :meth:`__prepare_scriptable__`, which swaps MONAI's UNet
    for a scriptable copy (see :mod:`scripts.networks.scriptable`).

    Args:
        channels: UNet channels per level; the in-plane size is padded to ``2 ** (len(channels) - 1)``.
        attention_levels: self-attention per level; default none, since attention costs grow with
            the square of the pixel count and 512x512 slices must stay cheap.
        num_res_blocks: residual blocks per UNet level.
        norm_num_groups: group-norm groups; must divide every entry of ``channels``.
        num_head_channels: channels per attention head, where attention is used.
        use_flash_attention: use PyTorch's fused attention, whose memory grows linearly with the pixel
            count; MONAI's UNet always has an attention block at its lowest level.
        use_degradation_maps: condition on (acceleration, motion) maps as well as the corrupted slice.
        num_train_timesteps: length of the DDPM/DDIM noise schedule.
        num_inference_steps: DDIM steps taken when sampling.
        start_fraction: fraction of the schedule at which sampling starts (SDEdit strength).
        num_samples: sampling chains averaged per slice (each costs ``num_inference_steps`` UNet passes).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int = 16,
        use_flash_attention: bool = True,
        use_degradation_maps: bool = True,
        num_train_timesteps: int = 1000,
        num_inference_steps: int = 4,
        start_fraction: float = 0.5,
        num_samples: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
        if not 0.0 < start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}.")
        self.num_samples = num_samples
        self.use_degradation_maps = use_degradation_maps
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=4 if use_degradation_maps else 2,
            out_channels=1,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels or [False] * len(channels)),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )
        self.train_scheduler = DDPMScheduler(num_train_timesteps, prediction_type="sample", clip_sample=False)
        self.inferer = DiffusionInferer(self.train_scheduler)
        # MONAI's DDIM step always moves back by num_train_timesteps // num_inference_steps; running the
        # last `num_inference_steps` steps of a chain of `full_steps` gives the truncated SDEdit chain.
        self.sample_scheduler = DDIMScheduler(num_train_timesteps, prediction_type="sample", clip_sample=False)
        full_steps = min(num_train_timesteps, max(num_inference_steps, round(num_inference_steps / start_fraction)))
        self.sample_scheduler.set_timesteps(full_steps)
        stride = num_train_timesteps // full_steps
        self.timesteps = tuple(stride * k - 1 for k in range(num_inference_steps, 0, -1))
        self.register_buffer("ddim_coefficients", self._ddim_coefficients(stride), persistent=False)

    def extra_repr(self) -> str:
        """The sampling settings, which change outputs without changing weights (pool caches hash the repr)."""
        return f"timesteps={self.timesteps}, num_samples={self.num_samples}"

    def _ddim_coefficients(self, stride: int) -> torch.Tensor:
        """``(steps, 4)`` float32: ``sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)`` per sampling step.

        ``a`` is the cumulative alpha product, ``prev = t - stride`` (the final alpha, 1, below 0):
        the same float32 tensor arithmetic as MONAI's ``DDIMScheduler.step`` with ``eta = 0`` and
        ``Scheduler.add_noise``.
        """
        alphas = self.sample_scheduler.alphas_cumprod.to(torch.float32)
        final = self.sample_scheduler.final_alpha_cumprod.to(torch.float32)
        rows = []
        for t in self.timesteps:
            alpha_t = alphas[t]
            alpha_prev = alphas[t - stride] if t - stride >= 0 else final
            rows.append(torch.stack((alpha_t**0.5, (1 - alpha_t) ** 0.5, alpha_prev**0.5, (1 - alpha_prev) ** 0.5)))
        return torch.stack(rows)

    def __prepare_scriptable__(self) -> MotionAwareDiffusion:
        """What ``torch.jit.script`` compiles: a shallow copy with a scriptable copy of the UNet.

        The copy drops the training scheduler, the sampling scheduler and the inferer (only
        :meth:`training_loss` and construction use them); ``self`` is not modified.
        """
        twin = copy.copy(self)
        twin._modules = OrderedDict(
            (name, module)
            for name, module in self._modules.items()
            if name not in ("train_scheduler", "sample_scheduler", "unet")
        )
        twin.__dict__.pop("inferer", None)
        twin._modules["unet"] = scriptable_diffusion_unet(self.unet)
        return twin

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """UNet prediction of the clean half-resolution sample, all tensors in model space (see :meth:`prepare`)."""
        return self.unet(torch.cat((noisy, condition), dim=1), timesteps)

    def prepare(self, slices: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map full-resolution slices ``(N, 1, H, W)`` to model space; also return the unpadded half size.

        Model space is half resolution, padded to the UNet's down-sampling factor, in [-1, 1].
        """
        half = F.avg_pool2d(pad_to_multiple(slices, 2), 2)
        return pad_to_multiple(half, self.downsample_factor) * 2 - 1, (half.shape[-2], half.shape[-1])

    def condition(
        self, corrupted: torch.Tensor, acceleration: float | torch.Tensor, motion: float | torch.Tensor
    ) -> torch.Tensor:
        """Condition channels for model-space ``corrupted`` slices: the slice and, optionally, degradation maps."""
        if not self.use_degradation_maps:
            return corrupted
        code = acquisition_code(acceleration, motion, corrupted.shape[0], corrupted.device)
        return torch.cat((corrupted, constant_maps(code, corrupted)), dim=1)

    def training_loss(
        self,
        clean: torch.Tensor,
        corrupted: torch.Tensor,
        acceleration: float | torch.Tensor,
        motion: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error of the x0 prediction for randomly noised ``clean`` slices ``(N, 1, H, W)``."""
        check_slices(clean, "clean")
        check_slices(corrupted, "corrupted")
        if clean.shape != corrupted.shape:
            raise ValueError(
                f"clean and corrupted must have the same shape, got {tuple(clean.shape)} and {tuple(corrupted.shape)}."
            )
        target, half = self.prepare(clean)
        condition = self.condition(self.prepare(corrupted)[0], acceleration, motion)
        device = clean.device if generator is None else generator.device
        timesteps = torch.randint(0, self.timesteps[0] + 1, (clean.shape[0],), generator=generator, device=device).to(
            clean.device
        )
        prediction = self.inferer(
            inputs=target,
            diffusion_model=self.unet,
            noise=_noise_like(target, generator),
            timesteps=timesteps,
            condition=condition,
            mode="concat",
        )
        return F.mse_loss(crop_to(prediction, half), crop_to(target, half))

    def sample(
        self,
        corrupted: torch.Tensor,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Coarse reconstruction of ``corrupted`` slices ``(N, 1, H, W)`` (intensities ~[0, 1]) at full resolution.

        Runs without gradients. Deterministic DDIM (eta = 0) from the noised corrupted slice; the
        initial noise of each of the ``num_samples`` averaged chains comes from ``generator``, in turn.
        """
        with torch.no_grad():
            check_slices(corrupted, "corrupted")
            start, half = self.prepare(corrupted)
            condition = self.condition(start, acceleration, motion)
            timesteps = torch.full([corrupted.shape[0]], self.timesteps[0], dtype=torch.long, device=corrupted.device)
            coefficients = self.ddim_coefficients.to(start.dtype)
            total = torch.zeros_like(start)
            for _ in range(self.num_samples):
                image = coefficients[0, 0] * start + coefficients[0, 1] * _noise_like(start, generator)
                step = 0
                for t in self.timesteps:
                    clean = self(image, torch.full_like(timesteps, t), condition)
                    noise = (image - coefficients[step, 0] * clean) / coefficients[step, 1]
                    image = coefficients[step, 2] * clean + coefficients[step, 3] * noise
                    step += 1
                total = total + image
            coarse = (crop_to(total / self.num_samples, half) + 1) / 2
            full = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=False)
            return crop_to(full, (corrupted.shape[-2], corrupted.shape[-1]))

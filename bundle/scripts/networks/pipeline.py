"""PR-INR: the three stages composed into one module mapping a degraded stack to an isotropic volume."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .detail import ImplicitDetailRestoration
from .diffusion import MotionAwareDiffusion
from .inputs import check_kspace, check_scale, check_volume, declared_clean, per_sample
from .volume import VoxelContinuousINR

logger = logging.getLogger(__name__)


def _stage(cls: type[nn.Module], stage: nn.Module | dict[str, Any] | None) -> nn.Module:
    """A stage given as a module (e.g. a ``_target_`` in a bundle config) or as its constructor kwargs."""
    if isinstance(stage, nn.Module):
        if not isinstance(stage, cls):
            raise ValueError(f"expected a {cls.__name__} (or its constructor kwargs), got {type(stage).__name__}.")
        return stage
    return cls(**(stage or {}))


def _to_slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W, S)`` -> ``(B * S, C, H, W)``, slice-major within each volume."""
    return x.movedim(-1, 1).flatten(0, 1)


def _to_volume(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_to_slices`."""
    return x.unflatten(0, [batch, -1]).movedim(1, -1)


class PRINRPipeline(nn.Module):
    """Progressive refinement: diffusion (coarse) -> implicit detail restoration (per slice) -> voxel INR.

    Input is a degraded stack ``(B, 1, H, W, S)`` in raw intensities with the thick-slice axis last.
    Intensities are divided by each volume's 99.5th percentile (and clamped at 0) so every stage
    sees ~[0, 1], and multiplied back at the end. Stages 1 and 2 run on ``slice_batch`` slices at a
    time and stage 3 decodes in chunks, which bounds memory for large volumes.

    Args:
        diffusion: :class:`MotionAwareDiffusion` or its constructor kwargs.
        detail: :class:`ImplicitDetailRestoration` or its constructor kwargs.
        volume: :class:`VoxelContinuousINR` or its constructor kwargs.
        slice_batch: slices processed together by stages 1 and 2.
        use_diffusion: run stage 1; when False the corrupted slice is stage 2's coarse input
            (the "stage 2 + 3 without stage 1" ablation).

    **Declared-clean acquisitions.** A volume given with ``acceleration`` 1 and ``motion`` 0 has
    slices that are measurements of the thick slices, not corrupted estimates of them. Stages 1
    and 2 leave such slices unchanged (running them would only add their errors), and stage 3's
    volume is corrected with :func:`scripts.networks.volume.slab_consistent` so that it averages
    back to them exactly. Declare motion or acceleration whenever the scan may contain either.

    TorchScript: ``torch.jit.script(pipeline)`` (what ``python -m monai.bundle ckpt_export`` does)
    compiles :meth:`forward` with its full signature and behaviour (any size, batch and scale,
    optional k-space, seeded stage-1 noise); acquisition parameters must then be Python floats or
    tensors, not ints. See :meth:`__prepare_scriptable__`.
    """

    def __init__(
        self,
        diffusion: MotionAwareDiffusion | dict[str, Any] | None = None,
        detail: ImplicitDetailRestoration | dict[str, Any] | None = None,
        volume: VoxelContinuousINR | dict[str, Any] | None = None,
        slice_batch: int = 8,
        use_diffusion: bool = True,
    ) -> None:
        super().__init__()
        if slice_batch < 1:
            raise ValueError(f"slice_batch must be >= 1, got {slice_batch}.")
        self.diffusion = _stage(MotionAwareDiffusion, diffusion)
        self.detail = _stage(ImplicitDetailRestoration, detail)
        self.volume = _stage(VoxelContinuousINR, volume)
        self.slice_batch = slice_batch
        self.use_diffusion = use_diffusion

    def __prepare_scriptable__(self) -> PRINRPipeline:
        """What ``torch.jit.script`` compiles: a shallow copy whose stages TorchScript then prepares in turn.

        ``torch.jit.script`` replaces submodules by what their own ``__prepare_scriptable__`` returns
        (here the diffusion stage's scriptable copy) in the module's ``_modules``; giving it a copy
        with its own ``_modules`` keeps this pipeline unchanged.
        """
        twin = copy.copy(self)
        twin._modules = OrderedDict(self._modules)
        return twin

    @staticmethod
    def reference_intensity(image: torch.Tensor) -> torch.Tensor:
        """Each volume's 99.5th percentile (nearest rank) as ``(B, 1, 1, 1, 1)``; 1 where it is not positive.

        ``kthvalue`` rather than ``quantile``, which refuses inputs of more than 2**24 elements.
        """
        flat = image.flatten(1)
        rank = max(1, math.ceil(0.995 * flat.shape[1]))
        reference = flat.kthvalue(rank, dim=1)[0]
        reference = torch.where(reference > 0, reference, torch.ones_like(reference))
        return reference.view(-1, 1, 1, 1, 1)

    def coarse_slices(
        self,
        corrupted: torch.Tensor,
        acceleration: float | torch.Tensor,
        motion: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Stage 1 of slices ``(N, 1, H, W)`` (intensities ~[0, 1]); the slices themselves where stage 1 is skipped.

        Skipped without ``use_diffusion`` and for slices of a declared-clean acquisition. Noise comes
        from ``generator``; unless every slice is clean it is drawn for the whole batch, so a slice's
        result does not depend on which of its neighbours are clean.
        """
        clean = declared_clean(acceleration, motion, corrupted.shape[0], corrupted.device)
        if not self.use_diffusion or bool(clean.all()):
            return corrupted
        coarse = self.diffusion.sample(corrupted, acceleration, motion, generator).clamp_min(0)
        return torch.where(clean[:, None, None, None], corrupted, coarse)

    def refined_slices(
        self,
        corrupted: torch.Tensor,
        coarse: torch.Tensor,
        acceleration: float | torch.Tensor,
        motion: float | torch.Tensor,
        kspace: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stage 2 of slices ``(N, 1, H, W)`` given their :meth:`coarse_slices`; declared-clean ones pass unchanged."""
        clean = declared_clean(acceleration, motion, corrupted.shape[0], corrupted.device)
        if bool(clean.all()):
            return corrupted
        refined = self.detail(corrupted, coarse, acceleration, motion, kspace, mask).clamp_min(0)
        return torch.where(clean[:, None, None, None], corrupted, refined)

    def reconstruct(
        self,
        image: torch.Tensor,
        scale: float,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
        kspace: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Every stage's output in raw intensities, for ablations.

        Returns ``"stage1"`` (coarse, ``(B, 1, H, W, S)``; the corrupted input when ``use_diffusion``
        is False), ``"stage2"`` (refined, ``(B, 1, H, W, S)``) and ``"stage3"`` (isotropic,
        ``(B, 1, H, W, round(S * scale))``). ``acceleration`` and ``motion`` are scalars or ``(B,)``;
        ``kspace`` (complex, the image's shape, centred orthonormal FFT over H and W) and ``mask``
        (boolean, broadcastable, True = acquired line) enable data consistency in stage 2.
        Stage 1 noise comes from a CPU generator seeded with ``seed``, so results repeat on any device.
        """
        check_volume(image, "image")
        check_kspace(image, kspace, mask)
        check_scale(scale)
        batch, num_slices = image.shape[0], image.shape[-1]
        reference = self.reference_intensity(image)
        slices = _to_slices((image / reference).clamp_min(0))
        accelerations = per_sample(acceleration, batch, "acceleration", image.device).repeat_interleave(num_slices)
        motions = per_sample(motion, batch, "motion", image.device).repeat_interleave(num_slices)
        if kspace is not None and mask is not None:
            kspace = _to_slices(kspace / reference)
            mask = _to_slices(mask.expand(image.shape))
        generator = torch.Generator()
        generator.manual_seed(seed)

        coarse: list[torch.Tensor] = []
        refined: list[torch.Tensor] = []
        started = 0.0
        if not torch.jit.is_scripting():
            started = time.perf_counter()
        for start in range(0, slices.shape[0], self.slice_batch):
            stop = start + self.slice_batch
            corrupted = slices[start:stop]
            part_acceleration, part_motion = accelerations[start:stop], motions[start:stop]
            coarse.append(self.coarse_slices(corrupted, part_acceleration, part_motion, generator))
            measured: torch.Tensor | None = None
            sampled: torch.Tensor | None = None
            if kspace is not None and mask is not None:
                measured = kspace[start:stop]
                sampled = mask[start:stop]
            refined.append(
                self.refined_slices(corrupted, coarse[-1], part_acceleration, part_motion, measured, sampled)
            )
            if not torch.jit.is_scripting():
                logger.info(
                    "stages 1-2 (diffusion%s, detail restoration): %d/%d slices, %.1f s",
                    "" if self.use_diffusion else " skipped",
                    min(stop, slices.shape[0]),
                    slices.shape[0],
                    time.perf_counter() - started,
                )
        stage1 = _to_volume(torch.cat(coarse), batch)
        stage2 = _to_volume(torch.cat(refined), batch)
        if not torch.jit.is_scripting():
            started = time.perf_counter()
        clean = declared_clean(acceleration, motion, batch, image.device)
        stage3 = self.volume(stage2, scale, clean, acceleration, motion).clamp_min(0)
        if not torch.jit.is_scripting():
            logger.info(
                "stage 3 (voxel INR): %s voxels, %.1f s",
                "x".join(map(str, stage3.shape[2:])),
                time.perf_counter() - started,
            )
        return {"stage1": stage1 * reference, "stage2": stage2 * reference, "stage3": stage3 * reference}

    def forward(
        self,
        image: torch.Tensor,
        scale: float = 5.0,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
        kspace: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Isotropic reconstruction ``(B, 1, H, W, round(S * scale))`` of a degraded stack; see :meth:`reconstruct`.

        ``scale`` defaults to the protocol's 5 so that ``net(image)`` works (``verify_net_in_out``).
        """
        return self.reconstruct(image, scale, acceleration, motion, kspace, mask, seed)["stage3"]

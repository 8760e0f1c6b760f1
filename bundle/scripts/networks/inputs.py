"""Checks and encodings of the inputs every stage shares: tensor layouts and acquisition parameters."""

from __future__ import annotations

import math

import torch

# Largest values of the training distribution (R in {1, 2, 4, 8}, motion 0-6 % of the FOV); they map to 1.
ACCELERATION_MAX = 8.0
MOTION_MAX = 0.06


def check_slices(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a batch of single-channel 2D slices ``(N, 1, H, W)``."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got {tuple(x.shape)}.")


def check_volume(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a batch of single-channel stacks ``(B, 1, H, W, S)`` (slice axis last)."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W, S) with the slice axis last, got {tuple(x.shape)}.")


def check_kspace(image: torch.Tensor, kspace: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    """Raise unless ``kspace`` and ``mask`` are both absent, or complex/boolean and shaped like ``image``."""
    if (kspace is None) != (mask is None):
        raise ValueError("kspace and mask must be given together (data consistency needs both) or not at all.")
    if kspace is None or mask is None:
        return
    if not kspace.is_complex() or kspace.shape != image.shape:
        raise ValueError(
            f"kspace must be complex with the image's shape {tuple(image.shape)}, "
            f"got {kspace.dtype} {tuple(kspace.shape)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = acquired line), got {mask.dtype}.")
    try:
        torch.broadcast_shapes(mask.shape, image.shape)
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the image's shape {tuple(image.shape)}."
        ) from error


def check_scale(scale: float) -> float:
    """Return ``scale`` as a float; raise unless it is finite and >= 1 (slice spacing / target spacing)."""
    scale = float(scale)
    if not math.isfinite(scale) or scale < 1.0:
        raise ValueError(f"scale must be a finite float >= 1 (slice spacing / target spacing), got {scale}.")
    return scale


def per_sample(value: float | torch.Tensor, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or a ``(batch,)`` tensor to a float ``(batch,)`` tensor on ``device``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}.")
    return value


def acquisition_code(
    acceleration: float | torch.Tensor, motion: float | torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    """Encode (acceleration, motion) as a ``(batch, 2)`` float code roughly in [0, 1].

    ``log2(R) / log2(8)`` and ``motion / 0.06`` give both parameters the same range, so the gating
    MLP and the constant condition maps of the diffusion model see comparable magnitudes.
    """
    acceleration = per_sample(acceleration, batch, "acceleration", device)
    motion = per_sample(motion, batch, "motion", device)
    if bool((acceleration < 1).any()) or bool((motion < 0).any()):
        raise ValueError(
            f"acceleration must be >= 1 and motion >= 0, got {acceleration.tolist()} and {motion.tolist()}."
        )
    return torch.stack((torch.log2(acceleration) / math.log2(ACCELERATION_MAX), motion / MOTION_MAX), dim=1)

"""Checks and encodings of the inputs every stage shares: tensor layouts and acquisition parameters.

Everything here is TorchScript-compatible (the pipeline is exported with ``torch.jit.script``):
no ``try``/``except``, no ``*args`` unpacking, acquisition parameters as ``float | Tensor``.
"""

from __future__ import annotations

import math

import torch

# Largest values of the training distribution (R in {1, 2, 4, 8}, motion 0-6 % of the FOV); they map to 1.
ACCELERATION_MAX = 8.0
MOTION_MAX = 0.06


def shape_str(x: torch.Tensor) -> str:
    """``x``'s shape for error messages, as a tuple in Python (a list once scripted)."""
    if torch.jit.is_scripting():
        return str(x.shape)
    return str(tuple(x.shape))


def check_slices(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a batch of single-channel 2D slices ``(N, 1, H, W)``."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got {shape_str(x)}.")


def check_volume(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a batch of single-channel stacks ``(B, 1, H, W, S)`` (slice axis last)."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W, S) with the slice axis last, got {shape_str(x)}.")


def _broadcasts_to(shape: list[int], target: list[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (same rank or lower, each axis 1 or equal)."""
    if len(shape) > len(target):
        return False
    offset = len(target) - len(shape)
    for i in range(len(shape)):
        if shape[i] != 1 and shape[i] != target[offset + i]:
            return False
    return True


def check_kspace(image: torch.Tensor, kspace: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    """Raise unless ``kspace`` and ``mask`` are both absent, or complex/boolean and shaped like ``image``."""
    if (kspace is None) != (mask is None):
        raise ValueError("kspace and mask must be given together (data consistency needs both) or not at all.")
    if kspace is None or mask is None:
        return
    if not kspace.is_complex() or kspace.shape != image.shape:
        raise ValueError(
            f"kspace must be complex with the image's shape {shape_str(image)}, got {kspace.dtype} {shape_str(kspace)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = acquired line), got {mask.dtype}.")
    if not _broadcasts_to(mask.shape, image.shape):
        raise ValueError(f"mask of shape {shape_str(mask)} does not broadcast to the image's shape {shape_str(image)}.")


def check_scale(scale: float) -> float:
    """Return ``scale`` as a float; raise unless it is finite and >= 1 (slice spacing / target spacing)."""
    scale = float(scale)
    if not math.isfinite(scale) or scale < 1.0:
        raise ValueError(f"scale must be a finite float >= 1 (slice spacing / target spacing), got {scale}.")
    return scale


def per_sample(value: float | torch.Tensor, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or a ``(batch,)`` tensor to a float ``(batch,)`` tensor on ``device``."""
    if not torch.jit.is_scripting():
        tensor = torch.as_tensor(value, dtype=torch.float32, device=device)  # also lists, numpy values
    elif isinstance(value, torch.Tensor):
        tensor = value.to(device=device, dtype=torch.float32)
    else:
        tensor = torch.tensor(value, dtype=torch.float32, device=device)
    if tensor.ndim == 0:
        return tensor.expand(batch)
    if tensor.ndim != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {shape_str(tensor)}.")
    return tensor


def declared_clean(
    acceleration: float | torch.Tensor, motion: float | torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    """Which of ``batch`` samples were declared fully sampled (R = 1) and motion-free, as a ``(batch,)`` mask.

    Their slices are measurements, not estimates: stages 1 and 2 have nothing to repair in them,
    and stage 3's volume must reproduce them.
    """
    return (per_sample(acceleration, batch, "acceleration", device) == 1) & (
        per_sample(motion, batch, "motion", device) == 0
    )


def acquisition_code(
    acceleration: float | torch.Tensor,
    motion: float | torch.Tensor,
    batch: int,
    device: torch.device,
    acceleration_max: float = ACCELERATION_MAX,
    motion_max: float = MOTION_MAX,
) -> torch.Tensor:
    """Encode (acceleration, motion) as a ``(batch, 2)`` float code roughly in [0, 1].

    ``log2(R) / log2(8)`` and ``motion / 0.06`` give both parameters the same range, so the gating
    MLP and the constant condition maps of the diffusion model see comparable magnitudes. (The
    maxima are arguments because TorchScript cannot read module-level floats.)
    """
    acceleration = per_sample(acceleration, batch, "acceleration", device)
    motion = per_sample(motion, batch, "motion", device)
    if bool((acceleration < 1).any()) or bool((motion < 0).any()):
        raise ValueError(
            f"acceleration must be >= 1 and motion >= 0, got minimum acceleration {float(acceleration.min())} "
            f"and minimum motion {float(motion.min())}."
        )
    log2_max = torch.log2(torch.tensor(acceleration_max, dtype=torch.float64)).item()  # 3.0 exactly for 8
    return torch.stack((torch.log2(acceleration) / log2_max, motion / motion_max), dim=1)


def constant_maps(code: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(batch, C)`` code as ``C`` constant channels over the spatial grid of ``like`` (2D or 3D).

    This is how every stage feeds :func:`acquisition_code` to a convolutional encoder.
    """
    shape = [code.shape[0], code.shape[1]] + [1] * (like.dim() - 2)
    size = [-1, -1] + list(like.shape[2:])
    return code.to(like.dtype).view(shape).expand(size)

"""Padding that lets the down-sampling networks accept any in-plane size, including odd ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the last two axes of ``x`` at their ends up to the next multiple of ``multiple``.

    Padding only at the far ends keeps pixel ``(i, j)`` at index ``(i, j)``, so :func:`crop_to` with
    the original size undoes it exactly; replication avoids the artificial edges of zero padding.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the first ``size`` pixels of the last two axes."""
    return x[..., : size[0], : size[1]]

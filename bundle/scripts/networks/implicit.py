"""Building blocks shared by the coordinate decoders (stage 2 and stage 3 INRs).

Coordinates are continuous voxel indices: ``k`` is the centre of grid node ``k`` along an axis, so
the grid's own nodes are queried with integer coordinates and no rescaling depends on the size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.networks.nets import FullyConnectedNet
from torch import nn


def fourier_features(x: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """``sin``/``cos`` of ``x * pi * 2**k`` for ``k < num_frequencies``: ``(..., d) -> (..., 2 * d * L)``.

    Lets a small MLP represent sharp variations of the sub-voxel offsets it is given.
    """
    freqs = math.pi * torch.pow(2.0, torch.arange(num_frequencies, device=x.device, dtype=x.dtype))
    angles = (x[..., None] * freqs).flatten(-2)
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1)


def linear_neighbours(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two grid nodes bracketing ``coord`` along an axis of ``size`` nodes, and the fraction past the first.

    ``coord`` is clamped to ``[0, size - 1]`` (beyond the outer node centres the border values are
    used). The lower node is at most ``size - 2`` so that the last node itself has fraction 1 and
    every query has exactly one node with weight 1 when it sits on the grid.
    """
    coord = coord.clamp(0, size - 1)
    low = coord.floor().clamp(max=max(size - 2, 0))
    fraction = coord - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    return low, high, fraction


def channels_last_table(base: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``cat((base, features), dim=1)`` stored channels-last, built in place to avoid a second copy.

    Channel 0 (the image a residual is added to) travels with the features, and channels-last
    storage makes each voxel's channels one row of a ``(voxels, 1 + C)`` table for lookups.
    """
    shape = [features.shape[0]] + list(features.shape[2:]) + [1 + features.shape[1]]
    table = features.new_empty(shape)
    table[..., 0] = base[:, 0]
    table[..., 1:] = features.movedim(1, -1)
    return table.movedim(-1, 1)


class OffsetDecoder(nn.Module):
    """MLP from (node features, offset of the query from the node) to a residual intensity.

    Its first layer acts on ``[features, offset, fourier(offset)]``; the part acting on the features
    is the encoder's last (linear) convolution, so the features given here are already that
    layer's contribution. Because it is linear, interpolating the features first is the same as
    interpolating the first layer's output, and a grid decode reuses each feature map for every
    offset without building per-query inputs.

    Args:
        offset_dims: number of offset components.
        hidden_features: width of every hidden layer (and of the features).
        num_hidden_layers: hidden layers, the first one included (>= 1).
        num_frequencies: Fourier frequencies per offset component.
    """

    def __init__(self, offset_dims: int, hidden_features: int, num_hidden_layers: int, num_frequencies: int) -> None:
        super().__init__()
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}.")
        self.num_frequencies = num_frequencies
        self.offset = nn.Linear(offset_dims * (1 + 2 * num_frequencies), hidden_features, bias=False)
        self.head = FullyConnectedNet(hidden_features, 1, [hidden_features] * (num_hidden_layers - 1), act="RELU")

    def forward(self, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Residuals ``(...)`` for ``features`` ``(..., hidden)`` and ``offsets`` ``(..., d)`` broadcastable to them."""
        embedded = self.offset(torch.cat((offsets, fourier_features(offsets, self.num_frequencies)), dim=-1))
        hidden = torch.relu(features + embedded)
        return self.head(hidden.reshape(-1, hidden.shape[-1])).view(hidden.shape[:-1])


def decode_in_chunks(
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], coords: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Decode ``coords`` ``(B, Q, d)`` into ``(B, Q)`` with about ``chunk_size`` points per call.

    ``decode(items, points)`` decodes a flat list of points ``(P, d)`` belonging to batch items
    ``items`` ``(P,)``; chunking keeps the decoder's memory bounded for any number of queries.
    """
    batch, num_points = coords.shape[:2]
    out = coords.new_empty(batch, num_points)
    step = max(1, chunk_size // batch)
    items = torch.arange(batch, device=coords.device)
    for start in range(0, num_points, step):
        chunk = coords[:, start : start + step]
        values = decode(items.repeat_interleave(chunk.shape[1]), chunk.reshape(-1, chunk.shape[-1]))
        out[:, start : start + step] = values.view(batch, -1)
    return out

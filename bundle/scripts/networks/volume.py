"""Stage 3: voxel continuous-aware INR turning the refined anisotropic stack into an isotropic volume."""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from .implicit import OffsetDecoder, channels_last_table, decode_in_chunks, linear_neighbours
from .inputs import check_scale, check_volume


def output_size(num_slices: int, scale: float) -> int:
    """Number of output voxels along the slice axis: Python's ``round(num_slices * scale)``.

    Written out (round half to even) because TorchScript's ``round`` returns a float.
    """
    value = num_slices * check_scale(scale)
    low = math.floor(value)
    fraction = value - low  # exact for floats below 2**52
    if fraction > 0.5 or (fraction == 0.5 and low % 2 == 1):
        low += 1
    return int(low)


def output_positions(num_slices: int, scale: float, device: torch.device | None = None) -> torch.Tensor:
    """Slice-axis positions of the output grid in thick-slice index units (slice ``k`` centred at ``k``).

    ``z_j = -0.5 + (j + 0.5) / scale`` for ``j < output_size(num_slices, scale)``: the output voxels
    tile the extent ``[-0.5, num_slices - 0.5]`` covered by the thick slices, ``1 / scale`` apart. An
    output affine therefore has spacing ``slice spacing / scale`` along the slice axis and its first
    voxel centre at ``-0.5 + 0.5 / scale`` thick slices from the first slice centre. Positions
    outside ``[0, num_slices - 1]`` are clamped to it when sampling (they repeat the border slice).
    """
    index = torch.arange(output_size(num_slices, scale), dtype=torch.float64, device=device)
    return (index + 0.5) / scale - 0.5


class VoxelContinuousINR(nn.Module):
    """Continuous through-plane representation of a stack of refined slices ``(B, 1, H, W, S)``.

    A small 3D convolutional encoder (no normalisation, isotropic 3x3x3 kernels, so neighbouring
    thick slices inform each other) gives a feature vector per voxel. A query at continuous voxel
    coordinates ``(h, w, z)`` samples, bilinearly in-plane, the stack and the features of its two
    neighbouring slices ``floor(z)`` and ``floor(z) + 1``; for each neighbour an MLP of its features,
    the offset ``z - z_k`` and its Fourier encoding predicts a residual. The output blends the two
    (slice value + residual) with linear weights: linear interpolation of the stack along ``z`` plus
    interpolated residuals, so an untrained decoder already gives a sensible volume and training
    only learns the correction.

    Args:
        encoder_channels: width of the encoder's hidden layers.
        num_res_units: residual units (two convolutions each) between the encoder's first and last conv.
        hidden_features: feature channels and hidden width of the coordinate MLP.
        num_hidden_layers: hidden layers of the coordinate MLP.
        num_frequencies: Fourier frequencies of the slice offset.
        chunk_size: query points decoded at once (at least one output plane on the grid); bounds
            the decoder's memory for any output size.
    """

    def __init__(
        self,
        encoder_channels: int = 16,
        num_res_units: int = 1,
        hidden_features: int = 32,
        num_hidden_layers: int = 2,
        num_frequencies: int = 4,
        chunk_size: int = 65536,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.encoder = nn.Sequential(
            Convolution(3, 1, encoder_channels, norm=None),
            *(ResidualUnit(3, encoder_channels, encoder_channels, norm=None) for _ in range(num_res_units)),
            Convolution(3, encoder_channels, hidden_features, conv_only=True),
        )
        self.decoder = OffsetDecoder(1, hidden_features, num_hidden_layers, num_frequencies)

    def encode(self, stack: torch.Tensor) -> torch.Tensor:
        """Features ``(B, 1 + C, H, W, S)`` of ``stack``; channel 0 is the stack itself (the interpolation base)."""
        check_volume(stack, "stack")
        return channels_last_table(stack, self.encoder(stack))

    def query(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Intensities ``(B, Q)`` at continuous voxel coordinates ``coords`` ``(B, Q, 3)`` = (h, w, z).

        ``features`` comes from :meth:`encode`; voxel ``(i, j, k)`` of the stack is centred at ``(i, j, k)``.
        """
        if features.ndim != 5 or coords.ndim != 3 or coords.shape[0] != features.shape[0] or coords.shape[2] != 3:
            raise ValueError(
                f"expected features (B, 1 + C, H, W, S) and coords (B, Q, 3), "
                f"got {tuple(features.shape)} and {tuple(coords.shape)}."
            )
        table = features.movedim(1, -1).reshape(-1, features.shape[1])
        height, width, num_slices = features.shape[-3:]

        def decode(items: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
            h_low, h_high, h_frac = linear_neighbours(points[:, 0], height)
            w_low, w_high, w_frac = linear_neighbours(points[:, 1], width)
            z_low, z_high, z_frac = linear_neighbours(points[:, 2], num_slices)
            in_plane = [
                (((items * height + h) * width + w) * num_slices, h_weight * w_weight)
                for h, h_weight in ((h_low, 1 - h_frac), (h_high, h_frac))
                for w, w_weight in ((w_low, 1 - w_frac), (w_high, w_frac))
            ]
            pixels = torch.stack([index for index, _ in in_plane])  # (4, P)
            pixel_weights = torch.stack([weight for _, weight in in_plane])[..., None]  # (4, P, 1)
            # bilinear in-plane sampling of both neighbouring slices: (2, 4, P, 1 + C) -> (2, P, 1 + C)
            values = (table[pixels + torch.stack((z_low, z_high))[:, None]] * pixel_weights).sum(dim=1)
            offsets = torch.stack((z_frac, z_frac - 1))[..., None]
            return self._blend(values, offsets, torch.stack((1 - z_frac, z_frac)), dim=0)

        return decode_in_chunks(decode, coords, self.chunk_size)

    def forward(self, stack: torch.Tensor, scale: float) -> torch.Tensor:
        """Isotropic volume ``(B, 1, H, W, round(S * scale))`` at :func:`output_positions` along z.

        Equals :meth:`query` at the output voxel centres; on the grid the in-plane sampling is the
        identity, so whole planes of the two neighbouring slices are decoded without lookups.
        """
        features = self.encode(stack)
        batch, _, height, width, num_slices = features.shape
        low, high, fraction = linear_neighbours(
            output_positions(num_slices, scale, features.device).to(features.dtype), num_slices
        )
        voxels = features.movedim(1, -1)  # (B, H, W, S, 1 + C), a view of the channels-last storage
        out = features.new_empty([batch, height, width, low.numel()])
        planes = max(1, self.chunk_size // (batch * height * width))
        for start in range(0, low.numel(), planes):
            stop = start + planes
            values = voxels[:, :, :, torch.stack((low[start:stop], high[start:stop]))]  # (B, H, W, 2, n, 1 + C)
            offsets = torch.stack((fraction[start:stop], fraction[start:stop] - 1)).view(2, -1, 1)
            weights = torch.stack((1 - fraction[start:stop], fraction[start:stop]))
            out[..., start:stop] = self._blend(values, offsets, weights, dim=3)
        return out[:, None]

    def _blend(self, values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
        """Blend the two neighbouring slices (axis ``dim`` of ``values``) by ``weights``: slice value plus residual.

        ``values`` is ``(..., 1 + C)``; ``offsets`` ``(2, ..., 1)`` and ``weights`` ``(2, ...)`` are
        aligned with the trailing dimensions of ``values[..., 0]`` from ``dim`` on.
        """
        residuals = self.decoder(values[..., 1:], offsets)
        return (weights * (values[..., 0] + residuals)).sum(dim=dim)

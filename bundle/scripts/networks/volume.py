"""Stage 3: voxel continuous-aware INR turning the refined anisotropic stack into an isotropic volume."""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from ..transforms.thick_slice import boxcar_slab_weights
from .implicit import OffsetDecoder, channels_last_table, decode_in_chunks, linear_neighbours
from .inputs import acquisition_code, check_scale, check_volume, constant_maps, shape_str


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


def cubic_neighbours(low: torch.Tensor, size: int) -> torch.Tensor:
    """Indices ``(4, ...)`` of the slices ``low - 1 .. low + 2`` clamped to ``[0, size - 1]`` (border repeated)."""
    return torch.stack(
        ((low - 1).clamp(0, size - 1), low, (low + 1).clamp(max=size - 1), (low + 2).clamp(max=size - 1))
    )


def cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Catmull-Rom weights ``(4, ...)`` of the slices ``floor(z) - 1 .. floor(z) + 2`` at fraction ``t``.

    They sum to 1, interpolate (``t = 0`` gives ``(0, 1, 0, 0)``) and reproduce quadratics.
    """
    t2, t3 = t * t, t * t * t
    return torch.stack(
        (
            0.5 * (-t3 + 2 * t2 - t),
            0.5 * (3 * t3 - 5 * t2 + 2),
            0.5 * (-3 * t3 + 4 * t2 + t),
            0.5 * (t3 - t2),
        )
    )


def slab_consistent(volume: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``volume`` corrected so that averaging it over each slab of ``stack`` gives ``stack`` back exactly.

    ``volume`` ``(B, 1, H, W, n)`` lies on the :func:`output_positions` grid of ``stack``
    ``(B, 1, H, W, S)``, whose voxels tile the slabs. With ``A`` the slab averaging ``(S, n)`` and
    ``U`` Catmull-Rom interpolation from the slices to the grid ``(n, S)``, the correction is
    ``U (A U)^-1 (stack - A volume)``: smooth along the slice axis, and zero where the volume
    already averages to the slices, so only the detail within each slab is left to the volume.
    ``A U`` is a small, diagonally dominant ``(S, S)`` matrix, solved in float64.
    """
    num_slices, size = stack.shape[-1], volume.shape[-1]
    scale = size / num_slices
    average = boxcar_slab_weights(num_slices, size, scale).to(volume.device)
    low, _, fraction = linear_neighbours(output_positions(num_slices, scale, volume.device), num_slices)
    taps = torch.nn.functional.one_hot(cubic_neighbours(low, num_slices), num_slices).to(average.dtype)
    interpolate = (cubic_weights(fraction)[..., None] * taps).sum(dim=0)  # (n, S)
    correction = torch.linalg.solve((average @ interpolate).T, interpolate.T)  # (S, n) = ((A U)^-1)^T U^T
    residual = stack - volume @ average.T.to(volume.dtype)
    return volume + residual @ correction.to(volume.dtype)


class VoxelContinuousINR(nn.Module):
    """Continuous through-plane representation of a stack of refined slices ``(B, 1, H, W, S)``.

    A small 3D convolutional encoder (no normalisation, isotropic 3x3x3 kernels, so neighbouring
    thick slices inform each other) gives a feature vector per voxel. A query at continuous voxel
    coordinates ``(h, w, z)`` samples, bilinearly in-plane, the features of its two neighbouring
    slices ``floor(z)`` and ``floor(z) + 1``; for each neighbour an MLP of its features, the offset
    ``z - z_k`` and its Fourier encoding predicts a residual. The output is cubic (Catmull-Rom)
    interpolation of the stack along ``z`` from the four nearest slices plus the two residuals
    blended with linear weights: an untrained decoder already gives a cubic interpolation, about
    as good as the B-spline baseline, and training only learns the correction.

    The encoder also sees the acquisition's (R, motion) as two constant maps (as stages 1 and 2
    do), so it can trust stage 2's estimates less where the acquisition was worse, and whether the
    stack holds measured slices (``clean``: an acquisition declared clean) or stage-2 estimates of
    them. The two call for different corrections: sharp detail within each slab of a measurement,
    against not amplifying the errors of an estimate.
    The volume of a clean stack is then made :func:`slab_consistent` with it.

    Args:
        encoder_channels: width of the encoder's hidden layers.
        num_res_units: residual units (two convolutions each) between the encoder's first and last conv.
        hidden_features: feature channels and hidden width of the coordinate MLP.
        num_hidden_layers: hidden layers of the coordinate MLP.
        num_frequencies: Fourier frequencies of the slice offset.
        chunk_size: query points decoded at once (at least one output plane on the grid); bounds
            the decoder's memory for any output size.
        slab_consistency: make the grid output of clean stacks :func:`slab_consistent` (off only
            for ablations).
        slice_order_ensemble: in eval mode, average the grid output with the one decoded from the
            stack in reverse slice order (at the mirrored positions, so on the same grid). The
            network is not symmetric in slice order, and the mean of the two readings is closer to
            the truth, for twice stage 3's cost. Training decodes one reading.
        use_degradation_maps: give the encoder the (acceleration, motion) code of
            :func:`scripts.networks.inputs.acquisition_code` as two constant channels.
        encoder_tile_voxels: the encoder runs on slabs of about this many input voxels along H
            (with a halo of its receptive field, so the result is the same), which bounds the
            memory of its 32-channel intermediates on large scans.
    """

    def __init__(
        self,
        encoder_channels: int = 32,
        num_res_units: int = 2,
        hidden_features: int = 32,
        num_hidden_layers: int = 2,
        num_frequencies: int = 4,
        chunk_size: int = 65536,
        slab_consistency: bool = True,
        encoder_tile_voxels: int = 2**21,
        slice_order_ensemble: bool = True,
        use_degradation_maps: bool = True,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.slab_consistency = slab_consistency
        self.slice_order_ensemble = slice_order_ensemble
        self.use_degradation_maps = use_degradation_maps
        self.encoder_tile_voxels = encoder_tile_voxels
        self.feature_channels = hidden_features
        self.encoder_halo = 2 + 2 * num_res_units  # 3x3x3 convolutions in a row: one voxel each
        self.encoder = nn.Sequential(
            Convolution(3, 4 if use_degradation_maps else 2, encoder_channels, norm=None),
            *(ResidualUnit(3, encoder_channels, encoder_channels, norm=None) for _ in range(num_res_units)),
            Convolution(3, encoder_channels, hidden_features, conv_only=True),
        )
        self.decoder = OffsetDecoder(1, hidden_features, num_hidden_layers, num_frequencies)

    def encode(
        self,
        stack: torch.Tensor,
        clean: torch.Tensor | None = None,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """Features ``(B, 1 + C, H, W, S)`` of ``stack``; channel 0 is the stack itself (the interpolation base).

        ``clean`` ``(B,)`` (default: none) marks stacks of measured slices; the encoder sees it as a
        constant second channel, and (with ``use_degradation_maps``) the acquisition code of
        ``acceleration`` and ``motion`` as two more.
        """
        return self._encode(stack, self.conditions(stack, clean, acceleration, motion))

    def conditions(
        self,
        stack: torch.Tensor,
        clean: torch.Tensor | None,
        acceleration: float | torch.Tensor,
        motion: float | torch.Tensor,
    ) -> torch.Tensor:
        """The encoder's constant input channels for ``stack``: the clean flag and, optionally, the (R, motion) maps.

        Constant over the grid, so they serve the stack in either slice order.
        """
        check_volume(stack, "stack")
        flag = torch.zeros_like(stack)
        if clean is not None:
            if clean.ndim != 1 or clean.shape[0] != stack.shape[0]:
                raise ValueError(
                    f"clean must have one entry per stack, shape ({stack.shape[0]},), got {shape_str(clean)}."
                )
            flag = clean.to(stack.dtype).view(-1, 1, 1, 1, 1).expand_as(stack)
        if not self.use_degradation_maps:
            return flag
        code = acquisition_code(acceleration, motion, stack.shape[0], stack.device)
        return torch.cat((flag, constant_maps(code, stack)), dim=1)

    def _encode(self, stack: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` with the :meth:`conditions` already built."""
        return channels_last_table(stack, self._encode_in_tiles(torch.cat((stack, conditions), dim=1)))

    def _encode_in_tiles(self, inputs: torch.Tensor) -> torch.Tensor:
        """``self.encoder(inputs)``, computed on slabs along H with a halo and written into one output."""
        batch, _, height, width, num_slices = inputs.shape
        rows = max(1, self.encoder_tile_voxels // (batch * width * num_slices))
        if rows >= height:
            return self.encoder(inputs)
        out = inputs.new_empty([batch, self.feature_channels, height, width, num_slices])
        for start in range(0, height, rows):
            stop = min(start + rows, height)
            low, high = max(0, start - self.encoder_halo), min(height, stop + self.encoder_halo)
            out[:, :, start:stop] = self.encoder(inputs[:, :, low:high])[:, :, start - low : stop - low]
        return out

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
            # bilinear in-plane sampling of the four nearest slices: (4, 4, P, 1 + C) -> (4, P, 1 + C)
            nearest = cubic_neighbours(z_low, num_slices)
            values = (table[pixels + nearest[:, None]] * pixel_weights).sum(dim=1)
            return self._blend(values, z_frac, dim=0)

        return decode_in_chunks(decode, coords, self.chunk_size)

    def forward(
        self,
        stack: torch.Tensor,
        scale: float,
        clean: torch.Tensor | None = None,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """Isotropic volume ``(B, 1, H, W, round(S * scale))`` at :func:`output_positions` along z.

        One reading equals :meth:`query` at the output voxel centres; on the grid the in-plane
        sampling is the identity, so whole planes of the two neighbouring slices are decoded without
        lookups. In eval mode the ``slice_order_ensemble`` averages two readings.
        ``clean`` ``(B,)`` marks stacks of measured slices (an acquisition declared clean): the
        encoder sees it, and their volumes are made :func:`slab_consistent` with them.
        ``acceleration`` and ``motion`` (scalars or ``(B,)``) describe the acquisition.
        """
        positions = output_positions(stack.shape[-1], scale, stack.device).to(stack.dtype)
        conditions = self.conditions(stack, clean, acceleration, motion)
        out = self._decode_at(stack, positions, conditions)
        if self.slice_order_ensemble and not self.training:
            reverse = self._decode_at(stack.flip([-1]), (stack.shape[-1] - 1) - positions, conditions)
            out = (out + reverse) / 2
        if self.slab_consistency and clean is not None and bool(clean.any()):
            out = torch.where(clean.view(-1, 1, 1, 1, 1), slab_consistent(out, stack), out)
        return out

    def _decode_at(self, stack: torch.Tensor, positions: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The network's volume ``(B, 1, H, W, n)`` at the slice-axis ``positions`` ``(n,)``, on the in-plane grid."""
        features = self._encode(stack, conditions)
        batch, _, height, width, num_slices = features.shape
        low, _, fraction = linear_neighbours(positions, num_slices)
        nearest = cubic_neighbours(low, num_slices)  # (4, n)
        voxels = features.movedim(1, -1)  # (B, H, W, S, 1 + C), a view of the channels-last storage
        out = features.new_empty([batch, height, width, low.numel()])
        planes = max(1, self.chunk_size // (batch * height * width))
        for start in range(0, low.numel(), planes):
            stop = start + planes
            values = voxels[:, :, :, nearest[:, start:stop]]  # (B, H, W, 4, n, 1 + C)
            out[..., start:stop] = self._blend(values, fraction[start:stop], dim=3)
        return out[:, None]

    def _blend(self, values: torch.Tensor, fraction: torch.Tensor, dim: int) -> torch.Tensor:
        """Cubic interpolation of the four nearest slices (axis ``dim`` of ``values``) plus the two inner residuals.

        ``values`` is ``(..., 1 + C)`` with the slices ``floor(z) - 1 .. floor(z) + 2`` along ``dim``;
        ``fraction`` (``z - floor(z)``) is aligned with the trailing dimensions of ``values[..., 0]``
        after ``dim``. The inner two slices' residuals, decoded at offsets ``t`` and ``t - 1``, are
        blended with linear weights.
        """
        inner = values.narrow(dim, 1, 2)
        offsets = torch.stack((fraction, fraction - 1))[..., None]
        residuals = self.decoder(inner[..., 1:], offsets)
        linear = torch.stack((1 - fraction, fraction))
        return (cubic_weights(fraction) * values[..., 0]).sum(dim=dim) + (linear * residuals).sum(dim=dim)

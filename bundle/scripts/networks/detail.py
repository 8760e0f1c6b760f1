"""Stage 2: implicit detail restoration of each slice, guided by data consistency and the acquisition."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import FullyConnectedNet, UNet
from torch import nn

from ..kspace import data_consistency
from .implicit import OffsetDecoder, channels_last_table, decode_in_chunks, linear_neighbours
from .inputs import acquisition_code, check_kspace, check_slices, constant_maps, shape_str
from .padding import crop_to, pad_to_multiple


class ImplicitDetailRestoration(nn.Module):
    """Refine a coarse slice with a residual implicit neural representation (LIIF-style local ensemble).

    A 2D UNet encodes five channels: the corrupted slice, the coarse reconstruction, the coarse
    reconstruction's data-consistent projection (its acquired k-space lines replaced by the
    measured ones, which tells the encoder where the coarse estimate disagrees with the data) and
    two constant maps of the encoded (acceleration, motion). The features are gated per channel by
    a squeeze-excitation MLP that also sees the encoded acquisition, so the acquisition selects
    which features matter.

    The residual is added to a per-pixel blend of the corrupted and the coarse slice whose weight
    is one more output channel of the encoder. A clean, fully sampled slice is already the best
    estimate of itself, while the diffusion output is the better start under heavy motion; the
    blend lets the network choose per pixel and per acquisition instead of always starting from
    the coarse estimate.

    A query at continuous pixel coordinates ``(h, w)`` decodes, for each of the 4 surrounding
    feature-grid nodes, an MLP of the node's features, the offset from the node and its Fourier
    encoding; the 4 results (node's base value + residual) are blended with bilinear (area)
    weights. At a pixel centre one node has weight 1 and offset 0, which is what the grid forward
    decodes directly.

    Args:
        encoder_channels: UNet channels per level; the in-plane size is padded to ``2 ** (levels - 1)``.
        num_res_units: residual units per UNet block.
        gate_hidden: hidden width of the gating MLP.
        hidden_features: feature channels and hidden width of the coordinate MLP.
        num_hidden_layers: hidden layers of the coordinate MLP.
        num_frequencies: Fourier frequencies per offset component.
        chunk_size: query points decoded at once; bounds the decoder's memory.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int] = (16, 32, 64, 128),
        num_res_units: int = 1,
        gate_hidden: int = 16,
        hidden_features: int = 32,
        num_hidden_layers: int = 2,
        num_frequencies: int = 4,
        chunk_size: int = 65536,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.downsample_factor = 2 ** (len(encoder_channels) - 1)
        self.encoder = UNet(
            spatial_dims=2,
            in_channels=5,
            out_channels=hidden_features + 1,
            channels=tuple(encoder_channels),
            strides=(2,) * (len(encoder_channels) - 1),
            num_res_units=num_res_units,
        )
        self.gate = FullyConnectedNet(hidden_features + 2, hidden_features, [gate_hidden], act="RELU")
        self.decoder = OffsetDecoder(2, hidden_features, num_hidden_layers, num_frequencies)

    @staticmethod
    def consistency_channel(
        coarse: torch.Tensor, kspace: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Data-consistent projection of ``coarse`` slices; the coarse slices themselves without k-space."""
        if kspace is None or mask is None:
            return coarse
        return data_consistency(coarse, kspace, mask, dims=[2, 3])

    def encode(
        self,
        corrupted: torch.Tensor,
        coarse: torch.Tensor,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
        kspace: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gated features of ``(N, 1, H, W)`` slices as ``(N, 1 + C, H, W)``; channel 0 is the residual's base.

        The base is the per-pixel blend of ``corrupted`` and ``coarse``; carrying it with the
        features lets a query gather both in one lookup.
        """
        check_slices(corrupted, "corrupted")
        if coarse.shape != corrupted.shape:
            raise ValueError(
                f"coarse must have the corrupted slices' shape {shape_str(corrupted)}, got {shape_str(coarse)}."
            )
        check_kspace(corrupted, kspace, mask)
        code = acquisition_code(acceleration, motion, corrupted.shape[0], corrupted.device).to(corrupted.dtype)
        consistency = self.consistency_channel(coarse, kspace, mask)
        inputs = torch.cat((corrupted, coarse, consistency, constant_maps(code, corrupted)), dim=1)
        size = (corrupted.shape[-2], corrupted.shape[-1])
        encoded = crop_to(self.encoder(pad_to_multiple(inputs, self.downsample_factor)), size)
        base = torch.lerp(coarse, corrupted, torch.sigmoid(encoded[:, :1]))
        features = encoded[:, 1:]
        gates = torch.sigmoid(self.gate(torch.cat((features.mean(dim=(2, 3)), code), dim=1)))
        return channels_last_table(base, features * gates[:, :, None, None])

    def query(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Refined intensities ``(N, Q)`` at continuous pixel coordinates ``coords`` ``(N, Q, 2)`` = (h, w).

        ``features`` comes from :meth:`encode`; pixel ``(i, j)`` has its centre at ``(i, j)``.
        """
        if features.ndim != 4 or coords.ndim != 3 or coords.shape[0] != features.shape[0] or coords.shape[2] != 2:
            raise ValueError(
                f"expected features (N, 1 + C, H, W) and coords (N, Q, 2), "
                f"got {tuple(features.shape)} and {tuple(coords.shape)}."
            )
        table = features.movedim(1, -1).reshape(-1, features.shape[1])
        height, width = features.shape[-2:]

        def decode(items: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
            h_low, h_high, h_frac = linear_neighbours(points[:, 0], height)
            w_low, w_high, w_frac = linear_neighbours(points[:, 1], width)
            corners = [
                ((items * height + h) * width + w, h_weight * w_weight, torch.stack((h_offset, w_offset), dim=-1))
                for h, h_weight, h_offset in ((h_low, 1 - h_frac, h_frac), (h_high, h_frac, h_frac - 1))
                for w, w_weight, w_offset in ((w_low, 1 - w_frac, w_frac), (w_high, w_frac, w_frac - 1))
            ]
            values = table[torch.stack([index for index, _, _ in corners])]  # (4, P, 1 + C)
            weights = torch.stack([weight for _, weight, _ in corners])  # (4, P)
            offsets = torch.stack([offset for _, _, offset in corners])  # (4, P, 2)
            return (weights * (values[..., 0] + self.decoder(values[..., 1:], offsets))).sum(dim=0)

        return decode_in_chunks(decode, coords, self.chunk_size)

    def forward(
        self,
        corrupted: torch.Tensor,
        coarse: torch.Tensor,
        acceleration: float | torch.Tensor = 1.0,
        motion: float | torch.Tensor = 0.0,
        kspace: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Refined slices ``(N, 1, H, W)`` on the input grid (``kspace``/``mask`` shaped like the slices).

        Equals :meth:`query` at the pixel centres, decoded without the three zero-weight corners.
        """
        features = self.encode(corrupted, coarse, acceleration, motion, kspace, mask)
        table = features.movedim(1, -1).reshape(-1, features.shape[1])
        no_offset = table.new_zeros([1, 2])
        out = table.new_empty([table.shape[0]])
        for start in range(0, table.shape[0], self.chunk_size):
            rows = table[start : start + self.chunk_size]
            out[start : start + self.chunk_size] = rows[:, 0] + self.decoder(rows[:, 1:], no_offset)
        return out.view(corrupted.shape)

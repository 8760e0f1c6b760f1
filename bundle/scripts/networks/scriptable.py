"""TorchScript-compatible copies of the parts of MONAI's ``DiffusionModelUNet`` that ``torch.jit.script`` rejects.

MONAI 1.6.1's ``DiffusionModelUNet`` cannot be scripted as is: its forward takes ControlNet
residuals (``zip`` over an optional tuple), ``SpatialAttentionBlock`` unpacks a shape with ``*`` and
``WrappedUpsample`` calls ``super().forward``. :func:`scriptable_diffusion_unet` returns a deep copy
of a UNet in which exactly those three classes are replaced by the subclasses below, whose
``forward`` computes the same thing in TorchScript's subset of Python. Parameters, buffers and
state-dict keys are unchanged, and every other block is MONAI's own. Only what this bundle uses is
supported: no class labels, no cross-attention context, no ControlNet residuals.

Used by :meth:`scripts.networks.MotionAwareDiffusion.__prepare_scriptable__`, which
``torch.jit.script`` (and so ``python -m monai.bundle ckpt_export``) calls before compiling.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, WrappedUpsample, get_timestep_embedding


class ScriptableSpatialAttentionBlock(SpatialAttentionBlock):
    """``SpatialAttentionBlock`` with the ``b c h w -> b (h w) c`` reshape written without ``*`` unpacking."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.norm(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        x = self.attn(x)
        x = x.transpose(1, 2).reshape(residual.shape)
        return x + residual


class ScriptableWrappedUpsample(WrappedUpsample):
    """``WrappedUpsample`` (an ``nn.Sequential``) applying its layers in a loop instead of ``super().forward``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


class ScriptableDiffusionModelUNet(DiffusionModelUNet):
    """``DiffusionModelUNet.forward(x, timesteps)`` without class labels, context or ControlNet residuals."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        h = self.conv_in(x)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res_samples = block(hidden_states=h, temb=emb, context=None)
            for residual in res_samples:
                skips.append(residual)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        for block in self.up_blocks:
            split: int = -len(block.resnets)
            res_samples = skips[split:]
            skips = skips[:split]
            h = block(hidden_states=h, res_hidden_states_list=res_samples, temb=emb, context=None)
        return self.out(h)


_REPLACEMENTS = {
    DiffusionModelUNet: ScriptableDiffusionModelUNet,
    SpatialAttentionBlock: ScriptableSpatialAttentionBlock,
    WrappedUpsample: ScriptableWrappedUpsample,
}


def scriptable_diffusion_unet(unet: DiffusionModelUNet) -> DiffusionModelUNet:
    """A deep copy of ``unet`` that ``torch.jit.script`` compiles; ``unet`` itself is left untouched."""
    if unet.num_class_embeds is not None or unet.with_conditioning:
        raise ValueError("only unconditioned DiffusionModelUNets (no class labels, no context) can be scripted here.")
    twin = copy.deepcopy(unet)
    for module in twin.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return twin

"""The PR-INR stage networks and the pipeline composing them."""

from .detail import ImplicitDetailRestoration
from .diffusion import MotionAwareDiffusion
from .pipeline import PRINRPipeline
from .volume import VoxelContinuousINR, output_positions, output_size

__all__ = [
    "ImplicitDetailRestoration",
    "MotionAwareDiffusion",
    "PRINRPipeline",
    "VoxelContinuousINR",
    "output_positions",
    "output_size",
]

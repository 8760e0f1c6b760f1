"""The on-disk pools of stage-1 and stage-2 outputs that stages 2 and 3 train on.

Running the earlier stages on every iteration would dominate training on a CPU, so each stage
trains on a fixed pool of degraded samples whose earlier-stage outputs are computed once and cached
by MONAI's ``PersistentDataset``. A cached item is named by a hash of its datalist entry, and
:func:`pool_datalist` puts into every entry the volume, its degradation seed and
:func:`cache_key` (the frozen stages' weights and settings, and the sampling settings): retraining
an earlier stage or changing a setting gives new entries instead of stale ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import Dataset
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor
from torch import nn

from ..networks import PRINRPipeline

logger = logging.getLogger(__name__)


# Raised whenever what a pool item holds changes with the same weights and settings (2: declared-clean
# samples keep their slices through stages 1 and 2), so that older caches are not reused.
POOL_FORMAT = 2


def cache_key(networks: Sequence[nn.Module], settings: Mapping) -> str:
    """Hex digest of the networks' weights and reprs, the JSON of ``settings`` and :data:`POOL_FORMAT`.

    That is what a pool depends on; the repr holds settings that are not weights, such as the
    number of diffusion chains averaged.
    """
    digest = hashlib.sha256(f"pool format {POOL_FORMAT}".encode())
    for network in networks:
        digest.update(repr(network).encode())
        for name, tensor in sorted(network.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def pool_datalist(datalist: Sequence[Mapping], samples_per_volume: int, key: str) -> list[dict]:
    """``samples_per_volume`` entries per volume, each with its own degradation ``seed`` and the ``cache_key``."""
    if samples_per_volume < 1:
        raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}.")
    return [
        {**item, "seed": zlib.crc32(f"{Path(item['image']).name}|{i}".encode()), "cache_key": key}
        for item in datalist
        for i in range(samples_per_volume)
    ]


def fill_cache(dataset: Dataset) -> None:
    """Compute every pool item before training, in this process and under DDP once, on rank 0.

    The frozen stages may live on a GPU, which forked DataLoader workers cannot use, and two ranks
    must not write the same cache file.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        started = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
            logger.info("pool item %d/%d ready, %.1f s", index + 1, len(dataset), time.perf_counter() - started)
    if distributed:
        dist.barrier()


def _slicewise(function: Callable[..., torch.Tensor], stacks: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """Apply ``function`` to batches of slices of ``(C, H, W, S)`` stacks; return the ``(C, H, W, S)`` result.

    A stack of size 1 along S (a sampling mask) is passed whole to every batch.
    """
    as_slices = [convert_to_tensor(stack, track_meta=False).movedim(-1, 0) for stack in stacks]  # (S, C, H, W)
    num_slices = max(s.shape[0] for s in as_slices)
    outputs = [
        function(*(s if s.shape[0] == 1 else s[start : start + batch] for s in as_slices))
        for start in range(0, num_slices, batch)
    ]
    return torch.cat(outputs).movedim(0, -1)


class CoarseSlicesd(MapTransform):
    """Stage-1 output of the stack ``key`` into ``output_key``, by :meth:`PRINRPipeline.coarse_slices` as at inference.

    Sampling noise comes from a generator seeded with the item's ``seed``, so the output is fixed.
    """

    def __init__(self, keys: str, pipeline: PRINRPipeline, output_key: str = "coarse", slice_batch: int = 16) -> None:
        super().__init__(keys)
        self.pipeline = pipeline
        self.output_key = output_key
        self.slice_batch = slice_batch

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        device = next(self.pipeline.parameters()).device
        generator = torch.Generator().manual_seed(int(d["seed"]))

        def sample(corrupted: torch.Tensor) -> torch.Tensor:
            return self.pipeline.coarse_slices(corrupted.to(device), d["acceleration"], d["motion"], generator).cpu()

        for key in self.key_iterator(d):
            d[self.output_key] = _slicewise(sample, [d[key]], self.slice_batch)
        return d


class RefinedSlicesd(MapTransform):
    """Stage-2 output of the stack ``key`` into ``output_key``, by :meth:`PRINRPipeline.refined_slices` as at inference.

    Reads the stage-1 output from ``coarse_key`` and, with ``use_kspace``, the measured ``{key}_kspace`` /
    ``{key}_mask`` for data consistency. Without it the stage sees what inference from images sees
    (no k-space), which is what a pool for the later stage should hold.
    """

    def __init__(
        self,
        keys: str,
        pipeline: PRINRPipeline,
        coarse_key: str = "coarse",
        output_key: str = "refined",
        slice_batch: int = 16,
        use_kspace: bool = True,
    ) -> None:
        super().__init__(keys)
        self.pipeline = pipeline
        self.coarse_key = coarse_key
        self.output_key = output_key
        self.slice_batch = slice_batch
        self.use_kspace = use_kspace

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        device = next(self.pipeline.parameters()).device

        @torch.no_grad()
        def refine(corrupted: torch.Tensor, coarse: torch.Tensor, *measured: torch.Tensor) -> torch.Tensor:
            kspace, mask = (m.to(device) for m in measured) if measured else (None, None)
            refined = self.pipeline.refined_slices(
                corrupted.to(device), coarse.to(device), d["acceleration"], d["motion"], kspace, mask
            )
            return refined.cpu()

        for key in self.key_iterator(d):
            stacks = [d[key], d[self.coarse_key]]
            if self.use_kspace:
                stacks += [d[f"{key}_kspace"], d[f"{key}_mask"]]
            d[self.output_key] = _slicewise(refine, stacks, self.slice_batch)
        return d

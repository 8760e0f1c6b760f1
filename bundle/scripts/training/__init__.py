"""Progressive training of the three PR-INR stages with MONAI engines (configs ``train*.json``).

Run from the bundle root, in order (each stage writes its part of ``models/model.pt``, which the
next stage's cached pool is built from)::

    python -m monai.bundle run --config_file configs/train_stage1.json --dataset_dir /data
    python -m monai.bundle run --config_file configs/train_stage2.json --dataset_dir /data
    python -m monai.bundle run --config_file configs/train_stage3.json --dataset_dir /data
    python -m monai.bundle run --config_file configs/train.json --dataset_dir /data   # all three

``dataset_dir`` holds ``train/`` and ``val/`` NIfTI volumes; ``--datalist file.json`` (MONAI
datalist with ``training`` and ``validation``) replaces it. Rerunning a stage resumes from the
newest checkpoint in its ``ckpt_dir`` (``--resume False`` starts over, in an empty ``ckpt_dir``). Under ``torchrun`` add
``configs/multi_gpu_train.json`` to ``--config_file``.
"""

from ..flags import as_bool
from .cache import CoarseSlicesd, RefinedSlicesd, cache_key, fill_cache, pool_datalist
from .data import (
    AcquisitionParametersd,
    CropToOutputd,
    FixedRandomd,
    RandInPlaneCropd,
    RandSliceSamplesd,
    check_volume_file,
    kspace_dropout_prob,
    load_datalist,
)
from .engines import DiffusionIteration, DiffusionTrainingLoss, KeysPrepareBatch, PipelineInferer
from .handlers import ExportStageWeights
from .progressive import run_progressive
from .schedule import CosineDecayLR
from .weights import initial_weights, latest_checkpoint, load_stage, resume_checkpoint, write_stage

__all__ = [
    "AcquisitionParametersd",
    "CoarseSlicesd",
    "CosineDecayLR",
    "CropToOutputd",
    "DiffusionIteration",
    "DiffusionTrainingLoss",
    "ExportStageWeights",
    "FixedRandomd",
    "KeysPrepareBatch",
    "PipelineInferer",
    "RandInPlaneCropd",
    "RandSliceSamplesd",
    "RefinedSlicesd",
    "as_bool",
    "cache_key",
    "check_volume_file",
    "fill_cache",
    "initial_weights",
    "kspace_dropout_prob",
    "latest_checkpoint",
    "load_datalist",
    "load_stage",
    "pool_datalist",
    "resume_checkpoint",
    "run_progressive",
    "write_stage",
]

"""Pieces that adapt MONAI's SupervisedTrainer / SupervisedEvaluator to the PR-INR stages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import PrepareBatch, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from monai.utils import convert_to_tensor
from torch import nn

from ..networks import MotionAwareDiffusion, PRINRPipeline


class KeysPrepareBatch(PrepareBatch):
    """Network inputs from named batch entries, for stages whose inputs are more than one image.

    Returns ``(batch[image], batch[label], args, kwargs)`` as plain tensors on the device: ``args``
    from the keys ``args``, ``kwargs`` from the ``{argument: key}`` mapping ``kwargs``. Entries named
    in ``scalars`` are passed as one float for the whole batch (the ``scale`` that sets the size of a
    reconstruction), so the batch must agree on them.
    """

    def __init__(
        self,
        image: str = "image",
        label: str = "label",
        args: Sequence[str] = (),
        kwargs: Mapping[str, str] | None = None,
        scalars: Sequence[str] = (),
    ) -> None:
        self.image = image
        self.label = label
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.scalars = set(scalars)

    def _get(self, batch: Mapping, key: str, device, non_blocking: bool, **to_kwargs) -> Any:
        if key not in batch:
            raise KeyError(f"batch has no '{key}' entry; it has {sorted(batch)}.")
        value = convert_to_tensor(batch[key], track_meta=False)
        if key in self.scalars:
            if not torch.all(value == value.flatten()[0]):
                raise ValueError(f"'{key}' must agree across the batch, got {value.tolist()} (use batch_size 1).")
            return float(value.flatten()[0])
        return value.to(device, non_blocking=non_blocking, **to_kwargs)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **to_kwargs):
        def get(key: str) -> Any:
            return self._get(batchdata, key, device, non_blocking, **to_kwargs)

        args = tuple(get(key) for key in self.args)
        kwargs = {name: get(key) for name, key in self.kwargs.items()}
        return get(self.image), get(self.label), args, kwargs


class DiffusionTrainingLoss(nn.Module):
    """:meth:`MotionAwareDiffusion.training_loss` of ``(corrupted, clean, acceleration, motion)`` as ``forward``.

    DistributedDataParallel synchronises gradients only for computations that go through its
    ``forward``, so stage 1 trains this module rather than calling ``training_loss`` directly.
    """

    def __init__(self, model: MotionAwareDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, corrupted: torch.Tensor, clean: torch.Tensor, acceleration: torch.Tensor, motion: torch.Tensor
    ) -> torch.Tensor:
        return self.model.training_loss(clean, corrupted, acceleration, motion)


class DiffusionIteration:
    """Stage-1 ``iteration_update`` of a ``SupervisedTrainer`` whose ``network`` returns the loss.

    The network is a :class:`DiffusionTrainingLoss` (DDP-wrapped under ``torchrun``), called with the
    prepared ``(image, label, *args)``; the trainer's ``loss_function`` is not used. MONAI's default
    iteration cannot express this loss, which draws its own noise and timesteps. The iteration events
    are fired as in ``SupervisedTrainer._iteration`` so that handlers attach as usual.
    """

    def __call__(self, engine: SupervisedTrainer, batchdata: Mapping) -> dict:
        if engine.amp or engine.accumulation_steps > 1:
            raise ValueError("the stage-1 iteration supports neither amp nor gradient accumulation.")
        inputs, targets, args, kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss = engine.network(inputs, targets, *args, **kwargs)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class PipelineInferer(Inferer):
    """Reconstruct with :meth:`PRINRPipeline.reconstruct` and return the ``output`` stage (``"stage1"`` ...).

    Validation of stage ``k`` scores stage ``k``'s output, through the same code as inference.
    """

    def __init__(self, output: str = "stage3", seed: int = 0) -> None:
        if output not in ("stage1", "stage2", "stage3"):
            raise ValueError(f"output must be 'stage1', 'stage2' or 'stage3', got {output!r}.")
        self.output = output
        self.seed = seed

    def __call__(self, inputs: torch.Tensor, network: PRINRPipeline, *args: Any, **kwargs: Any) -> torch.Tensor:
        return network.reconstruct(inputs, *args, seed=self.seed, **kwargs)[self.output]

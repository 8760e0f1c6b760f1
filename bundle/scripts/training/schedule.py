"""Learning-rate schedule of the training configs."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class CosineDecayLR(LRScheduler):
    """Cosine decay of every base rate to 0 at epoch ``max_epochs``, stepped once per epoch.

    Unlike ``CosineAnnealingLR``, the rate is computed from the epoch alone and the checkpointed
    state leaves out the length: a run resumed with a larger ``max_epochs`` follows the cosine of
    its new length from the epoch it reached (``CosineAnnealingLR`` kept the old length, and its
    recursive update made the rate climb back up after it). Loading a state also sets the
    optimizer's rates to the schedule's, so the first resumed epoch already uses them; load the
    optimizer first (the configs' ``load_dict`` order).
    """

    def __init__(self, optimizer: Optimizer, max_epochs: int, last_epoch: int = -1) -> None:
        if int(max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        self.max_epochs = int(max_epochs)
        super().__init__(optimizer, last_epoch)

    def _rates(self) -> list[float]:
        progress = min(max(self.last_epoch, 0), self.max_epochs) / self.max_epochs
        return [base * 0.5 * (1.0 + math.cos(math.pi * progress)) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self._rates()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("max_epochs")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "max_epochs"})
        rates = self._rates()
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self._last_lr = rates

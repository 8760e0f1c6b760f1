"""Ignite handlers specific to progressive training."""

from __future__ import annotations

import os

from ignite.engine import Engine, Events
from torch import nn

from .weights import write_stage


class ExportStageWeights:
    """When training completes, write the stage's weights into the pipeline state dict ``model_path``.

    The next stage reads them from there, and inference loads the same file.
    """

    def __init__(self, model_path: str | os.PathLike, stage: str, network: nn.Module) -> None:
        self.model_path = model_path
        self.stage = stage
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        write_stage(self.model_path, self.stage, self.network)

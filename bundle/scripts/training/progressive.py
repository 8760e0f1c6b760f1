"""Progressive training (``configs/train.json``): the three stage configs run one after the other.

Each stage writes its weights into ``model.pt`` when it completes, and the next stage builds its
cached pool from them, so stage 2 trains on the outputs of the stage 1 just trained, and so on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from monai.bundle import run

logger = logging.getLogger(__name__)


def run_progressive(config_dir: str | os.PathLike, common: Mapping, stages: Sequence[Mapping]) -> None:
    """Run ``train_stage1.json`` ... in order with the ``common`` overrides plus each stage's own ``stages[k]``."""
    for number, overrides in enumerate(stages, start=1):
        config_file = os.path.join(config_dir, f"train_stage{number}.json")
        logger.info("progressive training: stage %d of %d (%s)", number, len(stages), config_file)
        run(config_file=config_file, **{**common, **overrides})

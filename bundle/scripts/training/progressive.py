"""Progressive training (``configs/train.json``): the three stage configs run one after the other.

Each stage config holds only what is its own and is merged over ``train_common.json`` (data
loading, degradation, engines, validation), as a user runs it:
``--config_file "['configs/train_common.json','configs/train_stage1.json']"``.

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
        config_files = [os.path.join(config_dir, name) for name in ("train_common.json", f"train_stage{number}.json")]
        logger.info("progressive training: stage %d of %d (%s)", number, len(stages), config_files[1])
        run(config_file=config_files, **{**common, **overrides})

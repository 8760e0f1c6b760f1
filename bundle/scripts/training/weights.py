"""Training checkpoints, and ``models/model.pt``: the plain ``PRINRPipeline`` state dict each stage writes its part of.

``model.pt`` is what inference loads and what the later stages read the earlier stages from, so
progressive training hands weights on through the same file a user ships.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..flags import as_bool
from ..networks import PRINRPipeline

logger = logging.getLogger(__name__)

STAGES = ("diffusion", "detail", "volume")


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (the PRINRPipeline attributes), got {stage!r}.")
    return stage


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint in ``ckpt_dir`` with the most trainer iterations; None when there is none.

    Read from the saved trainer state rather than the file names, which mix epochs and iterations.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    best, best_iteration = None, -1
    for path in sorted(folder.glob("*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise RuntimeError(f"cannot read checkpoint '{path}'; remove it or choose another ckpt_dir.") from error
        if not isinstance(state, dict) or "trainer" not in state:
            raise ValueError(f"'{path}' is not a training checkpoint (no trainer state); ckpt_dir holds only those.")
        if state["trainer"]["iteration"] > best_iteration:
            best, best_iteration = str(path), state["trainer"]["iteration"]
    return best


def resume_checkpoint(ckpt_dir: str | os.PathLike, resume: bool | str) -> str | None:
    """The checkpoint to resume from: the newest in ``ckpt_dir`` when ``resume``, else None.

    A fresh run refuses a ``ckpt_dir`` holding another run's checkpoints, which a later resume could
    mistake for its own.
    """
    latest = latest_checkpoint(ckpt_dir)
    if as_bool(resume, "resume") or latest is None:
        return latest
    raise FileExistsError(
        f"ckpt_dir '{ckpt_dir}' holds checkpoints of an earlier run (e.g. '{latest}'); resume it, "
        "or start over in another output_dir / ckpt_dir."
    )


def _stage_state(model_path: str | os.PathLike, stage: str) -> dict[str, torch.Tensor]:
    """The ``stage`` weights of the pipeline state dict ``model_path``, without the stage prefix."""
    prefix = f"{_check_stage(stage)}."
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"'{model_path}' not found: the {stage} stage must be trained first (its training config writes it)."
        )
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_stage(model_path: str | os.PathLike, stage: str, network: nn.Module, device="cpu") -> nn.Module:
    """``network`` with the ``stage`` weights of the pipeline state dict ``model_path``, frozen, in eval mode."""
    network.load_state_dict(_stage_state(model_path, stage))
    return network.to(device).eval().requires_grad_(False)


def with_new_input_channels(state: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with zero weights for the input channels ``network`` gained since it was saved.

    A convolution whose saved kernel has fewer input channels (dim 1) than ``network``'s and is
    otherwise the same shape gets zeros for the missing ones. Conditioning channels are appended
    after the image channels, so the network then computes exactly what the saved one did, and
    fine-tuning teaches it to use the new inputs (how stage 3 gained its (R, motion) maps).
    """
    current = network.state_dict()
    grown = dict(state)
    for name, saved in state.items():
        target = current.get(name)
        if target is None or target.ndim < 3 or saved.shape == target.shape:
            continue
        if (
            saved.shape[0] == target.shape[0]
            and saved.shape[2:] == target.shape[2:]
            and saved.shape[1] < target.shape[1]
        ):
            extra = saved.new_zeros((saved.shape[0], target.shape[1] - saved.shape[1], *saved.shape[2:]))
            grown[name] = torch.cat((saved, extra), dim=1)
            logger.warning("%s: %d input channels added with zero weights", name, extra.shape[1])
    return grown


def initial_weights(network: nn.Module, model_path: str | os.PathLike, stage: str, finetune: bool | str) -> nn.Module:
    """The stage network to train: fresh, or with ``finetune`` starting from the ``stage`` weights in ``model_path``.

    Fine-tuning accepts weights saved before the network gained input channels (see
    :func:`with_new_input_channels`).
    """
    if not as_bool(finetune, "finetune"):
        return network
    network.load_state_dict(with_new_input_channels(_stage_state(model_path, stage), network))
    return network.train().requires_grad_(True)


def write_stage(model_path: str | os.PathLike, stage: str, network: nn.Module) -> None:
    """Replace the ``stage`` weights of the pipeline state dict ``model_path`` by ``network``'s, atomically.

    Without an existing file the other stages start as an untrained ``PRINRPipeline()``.
    """
    prefix = f"{_check_stage(stage)}."
    path = Path(model_path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        logger.warning("%s not found: the stages other than %s are untrained in the new file", path, stage)
        state = PRINRPipeline().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    state.update({prefix + k: v.detach().cpu() for k, v in network.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".pt", dir=path.parent)
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info("wrote the %s stage into %s", stage, path)

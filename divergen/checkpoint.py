"""Weights on disk: safetensors files written atomically, read back with a clear report.

Layout of a training run (``engine.py`` writes it, ``evaluate.py`` reads it)::

    <output_dir>/checkpoints/<iteration:07d>/model.safetensors   the trained weights
    <output_dir>/checkpoints/<iteration:07d>/ema.safetensors     the EMA weights (evaluated by default)
    <output_dir>/checkpoints/<iteration:07d>/state/              Accelerate save_state, for --resume

A weights file holds the model's state dict under its official detectron2 names (centernet2.md §5) and string
metadata (``iteration``, the resolved ``config`` as JSON).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``path`` as safetensors, atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a checkpoint owns its tensors anyway.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_weights_path(path: str | os.PathLike, *, prefer_ema: bool = True) -> Path:
    """A weights file, or a checkpoint directory (its EMA file when present and ``prefer_ema``, else the model)."""
    path = Path(path)
    if path.is_dir():
        candidates = [EMA_FILE, MODEL_FILE] if prefer_ema else [MODEL_FILE, EMA_FILE]
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: checkpoint directory without {' or '.join(candidates)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors weights file, on the CPU."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: expected a .safetensors weights file; convert official detectron2 .pth/.pkl checkpoints first"
        )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, prefer_ema: bool = True
) -> dict[str, str]:
    """Load a weights file or checkpoint directory into ``model``; returns the file's metadata.

    With ``strict``, any missing or unexpected key is an error that lists them. Without it (e.g. backbone-only
    pretrained weights), the missing and unexpected keys are logged; a shape mismatch is always an error.
    """
    file = resolve_weights_path(path, prefer_ema=prefer_ema)
    state, metadata = read_weights(file)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"{file}: {len(mismatched)} tensors have the wrong shape:\n  " + "\n  ".join(mismatched[:20])
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{file}: {len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}"
        )
    model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning(
            "%s: %d keys missing (left as initialised), %d unexpected (ignored); e.g. %s %s",
            file,
            len(missing),
            len(unexpected),
            missing[:3],
            unexpected[:3],
        )
    logger.info("loaded %d tensors from %s", len(state), file)
    return metadata

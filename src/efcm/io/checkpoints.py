"""Model checkpoints: one atomic writer and one checked reader for every efcm model file
(students, CLAM, IB). A checkpoint is a dict with a `format` tag, loaded with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from efcm.io.files import atomic_path


def save_checkpoint(path: str | Path, fmt: str, content: dict[str, Any]) -> None:
    """torch.save({"format": fmt, **content}) under a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    torch.save({"format": fmt, **content}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """The checkpoint dict; ValueError naming the file when it is not a `fmt` checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path}: not an efcm {what} checkpoint ({fmt})")
    return ckpt

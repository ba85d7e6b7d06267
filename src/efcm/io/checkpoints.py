"""Model checkpoints: one atomic writer and one checked reader for every efcm model file
(students, CLAM, IB). A checkpoint is a dict with a `format` tag, loaded with weights_only."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from efcm.io.files import atomic_path

M = TypeVar("M", bound=torch.nn.Module)


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


def save_module(
    path: str | Path, fmt: str, model: Any, extra: dict[str, Any] | None = None
) -> None:
    """A module that describes itself (`model.config()`) with its weights, and `extra`."""
    save_checkpoint(
        path, fmt, {"config": model.config(), "state_dict": model.state_dict(), **(extra or {})}
    )


def load_module(path: str | Path, fmt: str, what: str, build: Callable[[dict[str, Any]], M]) -> M:
    """The module `save_module` wrote: `build(config)` with its weights, in eval mode; a config
    `build` refuses is a ValueError naming the file."""
    ckpt = load_checkpoint(path, fmt, what)
    try:
        model = build(ckpt["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a usable {what} config ({err})") from err
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()

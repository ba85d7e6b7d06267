"""The runtimes that serve a package: `torch` (the evaluated modules, on the GPU when there is
one), `onnx` (ONNX Runtime, FP32) and `int8` (ONNX Runtime, the student quantized statically to
INT8). One interface (`Runtime`): uint8 patch batches -> student features, a bag of features ->
class probabilities and attention; `efcm.inference` (the CLI and the predictor) runs whichever
`load_runtime` returns.

This module and `efcm.runtimes.onnx_runtime` import no torch: a CPU server built without torch
(`efcm serve --runtime int8`, the `serving-cpu` image) loads, verifies (`efcm.models.meta`) and
serves a package with numpy, OpenSlide, OpenCV and ONNX Runtime alone. `efcm.runtimes.
torch_runtime` is imported only when the torch runtime is asked for.

What each runtime is worth is measured at export, never assumed: `model.json["runtimes"]` lists
the runtimes the package carries, each with its parity figures against the torch FP32 model that
was evaluated (`efcm.training.export`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from efcm.errors import PackageError
from efcm.models.meta import read_package_meta
from efcm.runtimes.base import (
    AUTO,
    INT8,
    ONNX,
    RUNTIMES,
    TORCH,
    Runtime,
    cosine_rows,
    cpu_flags,
    has_vnni,
)

__all__ = [
    "AUTO",
    "INT8",
    "ONNX",
    "RUNTIMES",
    "TORCH",
    "Runtime",
    "carried",
    "cosine_rows",
    "cpu_flags",
    "has_vnni",
    "load_runtime",
    "resolve",
]

log = logging.getLogger(__name__)

# `auto` without torch installed: the fastest CPU runtime the package carries
CPU_PREFERENCE = (INT8, ONNX)


def carried(meta: dict[str, Any]) -> list[str]:
    """The runtimes a package can be served with: torch always (its modules are the package),
    then those `model.json["runtimes"]` lists with their files (older packages list none)."""
    listed = meta.get("runtimes", {})
    return [TORCH, *(r for r in (ONNX, INT8) if r in listed)]


def torch_installed() -> bool:
    """Whether torch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as none
        return False


def resolve(name: str, meta: dict[str, Any], *, where: str = "package") -> str:
    """The runtime `name` stands for: `auto` is torch where torch is installed (a GPU node, or
    the CUDA image), else the best CPU runtime the package carries (int8, then onnx).

    Raises:
        PackageError: the package does not carry `name`, or `auto` finds nothing to run.
    """
    have = carried(meta)
    if name == AUTO:
        if torch_installed():
            return TORCH
        for r in CPU_PREFERENCE:
            if r in have:
                return r
        raise PackageError(
            f"{where}: torch is not installed here and the package carries no ONNX runtime "
            f"(it has {have}): re-export it with export.runtimes, or serve it where torch is"
        )
    if name not in RUNTIMES:
        raise PackageError(f"unknown runtime {name!r}; expected one of {[AUTO, *RUNTIMES]}")
    if name not in have:
        raise PackageError(
            f"{where}: the package carries no {name!r} runtime (it has {have}); re-export it with "
            f"export.runtimes including {name!r}"
        )
    if name == TORCH and not torch_installed():
        raise PackageError(
            f"{where}: runtime 'torch' asked for, but torch is not installed here (a CPU image?); "
            f"use one of {[r for r in have if r != TORCH]}"
        )
    return name


def load_runtime(
    path: str | Path, name: str = AUTO, *, threads: int | None = None, verify: bool = True
) -> Runtime:
    """The package at `path` served by runtime `name` (see `resolve`); `threads`: the runtime's
    intra-op threads (None: its default, every core). Verifies the package first
    (`efcm.models.meta.read_package_meta`).

    Raises:
        PackageError: the package cannot be loaded, or does not carry that runtime.
    """
    path = Path(path)
    meta = read_package_meta(path, verify=verify)
    chosen = resolve(name, meta, where=str(path))
    if chosen == TORCH:
        from efcm.runtimes.torch_runtime import TorchRuntime

        return TorchRuntime.load(path, threads=threads, verify=False)
    from efcm.runtimes.onnx_runtime import OnnxRuntime

    return OnnxRuntime.load(path, meta, chosen, threads=threads)

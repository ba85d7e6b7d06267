"""What every runtime is (`Runtime`), and the CPU facts the runtimes and the export share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from efcm.limits import RUNTIME_CHOICES
from efcm.models.meta import PackageFacts

# the names the server's settings accept (efcm.limits, the base layer, holds the one list)
AUTO, TORCH, ONNX, INT8 = RUNTIME_CHOICES
RUNTIMES = (TORCH, ONNX, INT8)


class Runtime(ABC, PackageFacts):
    """A loaded package, ready to predict: `embed` (the student) and `head` (the CLAM ensemble).
    Both are safe to call from several threads at once."""

    name: str

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @abstractmethod
    def embed(
        self, batches: Iterable[np.ndarray], *, total: int | None = None, desc: str = "predict"
    ) -> np.ndarray:
        """uint8 (B, S, S, 3) batches -> their features, (N, feature_dim) float32."""

    @abstractmethod
    def head(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A checked bag (N, feature_dim) float32 -> (class probabilities (C,), attention (N,)),
        both float32."""

    def describe(self) -> dict[str, Any]:
        """What this runtime is, for logs and the server's metadata."""
        return {"runtime": self.name}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none), e.g. avx512_vnni."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether the CPU has VNNI (u8 x s8 dot products without saturation)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)

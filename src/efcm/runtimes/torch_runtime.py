"""The torch runtime: the package's modules as the evaluation loaded them
(`efcm.models.package.load_package`), the student on the GPU when there is one (channels_last,
autocast), the CLAM ensemble on the CPU (it is small).

On a CPU with native bfloat16 (AVX-512 BF16 or AMX), the student runs under bf16 autocast when
the package's export measured its parity (`model.json["runtimes"]["torch"]["bf16"]`: features and
slide probabilities against FP32, the thresholds of the INT8 runtime) and it held; otherwise FP32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efcm.features import embed_batches
from efcm.models.package import Package, load_package
from efcm.runtimes.base import TORCH, Runtime, cpu_flags

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (else bf16 autocast is slower than FP32)."""
    return bool(cpu_flags() & BF16_FLAGS)


class TorchRuntime(Runtime):
    """`package`'s student and CLAM ensemble as torch modules."""

    name = TORCH

    def __init__(
        self,
        package: Package,
        *,
        device: str | None = None,
        threads: int | None = None,
        cpu_bf16: bool | None = None,
    ) -> None:
        """`cpu_bf16`: None uses bf16 autocast on the CPU where the package's export measured
        its parity and it held, and the CPU has native bf16; False always runs FP32 (the
        evaluated model's arithmetic, e.g. to reproduce the evaluation exactly)."""
        super().__init__(package.path, package.meta)
        self.package = package
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = threads
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        package.encoder.to(self.device, memory_format=torch.channels_last)
        bf16 = package.meta.get("runtimes", {}).get(TORCH, {}).get("bf16", {})
        self.cpu_bf16 = (
            cpu_bf16 is not False
            and self.device.type == "cpu"
            and bool(bf16.get("passed"))
            and cpu_bf16_native()
        )

    @classmethod
    def load(cls, path: Path, *, threads: int | None = None, verify: bool = True) -> TorchRuntime:
        return cls(load_package(path, verify=verify), threads=threads)

    def embed(
        self, batches: Iterable[np.ndarray], *, total: int | None = None, desc: str = "predict"
    ) -> np.ndarray:
        def tensors() -> Iterator[torch.Tensor]:
            for b in batches:
                yield torch.from_numpy(np.ascontiguousarray(b))

        feats = embed_batches(
            self.package.encoder, tensors(), total=total, desc=desc, cpu_bf16=self.cpu_bf16
        )
        return feats if len(feats) else np.zeros((0, self.feature_dim), np.float32)

    def head(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = self.package.clam(torch.from_numpy(features))
        return (
            out["probs"][0].numpy().astype(np.float32),
            out["attention"].numpy().astype(np.float32),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": str(self.device),
            "autocast": "amp"
            if self.device.type == "cuda"
            else ("bf16" if self.cpu_bf16 else None),
            "threads": self.threads or torch.get_num_threads(),
            "torch": torch.__version__,
        }

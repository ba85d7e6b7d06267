"""ONNX Runtime on the CPU: the package's `student.onnx` (or `student_int8.onnx`) and
`clam.onnx`, without torch.

Both graphs take what the torch modules take: the student uint8 patches (B, S, S, 3), its input
transform (crop/resize, normalisation) inside the graph, and for an ETC package the k fold
students side by side; the head a bag (N, D) -> class probabilities (C,) and attention (N,), the
fold ensemble's mean inside the graph. So there is no second copy of that logic here.

One `InferenceSession` per graph serves every thread (`run` is thread-safe). Sessions run with
`threads` intra-op threads (see `efcm.limits.RuntimeSettings`), which sleep rather than spin
when idle, and one inter-op thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from efcm.errors import PackageError
from efcm.runtimes.base import Runtime

ENCODER_INPUT, ENCODER_OUTPUT = "patches", "features"
HEAD_INPUT, HEAD_OUTPUTS = "features", ("probabilities", "attention")


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    """A CPU session of the graph at `path`, `threads` intra-op threads (None: ORT's default)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: a slide request's reader threads then run
    # in the model's idle moments (between operators and batches) instead of fighting spinning
    # threads for the cores. Measured on 2 cores (benchmarks/serving.py): the same model-only
    # speed, and a slide's features step at 0.97 of it instead of 0.85 (INT8, 112 px).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own types (Fail, InvalidGraph, ...)
        raise PackageError(
            f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})"
        ) from None


class OnnxRuntime(Runtime):
    """The package's ONNX graphs (`name`: onnx or int8) on the CPU."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        name: str,
        encoder: Path,
        head: Path,
        *,
        threads: int | None = None,
    ) -> None:
        super().__init__(path, meta)
        self.name = name
        self.threads = threads
        self.files = (encoder.name, head.name)
        self.encoder = session(encoder, threads)
        self.head_session = session(head, threads)

    @classmethod
    def load(
        cls, path: Path, meta: dict[str, Any], name: str, *, threads: int | None = None
    ) -> OnnxRuntime:
        """Runtime `name` of the (verified) package at `path`, whose model.json is `meta`."""
        spec = meta["runtimes"][name]
        return cls(path, meta, name, path / spec["encoder"], path / spec["head"], threads=threads)

    def embed(
        self, batches: Iterable[np.ndarray], *, total: int | None = None, desc: str = "predict"
    ) -> np.ndarray:
        out = []
        bar = tqdm(total=total, desc=desc, unit="patch", disable=None, leave=False)
        for batch in batches:
            feats = self.encoder.run([ENCODER_OUTPUT], {ENCODER_INPUT: np.asarray(batch)})[0]
            out.append(feats)
            bar.update(len(batch))
        bar.close()
        if not out:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def head(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, attention = self.head_session.run(list(HEAD_OUTPUTS), {HEAD_INPUT: features})
        return probs.astype(np.float32, copy=False), attention.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": "cpu",
            "files": list(self.files),
            "threads": self.threads or "onnxruntime default",
            "onnxruntime": ort.__version__,
        }

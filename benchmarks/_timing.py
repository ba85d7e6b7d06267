"""Timing helpers the benchmarks share (they run as scripts: `import _timing` finds this file)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(
    model: torch.nn.Module, x: torch.Tensor, seconds: float, warmup: int
) -> tuple[float, float | None]:
    """(patches/s, peak CUDA memory MB or None): the device-resident batch `x` fed through
    `embed_batches` over and over for about `seconds`, after `warmup` batches."""
    from efcm.features import embed_batches  # here: mil.py measures its RSS without efcm loaded

    device = x.device
    embed_batches(model, [x] * warmup)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = 0

    def batches():
        nonlocal n
        t0 = time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            n += len(x)
            yield x  # embed_batches copies each output to the CPU: every step is synchronised

    t0 = time.perf_counter()
    embed_batches(model, batches())
    sync(device)
    rate = n / (time.perf_counter() - t0)
    peak = None
    if device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return rate, peak


def runtime_rate(rt: Any, batches: list[np.ndarray], warmup: int = 1) -> tuple[float, np.ndarray]:
    """(patches/s, features) of a runtime's `embed` (`efcm.runtimes.Runtime`: torch, onnx or
    int8) over uint8 batches already in memory: the model alone, no slide reading; after
    `warmup` of the batches (first-call allocations, ORT's arena, oneDNN's kernels)."""
    rt.embed(batches[:warmup], desc="warm-up")
    t0 = time.perf_counter()
    feats = rt.embed(batches, desc="model-only")
    return sum(len(b) for b in batches) / (time.perf_counter() - t0), feats


def uncached_patches(uri: str, coords: Any) -> Any:
    """A `SlidePatches` whose slide handles have no tile cache (every read decodes its tiles):
    random reads as a cohort-scale run sees them, where the cache almost never hits."""
    import openslide

    from efcm.slides.patches import SlidePatches

    class Uncached(SlidePatches):
        @property
        def slide(self) -> openslide.OpenSlide:
            fresh = self._slide is None or self._pid != os.getpid()
            handle = SlidePatches.slide.fget(self)
            if fresh:
                handle.set_cache(openslide.OpenSlideCache(0))
            return handle

    return Uncached(uri, coords)

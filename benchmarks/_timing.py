"""Timing helpers the benchmarks share (they run as scripts: `import _timing` finds this file)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: device, CPU model, cores, library versions, and the load
    average now (`loadavg_start`; a benchmark adds `loadavg_end` when it is done)."""
    import openslide

    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.processor()
    cuda = torch.cuda.is_available()
    out = {
        "device": "cuda" if cuda else "cpu",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openslide": openslide.__library_version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


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

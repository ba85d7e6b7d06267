"""What a model costs per patch: parameters, GFLOPs (torch's flop counter), patches/s, peak memory.

Teacher and student are measured in one run on the same device, so their ratio means something
even on
a shared, noisy machine. GFLOPs are real floating-point operations (2 per multiply-add).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_patch(model: nn.Module, input_size: int) -> float:
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 1e9


def throughput(
    model: nn.Module, input_size: int, batch_size: int, *, min_seconds: float = 1.0, warmup: int = 1
) -> float:
    """Model-only patches/s on in-memory tensors (autocast on CUDA)."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, input_size, input_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    amp = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
        for _ in range(warmup):
            model(x)
        if amp:
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds or n == 0:
            model(x)
            n += batch_size
        if amp:
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)


def profile(
    model: nn.Module, input_size: int, batch_size: int, *, min_seconds: float = 1.0
) -> dict[str, Any]:
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {
        "params": count_params(model),
        "gflops_per_patch": round(gflops_per_patch(model, input_size), 4),
        "patches_per_s": round(
            throughput(model, input_size, batch_size, min_seconds=min_seconds), 2
        ),
        "input_size": input_size,
        "batch_size": batch_size,
        "device": str(device),
    }
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def compare(
    teacher: nn.Module,
    teacher_size: int,
    student: nn.Module,
    student_size: int,
    batch_size: int,
    *,
    min_seconds: float = 1.0,
) -> dict[str, Any]:
    """Teacher and student profiles plus the student/teacher ratios, measured in one run."""
    t = profile(teacher, teacher_size, batch_size, min_seconds=min_seconds)
    s = profile(student, student_size, batch_size, min_seconds=min_seconds)
    return {
        "teacher": t,
        "student": s,
        "student_teacher_speedup": round(s["patches_per_s"] / t["patches_per_s"], 3),
        "param_ratio": round(t["params"] / s["params"], 3),
        "flop_ratio": round(t["gflops_per_patch"] / max(s["gflops_per_patch"], 1e-12), 3),
    }


# the student-vs-teacher ratios of a `compare` report, and how the reports word them
RATIOS = (
    ("student_teacher_speedup", "the patches/s"),
    ("param_ratio", "fewer parameters"),
    ("flop_ratio", "fewer GFLOPs per patch"),
)
# what one model input is: a patch of a slide, or (the image-level path) a whole image. The
# profile's keys keep the slide path's names (`gflops_per_patch`, `patches_per_s`); the reports
# name the unit they measure.
PLURAL = {"patch": "patches", "image": "images"}


def ratios(item: str = "patch") -> tuple[tuple[str, str], ...]:
    """RATIOS worded for the model input `item` (`patch`, or `image`)."""
    return tuple((k, w.replace("patches", PLURAL[item]).replace("patch", item)) for k, w in RATIOS)


def markdown_table(report: dict[str, Any], item: str = "patch") -> str:
    """`compare(...)` as a Markdown table (teacher and student rows) plus a line of ratios, per
    model input `item` (`patch`, or `image` for the image-level path).

    Peak memory is a column only where a profile has it (CUDA).
    """
    rows = [(name, report[name]) for name in ("teacher", "student") if name in report]
    memory = any("peak_memory_mb" in p for _, p in rows)
    head = ["model", "params", f"GFLOPs/{item}", f"{PLURAL[item]}/s", "input", "batch", "device"]
    if memory:
        head.append("peak memory (MB)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in rows:
        cells = [
            name,
            f"{p['params'] / 1e6:.2f} M",
            f"{p['gflops_per_patch']:.3f}",
            f"{p['patches_per_s']:.1f}",
            f"{p['input_size']} px",
            str(p["batch_size"]),
            str(p["device"]),
        ]
        if memory:
            cells.append(f"{p['peak_memory_mb']:.1f}" if "peak_memory_mb" in p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    said = [f"{report[key]}x {what}" for key, what in ratios(item) if key in report]
    if said:
        lines += ["", "Student vs teacher: " + ", ".join(said) + " (measured in one run)."]
    return "\n".join(lines) + "\n"

"""Benchmark of the extraction engine: model-only vs full-engine patches/s, teacher vs student.

For the teacher (`preset: brow`, ViT-B/16, a 224 crop of a 256 px patch) and the student
(`preset: resnet18`), both randomly initialised, on CUDA when there is one (else CPU):
  model_patches_per_s   the model alone, `EncoderWithTransform` (so the uint8 -> float transform
                        is included) fed one device-resident uint8 (B, 256, 256, 3) batch over and
                        over through `efcm.features.embed_batches` (the engine's own inference
                        path: inference_mode, autocast on CUDA, channels_last); warm-up excluded,
                        at least `--seconds` of timing
  engine_patches_per_s  the whole engine, `efcm.features.extract_slide(model, SlidePatches(...),
                        ExtractParams(batch_size, num_workers))`, reading real slide regions:
                        ../shared/data/wsi/CMU-1-Small-Region.svs patched with `PatchParams()`
                        (256 px at 0.5 um/px, ~45 patches), its coords repeated until the run
                        lasts about `--seconds` (a synthetic slide when the shared data is absent).
                        DataLoader worker start-up is included (the engine pays it per slide).
                        Measured for every `--workers` count; the best is reported.
  engine_model_ratio    engine / model patches/s (the worst of teacher and student at top level)
  student_teacher_speedup (model only) and student_teacher_speedup_engine
Note: repeating a small slide's coords lets OpenSlide's tile cache serve most reads (each worker
has its own 32 MiB cache); `--tile-cache off` makes every read decode its tiles again (a pessimistic
bound). Prints one JSON object. Usage:
  python benchmarks/extraction.py [--batch-size B] [--workers 0,2] [--seconds S] [--patches N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from _timing import model_only, sync, uncached_patches

from efcm.config import EncoderParams, ExtractParams, PatchParams
from efcm.evaluation.efficiency import count_params, gflops_per_patch
from efcm.features import extract_slide
from efcm.models.encoders import EncoderWithTransform, build_backbone
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
MODELS = {"teacher": "brow", "student": "resnet18"}
GOALS = {"engine_model_ratio_min": 0.9, "engine_model_ratio_applies_on": "cuda", "speedup_min": 8.0}


def _machine(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "openslide": openslide.__library_version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cudnn"] = torch.backends.cudnn.version()
        out["autocast_dtype"] = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return out


def _slide(tmp: Path, force_synthetic: bool) -> tuple[Path, CoordsFile, str]:
    """The slide to read, its coords (PatchParams() defaults) and where it came from."""
    if SHARED_SLIDE.is_file() and not force_synthetic:
        path, source = SHARED_SLIDE, "shared: CMU-1-Small-Region.svs"
    else:
        path = tmp / "synthetic.tif"
        write_slide(path, SlideSpec(4096, 4096, mpp=0.25, levels=3, tumour=True, seed=3))
        why = "forced (--synthetic)" if force_synthetic else f"{SHARED_SLIDE} is absent"
        source = f"synthetic 4096 px at 0.25 um/px: {why}"
    with open_slide(path) as s:
        plan = plan_patches(s, PatchParams(), name=path.stem)
    g = plan.geometry
    if len(plan.coords) == 0:
        raise SystemExit(f"{path}: no tissue patches with PatchParams() defaults")
    return (
        path,
        CoordsFile(plan.coords, g.patch_level, g.read_size, g.patch_size, path.stem),
        source,
    )


def _engine(
    model: torch.nn.Module,
    patches: SlidePatches,
    batch_size: int,
    workers: int,
) -> tuple[float, int]:
    """(patches/s, feature dim) of extract_slide over all of `patches`."""
    params = ExtractParams(batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    feats = extract_slide(model, patches, params)
    sync(next(model.parameters()).device)
    seconds = time.perf_counter() - t0
    if feats.shape[0] != len(patches) or not np.isfinite(feats).all():
        raise SystemExit(f"engine returned {feats.shape} features for {len(patches)} patches")
    return len(patches) / seconds, feats.shape[1]


def _bench_model(
    name: str,
    device: torch.device,
    coords: CoordsFile,
    slide: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec = EncoderParams(preset=MODELS[name])
    backbone, _ = build_backbone(spec, warn_random=False)
    model = EncoderWithTransform(backbone, spec).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    gflops = gflops_per_patch(backbone, spec.input_size)
    b = args.batch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, coords.patch_size, coords.patch_size, 3), generator=gen)
    x = x.to(torch.uint8).to(device)
    model_rate, peak = model_only(model, x, args.seconds, args.warmup)
    if args.patches:
        n = args.patches
    else:  # about `seconds` of engine time at the model's rate, at least `min_batches` batches
        n = max(args.min_batches * b, math.ceil(model_rate * args.seconds))
        n = min(math.ceil(n / b) * b, args.max_patches)
    tiled = CoordsFile(
        np.resize(coords.coords, (n, 2)),
        coords.patch_level,
        coords.read_size,
        coords.patch_size,
        coords.name,
    )
    cls = uncached_patches if args.tile_cache == "off" else SlidePatches
    runs = {}
    dim = None
    for w in args.workers:
        patches = cls(str(slide), tiled)
        rate, dim = _engine(model, patches, b, w)
        patches.close()
        runs[str(w)] = {
            "engine_patches_per_s": round(rate, 2),
            "engine_model_ratio": round(rate / model_rate, 3),
        }
    best = max(runs, key=lambda w: runs[w]["engine_patches_per_s"])
    out = {
        "preset": MODELS[name],
        "arch": spec.arch,
        "input_size": spec.input_size,
        "feature_dim": dim,
        "params": count_params(model),
        "gflops_per_patch": round(gflops, 4),
        "model_patches_per_s": round(model_rate, 2),
        "engine_patches_per_s": runs[best]["engine_patches_per_s"],
        "engine_model_ratio": runs[best]["engine_model_ratio"],
        "engine_workers": int(best),
        "engine_patches": n,
        "engine_by_workers": runs,
    }
    if peak is not None:
        out["peak_memory_mb"] = peak
    del model, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64 if cuda else 32)
    ap.add_argument(
        "--workers",
        default=str(min(8, cpus or 1)) if cuda else "0,2",
        help="comma-separated DataLoader worker counts to measure; the best is reported "
        "(default: min(8, cpus) on CUDA, '0,2' on CPU)",
    )
    ap.add_argument("--seconds", type=float, default=10.0 if cuda else 5.0, help="min timing")
    ap.add_argument("--warmup", type=int, default=3 if cuda else 1, help="model warm-up batches")
    ap.add_argument("--patches", type=int, default=0, help="engine patches (0: from --seconds)")
    ap.add_argument("--min-batches", type=int, default=3, help="engine batches at the least")
    ap.add_argument("--max-patches", type=int, default=50_000)
    ap.add_argument("--tile-cache", choices=("default", "off"), default="default")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic slide even so")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with CUDA")
    args = ap.parse_args()
    args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    device = torch.device("cuda" if cuda and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efcm-bench-extract-") as tmp:
        slide, coords, source = _slide(Path(tmp), args.synthetic)
        models = {name: _bench_model(name, device, coords, slide, args) for name in MODELS}
    t, s = models["teacher"], models["student"]
    ratio = min(t["engine_model_ratio"], s["engine_model_ratio"])
    speedup = s["model_patches_per_s"] / t["model_patches_per_s"]
    speedup_engine = s["engine_patches_per_s"] / t["engine_patches_per_s"]
    result = {
        "benchmark": "extraction",
        "machine": _machine(device),
        "data": {
            "source": source,
            "unique_patches": len(coords.coords),
            "patch_size": coords.patch_size,
            "read_size": coords.read_size,
            "patch_level": coords.patch_level,
            "tile_cache": args.tile_cache,
        },
        "batch_size": args.batch_size,
        "workers_measured": args.workers,
        "min_seconds": args.seconds,
        "student_teacher_speedup": round(speedup, 3),
        "student_teacher_speedup_engine": round(speedup_engine, 3),
        "engine_model_ratio": ratio,
        "param_ratio": round(t["params"] / s["params"], 3),
        "flop_ratio": round(t["gflops_per_patch"] / s["gflops_per_patch"], 3),
        "goals": GOALS,
        "goals_met": {
            "engine_model_ratio": ratio >= GOALS["engine_model_ratio_min"]
            if device.type == "cuda"
            else None,
            "speedup": speedup >= GOALS["speedup_min"],
            "speedup_engine": speedup_engine >= GOALS["speedup_min"],
        },
        "models": models,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

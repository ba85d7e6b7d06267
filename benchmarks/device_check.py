"""Device check: every CUDA path of the project, once, in a bounded time; one JSON object.

Meant for a single unattended run on a GPU machine (default budget 7 minutes) and, with `--tiny`,
for the test suite on the CPU (tests/integration/test_device_check.py), so it keeps working. It
calls the project's own code paths with random weights (nothing is downloaded); where a path
cannot run on the device as written, the section says so in `not_supported` instead of working
around it.

Robustness: every section runs in its own try/except (a failure is recorded with its error and
the tail of its traceback, and the next section runs); once `--budget-s` is spent the remaining
sections are recorded as skipped; the result is written to `--out` after every section (so a
killed run leaves what it measured), and a watchdog at `--hard-limit-s` writes and prints what
there is, marks the section still running as timed out, and exits with status 3. `--device cuda`
on a machine where torch sees no CUDA device writes the environment (with `cuda_error`, the
driver's reason) and exits with status 2, rather than falling back to the CPU: pass it on the GPU
machine. Otherwise the exit status is 0, whatever the sections found: read `summary`.

Top-level keys:
  benchmark, scale ("full" or "tiny"), device, budget_s, status ("complete", or "partial: running
  <section>" in a file flushed mid-run), total_s
  environment   torch, torch.version.cuda, cudnn, timm, openslide, python, cpu_count, cpus_usable,
                torch_threads, cudnn_benchmark (the project leaves it off), and on CUDA gpu (name),
                capability, total_memory_mb, bf16_supported (autocast dtype: bfloat16 if so, else
                float16)
  sizes         the sizes used (models, patch geometry, batch sizes, steps, bag sizes)
  sections      one record per section (below); every record has ok (true, false, or null when
                skipped), seconds, and on failure error ("<type>: <message>") and traceback_tail,
                or when skipped `skipped`
  summary       ok / failed / skipped section names, not_supported (path -> reason, from any
                section), and the headline figures (null where their section did not run):
                student_teacher_speedup_model, student_teacher_speedup_engine, engine_model_ratio
                (worst of teacher and student), etc_peak_memory_mb, etc_fits_16gb,
                slide_speedup_features (per slide: teacher / student seconds of the features step)
Peak memory (`peak_memory_mb`) is `torch.cuda.max_memory_allocated`, reset per section (or per
run where a section has several); null on the CPU. Rates are `*_per_s`; times exclude warm-up.

Sections (the code path each calls is named):
  extraction_teacher, extraction_student  the teacher (`brow`: ViT-B/16, 256 px read, 224 crop)
                and the student (VFD `resnet18` @ 224, projecting to the teacher's width), built
                as `efcm.stages.extract` builds them (`EncoderWithTransform`, channels_last, on the
                device); model_patches_per_s: `efcm.features.embed_batches` (inference_mode,
                autocast on CUDA) on one device-resident uint8 batch, repeated for
                `model_seconds`; engine_patches_per_s: `efcm.features.extract_slide` (DataLoader
                workers, pinned memory on CUDA) over the synthetic slide's coords repeated to
                `engine_patches`; engine_model_ratio; weights_channels_last; autocast_dtype;
                params; feature_dim; peak_memory_mb
  dataloader    `extract_slide` with the student for each worker count in `workers`
                (pin_memory on CUDA, as the engine sets it): by_workers.<n>.loader_patches_per_s
                (a near-free probe model: the DataLoader, the pinned copy and the transfer alone)
                and engine_patches_per_s (the student); best_workers
  distill_vfd, distill_fpd, distill_mcm  `efcm.training.distill.Trainee` with its optimiser
                (`_Optimiser.build`: AdamW, GradScaler when fp16, autocast when `distill.amp` on
                CUDA) stepped by `_train_epoch` (the stage's DataLoader, workers, pinned memory)
                over `PairDataset` / `WindowDataset` on the synthetic slide with random teacher
                targets: one warm-up step, then `distill_steps` timed steps: steps_per_s,
                patches_per_s (MCM: window x window patches per item), loss (must be finite),
                amp, amp_dtype, grad_scaler, trainable_params, model_channels_last,
                peak_memory_mb
  etc           ETC as `efcm.training.strategies.etc` runs a fold: `efcm.training.ib.train_ib` on
                random teacher-width bags of `ib_instances`, `write_top_k` / `read_top_k` (K =
                `etc_k`), then `train_etc_fold` (chunked gradient checkpointing, early stages and
                BatchNorm frozen, AdamW, autocast on CUDA) on those K-patch bags of the slide at
                the student's input size; one warm-up bag, then `etc_steps` timed bags:
                steps_per_s, patches_per_s, peak_memory_mb, fits_16gb; ib.{seconds, device,
                not_supported}
  clam          `efcm.training.mil.train_fold` (the train-mil and Retrain CLAM stages' CLAM
                training) on random bags of `clam_instances` x `clam_dim`: steps_per_s,
                instances_per_s, ran_on; not_supported on CUDA (see there)
  slide_request `efcm.inference.predict_slide` (the predictor's slide path, heatmap on) with a
                real package (`tests.packages.build_package` + `efcm.models.package.load_package`,
                its encoder moved to the device as `efcm.serving.model` does) for the student and
                for the teacher packaged in its place, on the synthetic slide and on
                ../shared/data/wsi/CMU-1-Small-Region.svs when present; one warm-up request per
                package; per slide and encoder: patches, timings (predict_slide's seconds per
                step), total_s, features_patches_per_s, peak_memory_mb; speedup_features

Usage:
  python benchmarks/device_check.py [--device cuda|cpu] [--tiny] [--budget-s 420]
                                    [--hard-limit-s 460] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import timm
import torch
from _timing import model_only, sync
from torch import nn
from torch.utils.data import Subset

from efcm.config import (
    DistillParams,
    EncoderParams,
    EtcParams,
    ExtractParams,
    IbParams,
    McmParams,
    MilParams,
    Params,
    PatchParams,
    TrainMilParams,
)
from efcm.features import extract_slide
from efcm.inference import predict_slide
from efcm.models.encoders import EncoderWithTransform, build_backbone, create_timm, feature_dim
from efcm.models.package import load_package
from efcm.models.students import build_vfd
from efcm.runtimes.torch_runtime import TorchRuntime
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide
from efcm.training.distill import PairDataset, Trainee, WindowDataset, _Optimiser, _train_epoch
from efcm.training.ib import read_top_k, train_ib, write_top_k
from efcm.training.mil import train_fold
from efcm.training.strategies import train_etc_fold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.packages (the package builder the benchmarks share)
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
SEED = 0
GIB16_MB = 16 * 1024

NOT_ON_CUDA = {
    "clam": (
        "efcm.training.mil.train_fold has no device argument: it builds the CLAM on the CPU and "
        "makes its targets as CPU tensors, so CLAM training (train-mil, Retrain CLAM, and the "
        "CLAM ETC trains after re-extraction) always runs on the CPU"
    ),
    "ib": (
        "efcm.training.ib.train_ib has no device argument: the IB head trains on the CPU (its "
        "targets are CPU tensors)"
    ),
}


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: `full` for the GPU machine, `tiny` for the test suite's CPU."""

    scale: str
    teacher: dict[str, Any]  # EncoderParams
    student: dict[str, Any]
    patch: dict[str, Any]  # PatchParams
    slide_side: int  # synthetic slide, level-0 px (square)
    slide_mpp: float
    extract_batch: int
    model_seconds: float  # least timing of the model-only loop (at least one batch)
    warmup_batches: int
    engine_patches: int
    engine_workers: int
    workers: tuple[int, ...]
    loader_patches: int
    distill_batch: int
    distill_steps: int
    distill_workers: int
    mcm_window: int
    etc_k: int
    etc_steps: int
    ib_instances: int
    ib_epochs: int
    clam_bags: int
    clam_instances: int
    clam_dim: int
    clam_epochs: int
    package_dim: int
    package_folds: int
    package_clam: dict[str, Any] | None = field(default=None)  # None: tests.packages.SMALL_CLAM


def full_sizes(cpus: int) -> Sizes:
    workers = min(8, cpus)
    return Sizes(
        scale="full",
        teacher={"preset": "brow"},
        student={"preset": "resnet18"},
        patch={},  # PatchParams(): 256 px at 0.5 um/px
        slide_side=8192,
        slide_mpp=0.5,
        extract_batch=128,
        model_seconds=4.0,
        warmup_batches=3,
        engine_patches=4096,
        engine_workers=workers,
        workers=tuple(sorted({0, min(4, cpus), workers, min(16, cpus)})),
        loader_patches=2048,
        distill_batch=DistillParams().batch_size,
        distill_steps=4,
        distill_workers=workers,
        mcm_window=McmParams().window,
        etc_k=IbParams().k,
        etc_steps=3,
        ib_instances=2000,
        ib_epochs=IbParams().epochs,
        clam_bags=10,
        clam_instances=2000,
        clam_dim=512,
        clam_epochs=3,
        package_dim=512,
        package_folds=TrainMilParams().folds,
        package_clam={},  # CLAM-SB at its default size
    )


def tiny_sizes() -> Sizes:
    return Sizes(
        scale="tiny",
        teacher={"arch": "test_vit", "input_size": 64, "model_kwargs": {"img_size": 64}},
        student={"arch": "test_resnet", "input_size": 64},
        patch={"target_mpp": 1.0, "patch_size": 64, "step": 64},
        slide_side=2048,
        slide_mpp=0.5,
        extract_batch=8,
        model_seconds=0.0,
        warmup_batches=1,
        engine_patches=16,
        engine_workers=0,
        workers=(0, 2),
        loader_patches=16,
        distill_batch=4,
        distill_steps=1,
        distill_workers=0,
        mcm_window=2,
        etc_k=16,
        etc_steps=1,
        ib_instances=64,
        ib_epochs=2,
        clam_bags=4,
        clam_instances=32,
        clam_dim=16,
        clam_epochs=1,
        package_dim=16,
        package_folds=2,
    )


# -- helpers --------------------------------------------------------------------------------------


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return _r(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _free(device: torch.device) -> str | None:
    """Release a section's memory; returns the error if that fails (a broken CUDA context), which
    the next section will meet too, rather than raising between sections."""
    gc.collect()
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:500]}"
    return None


def _autocast_dtype(device: torch.device) -> str | None:
    """The dtype the project's autocast uses on this device (bfloat16 where supported)."""
    if device.type != "cuda":
        return None
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _channels_last(model: nn.Module) -> bool | None:
    """Whether every 4-D weight is channels_last (None: the model has no 4-D weight)."""
    conv = [p for p in model.parameters() if p.ndim == 4]
    if not conv:
        return None
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)


def _tiled(coords: CoordsFile, n: int) -> CoordsFile:
    """`coords` repeated to `n` rows (same geometry; not a grid any more)."""
    return CoordsFile(
        np.resize(coords.coords, (n, 2)),
        coords.patch_level,
        coords.read_size,
        coords.patch_size,
        coords.name,
    )


class Context:
    """What the sections share: device, sizes, a work folder and the synthetic slide (made on
    first use; a failure to make it is raised again in every section that needs it)."""

    def __init__(self, device: torch.device, sizes: Sizes, work: Path) -> None:
        self.device, self.sizes, self.work = device, sizes, work
        self.teacher = EncoderParams(**sizes.teacher)
        self.student = EncoderParams(**sizes.student)
        self.patch = PatchParams(**sizes.patch)
        self._slide: tuple[Path, CoordsFile] | BaseException | None = None
        self._teacher_dim: int | None = None

    @property
    def teacher_dim(self) -> int:
        if self._teacher_dim is None:
            with torch.device("meta"):  # the width only: no memory, no init
                self._teacher_dim = feature_dim(
                    create_timm(self.teacher.arch, **self.teacher.model_kwargs)
                )
        return self._teacher_dim

    def slide(self) -> tuple[Path, CoordsFile]:
        """The synthetic slide and its patch grid (the packaged patch settings)."""
        if self._slide is None:
            try:
                s = self.sizes
                path = self.work / "synthetic.tif"
                write_slide(path, SlideSpec(s.slide_side, s.slide_side, mpp=s.slide_mpp, seed=3))
                with open_slide(path) as sl:
                    plan = plan_patches(sl, self.patch, name=path.stem)
                if len(plan.coords) == 0:
                    raise ValueError(f"{path}: no tissue patches with {self.patch}")
                g = plan.geometry
                coords = CoordsFile(
                    plan.coords,
                    g.patch_level,
                    g.read_size,
                    g.patch_size,
                    path.stem,
                    g.step0,
                    g.size0,
                )
                self._slide = (path, coords)
            except Exception as err:
                self._slide = err
        if isinstance(self._slide, BaseException):
            raise self._slide
        return self._slide


# -- extraction -----------------------------------------------------------------------------------


def _encoder(ctx: Context, which: str) -> tuple[nn.Module, EncoderParams]:
    """The teacher, or a VFD student, as `efcm.stages.extract` builds it: uint8 patches in,
    channels_last, on the device, eval mode."""
    torch.manual_seed(SEED)
    if which == "teacher":
        net, spec = build_backbone(ctx.teacher, warn_random=False)[0], ctx.teacher
    else:
        net, spec = build_vfd(ctx.student, ctx.teacher_dim, warn_random=False), ctx.student
    model = EncoderWithTransform(net, spec).to(memory_format=torch.channels_last)
    return model.to(ctx.device).eval(), spec


def _engine(model: nn.Module, slide: Path, coords: CoordsFile, batch: int, workers: int) -> float:
    """Patches/s of `extract_slide` over every patch of `coords` (worker start-up included)."""
    patches = SlidePatches(str(slide), coords)
    try:
        t0 = time.perf_counter()
        feats = extract_slide(model, patches, ExtractParams(batch_size=batch, num_workers=workers))
        sync(next(model.parameters()).device)
        seconds = time.perf_counter() - t0
    finally:
        patches.close()
    if feats.shape[0] != len(coords.coords) or not np.isfinite(feats).all():
        raise RuntimeError(f"extract_slide gave {feats.shape} (finite: {np.isfinite(feats).all()})")
    return len(coords.coords) / seconds


def extraction(ctx: Context, which: str) -> dict[str, Any]:
    s, dev = ctx.sizes, ctx.device
    slide, coords = ctx.slide()
    model, spec = _encoder(ctx, which)
    gen = torch.Generator().manual_seed(SEED)
    size = coords.patch_size
    x = torch.randint(0, 256, (s.extract_batch, size, size, 3), generator=gen, dtype=torch.uint8)
    x = x.to(dev)
    _reset_peak(dev)
    model_rate, peak_model = model_only(model, x, s.model_seconds, s.warmup_batches)
    engine_rate = _engine(
        model, slide, _tiled(coords, s.engine_patches), s.extract_batch, s.engine_workers
    )
    return {
        "arch": spec.arch,
        "input_size": spec.input_size,
        "patch_size": size,
        "feature_dim": feature_dim(model.encoder),
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": s.extract_batch,
        "autocast_dtype": _autocast_dtype(dev),
        "weights_channels_last": _channels_last(model),
        "model_patches_per_s": _r(model_rate, 2),
        "engine_patches_per_s": _r(engine_rate, 2),
        "engine_model_ratio": _r(engine_rate / model_rate),
        "engine_patches": s.engine_patches,
        "engine_workers": s.engine_workers,
        "pin_memory": dev.type == "cuda",
        "peak_memory_mb": peak_model,
        "peak_memory_engine_mb": _peak_mb(dev),
    }


class _Probe(nn.Module):
    """A near-free 'encoder' (a mean over the pixels) for the loader-only rate: with it,
    `extract_slide` times its DataLoader, the pinned copy and the transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((1, 2)) * self.scale  # (B, S, S, 3) uint8 -> (B, 3)


def dataloader(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.sizes, ctx.device
    slide, coords = ctx.slide()
    tiled = _tiled(coords, s.loader_patches)
    model, _ = _encoder(ctx, "student")
    probe = _Probe().to(dev).eval()
    runs = {}
    for w in s.workers:
        runs[str(w)] = {
            "loader_patches_per_s": _r(_engine(probe, slide, tiled, s.extract_batch, w), 2),
            "engine_patches_per_s": _r(_engine(model, slide, tiled, s.extract_batch, w), 2),
        }
    best = max(runs, key=lambda w: runs[w]["engine_patches_per_s"])
    return {
        "model": "student",
        "patches": s.loader_patches,
        "batch_size": s.extract_batch,
        "pin_memory": dev.type == "cuda",
        "by_workers": runs,
        "best_workers": int(best),
        "peak_memory_mb": _peak_mb(dev),
    }


# -- distillation ---------------------------------------------------------------------------------


def distill(ctx: Context, method: str) -> dict[str, Any]:
    s, dev = ctx.sizes, ctx.device
    slide, coords = ctx.slide()
    cfg = DistillParams(
        method=method,
        epochs=1,
        batch_size=s.distill_batch,
        num_workers=s.distill_workers,
        mcm=McmParams(window=s.mcm_window),
    )
    params = Params(seed=SEED, student=ctx.student, distill=cfg)
    torch.manual_seed(SEED)
    model = Trainee(params, ctx.teacher_dim)
    rng = np.random.default_rng(SEED)
    targets = rng.normal(size=(len(coords.coords), ctx.teacher_dim)).astype(np.float32)
    t = torch.from_numpy(targets)
    model.set_target_stats(t.mean(0), t.std(0))
    model.to(dev)

    patches = SlidePatches(str(slide), coords)
    need = (1 + s.distill_steps) * s.distill_batch  # items: one warm-up step, then timed steps
    per_item = cfg.mcm.window**2 if method == "mcm" else 1

    def dataset(copies: int):
        # the one slide listed `copies` times: enough items without a larger slide
        if method == "mcm":
            return WindowDataset(
                [patches] * copies, [targets] * copies, cfg.mcm.window, cfg.mcm.min_valid
            )
        return PairDataset([patches] * copies, [targets] * copies)

    one = len(dataset(1))
    if one == 0:
        raise ValueError(f"{method}: the synthetic slide gives no training items")
    data = dataset(math.ceil(need / one))
    b = s.distill_batch
    warm, timed = Subset(data, range(b)), Subset(data, range(b, need))
    optim = _Optimiser.build(model, cfg, len(timed), dev)
    try:
        _train_epoch(model, warm, optim, cfg, SEED, 0, dev)
        _reset_peak(dev)
        t0 = time.perf_counter()
        loss = _train_epoch(model, timed, optim, cfg, SEED, 1, dev)
        sync(dev)
        seconds = time.perf_counter() - t0
    finally:
        patches.close()
    if not math.isfinite(loss):
        raise FloatingPointError(f"distill {method}: non-finite training loss {loss}")
    return {
        "batch_size": b,
        "patches_per_item": per_item,
        "steps": s.distill_steps,
        "workers": s.distill_workers,
        "steps_per_s": _r(s.distill_steps / seconds),
        "patches_per_s": _r(s.distill_steps * b * per_item / seconds, 2),
        "loss": _r(loss, 5),
        "amp": optim.amp,
        "amp_dtype": str(optim.amp_dtype).removeprefix("torch.") if optim.amp else None,
        "grad_scaler": optim.scaler.is_enabled(),
        "trainable_params": sum(p.numel() for p in model.trainable()),
        "model_channels_last": _channels_last(model.student),
        "peak_memory_mb": _peak_mb(dev),
    }


# -- ETC, CLAM ------------------------------------------------------------------------------------


def _bags(
    ids: list[str], labels: dict[str, int], n: int, dim: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random bags (n, dim) with a class-dependent shift (so training has something to learn)."""
    rng = np.random.default_rng(seed)
    return {
        sid: torch.from_numpy((rng.normal(size=(n, dim)) + 0.5 * labels[sid]).astype(np.float32))
        for sid in ids
    }


def etc(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.sizes, ctx.device
    slide, coords = ctx.slide()
    params = Params(
        seed=SEED,
        student=ctx.student,
        ib=IbParams(k=s.etc_k, epochs=s.ib_epochs),
        mil=MilParams(etc=EtcParams(epochs=1)),
    )
    ids = [f"etc_{i}" for i in range(1 + s.etc_steps)]  # one warm-up bag, then the timed ones
    labels = {sid: i % 2 for i, sid in enumerate(ids)}
    tiled = _tiled(coords, s.ib_instances)  # one grid row per instance of the random bags
    teacher_bags = _bags(ids, labels, s.ib_instances, ctx.teacher_dim, SEED)

    t0 = time.perf_counter()
    head = train_ib(teacher_bags, labels, ids, 2, params.ib, SEED)
    topk = {}
    for sid in ids:  # as `etc` does: written to fold_<k>/topk/, read back
        path = write_top_k(head, sid, teacher_bags[sid], tiled.coords, ctx.work / "etc", s.etc_k)
        topk[sid] = read_top_k(path)[0]
    ib_seconds = time.perf_counter() - t0

    patches = SlidePatches(str(slide), tiled)
    slides = dict.fromkeys(ids, patches)
    torch.manual_seed(SEED)
    student = build_vfd(ctx.student, ctx.teacher_dim, warn_random=False).eval()
    try:
        train_etc_fold(student, ctx.student, slides, topk, labels, ids[:1], params, SEED, dev)
        _reset_peak(dev)
        t0 = time.perf_counter()
        train_etc_fold(student, ctx.student, slides, topk, labels, ids[1:], params, SEED, dev)
        sync(dev)
        seconds = time.perf_counter() - t0
    finally:
        patches.close()
    peak = _peak_mb(dev)
    ib: dict[str, Any] = {
        "instances": s.ib_instances,
        "dim": ctx.teacher_dim,
        "epochs": s.ib_epochs,
        "bags": len(ids),
        "seconds": _r(ib_seconds),
        "device": "cpu",
    }
    if dev.type == "cuda":
        ib["not_supported"] = NOT_ON_CUDA["ib"]
    cfg = params.mil.etc
    return {
        "bag_patches": len(topk[ids[-1]]),
        "input_size": ctx.student.input_size,
        "patch_size": coords.patch_size,
        "chunk": cfg.chunk,
        "freeze_stages": cfg.freeze_stages,
        "steps": s.etc_steps,
        "steps_per_s": _r(s.etc_steps / seconds),
        "patches_per_s": _r(s.etc_steps * len(topk[ids[-1]]) / seconds, 2),
        "autocast_dtype": _autocast_dtype(dev),
        "peak_memory_mb": peak,
        "fits_16gb": None if peak is None else peak < GIB16_MB,
        "ib": ib,
    }


def clam(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ids = [f"bag_{i}" for i in range(s.clam_bags)]
    labels = {sid: i % 2 for i, sid in enumerate(ids)}
    n_val = max(1, s.clam_bags // 5)
    train, val = ids[n_val:], ids[:n_val]
    bags = _bags(ids, labels, s.clam_instances, s.clam_dim, SEED + 1)
    cfg = TrainMilParams(epochs=s.clam_epochs, min_epochs=0, patience=s.clam_epochs)
    t0 = time.perf_counter()
    model, info = train_fold(bags, labels, train, val, 2, cfg, SEED)
    seconds = time.perf_counter() - t0
    steps = len(info["history"]) * len(train)
    out: dict[str, Any] = {
        "model": cfg.model,
        "bag": [s.clam_instances, s.clam_dim],
        "train_bags": len(train),
        "val_bags": len(val),
        "epochs": len(info["history"]),
        "steps_per_s": _r(steps / seconds, 2),
        "instances_per_s": _r(steps * s.clam_instances / seconds, 1),
        "ran_on": str(next(model.parameters()).device),
        "peak_memory_mb": None,  # the CPU
    }
    if not math.isfinite(info["best_val_loss"]):
        raise FloatingPointError(f"CLAM: non-finite validation loss {info['best_val_loss']}")
    if ctx.device.type == "cuda":
        out["not_supported"] = NOT_ON_CUDA["clam"]
    return out


# -- slide request --------------------------------------------------------------------------------


def _package(ctx: Context, name: str, encoder: EncoderParams):
    """A real Retrain-CLAM package with `encoder` as its student, loaded, its encoder on the
    device (as `efcm.serving.model.EfcmModel.load` does on CUDA)."""
    from tests import packages

    s = ctx.sizes
    params = Params(seed=SEED, patch=ctx.patch, student=encoder)
    path = packages.build_package(
        ctx.work / f"package_{name}",
        params,
        s.package_dim,
        strategy="retrain",
        folds=s.package_folds,
        clam=s.package_clam,
    )
    # the torch runtime the predictor runs (student on the device, channels_last, autocast)
    return TorchRuntime(load_package(path), device=str(ctx.device))


def _request(pkg, slide: Path, device: torch.device) -> dict[str, Any]:
    _reset_peak(device)
    t0 = time.perf_counter()
    pred = predict_slide(pkg, slide, heatmap=True)
    total = time.perf_counter() - t0
    if not np.isfinite(pred.probabilities).all():
        raise FloatingPointError(f"{slide.name}: non-finite probabilities {pred.probabilities}")
    n = len(pred.attention)
    return {
        "patches": n,
        "timings": pred.timings,
        "total_s": _r(total),
        "features_patches_per_s": _r(n / max(pred.timings["features"], 1e-6), 2),
        "peak_memory_mb": _peak_mb(device),
    }


def slide_request(ctx: Context) -> dict[str, Any]:
    dev = ctx.device
    synthetic, _ = ctx.slide()
    slides = {"synthetic": synthetic}
    if SHARED_SLIDE.is_file():
        slides[SHARED_SLIDE.name] = SHARED_SLIDE
    pkgs = {"student": _package(ctx, "student", ctx.student)}
    pkgs["teacher"] = _package(ctx, "teacher", ctx.teacher)
    for pkg in pkgs.values():  # warm-up: CUDA kernels, cuDNN/cuBLAS handles
        predict_slide(pkg, synthetic)
    runs: dict[str, Any] = {}
    for name, path in slides.items():
        runs[name] = {who: _request(pkg, path, dev) for who, pkg in pkgs.items()}
        t, st = runs[name]["teacher"]["timings"], runs[name]["student"]["timings"]
        runs[name]["speedup_features"] = _r(t["features"] / max(st["features"], 1e-6), 2)
    first = pkgs["student"]
    return {
        "packages": {
            who: {
                "arch": pkg.meta["encoder"]["arch"],
                "input_size": pkg.meta["encoder"]["input_size"],
                "fold_members": pkg.package.n_members,
                "weights_channels_last": _channels_last(pkg.package.encoder),
                "runtime": pkg.describe(),
            }
            for who, pkg in pkgs.items()
        },
        "patch": {k: first.meta["patch"][k] for k in ("patch_size", "target_mpp")},
        "feature_dim": first.feature_dim,
        "encoder_device": str(next(first.package.encoder.parameters()).device),
        "clam_device": str(next(first.package.clam.parameters()).device),
        "slides": runs,
    }


# -- the run --------------------------------------------------------------------------------------


def _cuda_error() -> str:
    """Why a CUDA build of torch sees no device (the driver's own words, from `cuda.init`)."""
    try:
        torch.cuda.init()
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:500]}"
    return "torch.cuda.init() raised nothing, yet no device is available"


def environment(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "timm": timm.__version__,
        "openslide": openslide.__library_version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
    }
    if not torch.cuda.is_available() and torch.version.cuda is not None:
        out["cuda_error"] = _cuda_error()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_mb=_r(props.total_memory / 2**20, 0),
            bf16_supported=torch.cuda.is_bf16_supported(),
            device_count=torch.cuda.device_count(),
        )
    return out


def _not_supported(node: Any, path: str, found: dict[str, str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "not_supported":
                found[path] = v
            else:
                _not_supported(v, f"{path}.{k}", found)


def summarise(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Section names by outcome, every not_supported reason, and the headline figures."""

    def get(section: str, *keys: str) -> Any:
        node: Any = sections.get(section)
        if not node or node.get("ok") is not True:
            return None
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    found: dict[str, str] = {}
    for name, rec in sections.items():
        _not_supported(rec, name, found)
    t = get("extraction_teacher", "model_patches_per_s")
    st = get("extraction_student", "model_patches_per_s")
    te = get("extraction_teacher", "engine_patches_per_s")
    se = get("extraction_student", "engine_patches_per_s")
    ratios = [
        r
        for r in (
            get("extraction_teacher", "engine_model_ratio"),
            get("extraction_student", "engine_model_ratio"),
        )
        if r is not None
    ]
    slides = get("slide_request", "slides") or {}
    return {
        "ok": [n for n, r in sections.items() if r.get("ok") is True],
        "failed": [n for n, r in sections.items() if r.get("ok") is False],
        "skipped": [n for n, r in sections.items() if r.get("ok") is None],
        "not_supported": found,
        "student_teacher_speedup_model": _r(st / t) if t and st else None,
        "student_teacher_speedup_engine": _r(se / te) if te and se else None,
        "engine_model_ratio": min(ratios) if ratios else None,
        "etc_peak_memory_mb": get("etc", "peak_memory_mb"),
        "etc_fits_16gb": get("etc", "fits_16gb"),
        "slide_speedup_features": {k: v.get("speedup_features") for k, v in slides.items()},
    }


class Runner:
    """Runs sections under the budget, records each outcome, flushes the result after each."""

    def __init__(self, result: dict[str, Any], out: Path | None, budget_s: float) -> None:
        self.result, self.out, self.budget_s = result, out, budget_s
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()
        self.current: str | None = None
        self.device = torch.device(result["device"])
        self.timer: threading.Timer | None = None
        self.work: Path | None = None  # removed by the watchdog (os._exit skips its cleanup)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        spent = time.perf_counter() - self.t0
        if spent >= self.budget_s:
            rec: dict[str, Any] = {
                "ok": None,
                "skipped": f"over budget: {spent:.0f} s of {self.budget_s:.0f} s spent",
            }
        else:
            with self.lock:
                self.current = name
            self.flush()
            start = time.perf_counter()
            try:
                _reset_peak(self.device)
                rec = {"ok": True, **fn()}
            except Exception as err:  # one broken path must not hide the others
                rec = {
                    "ok": False,
                    "error": f"{type(err).__name__}: {str(err)[:1500]}",
                    "traceback_tail": traceback.format_exc()[-3000:],
                }
            cleanup = _free(self.device)
            if cleanup:
                rec["cleanup_error"] = cleanup
            rec["seconds"] = _r(time.perf_counter() - start, 2)
        with self.lock:
            self.result["sections"][name] = rec
            self.current = None
        self.flush()

    def _finish(self, status: str) -> str:
        """The result as JSON (call with the lock held)."""
        self.result["status"] = status
        self.result["summary"] = summarise(self.result["sections"])
        self.result["total_s"] = _r(time.perf_counter() - self.t0, 1)
        return json.dumps(self.result, indent=2, default=str)

    def _write(self, text: str) -> None:
        if self.out is None:
            return
        tmp = self.out.with_name(self.out.name + ".part")
        tmp.write_text(text + "\n")
        os.replace(tmp, self.out)

    def flush(self) -> None:
        with self.lock:
            status = "complete" if self.current is None else f"partial: running {self.current}"
            self._write(self._finish(status))

    def final(self, status: str = "complete") -> str:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            text = self._finish(status)
            self._write(text)
        return text

    def watchdog(self, limit_s: float) -> None:
        """At `limit_s` after the start: record the running section as timed out, write and print
        the result, exit 3 (a hung CUDA call cannot be interrupted from Python)."""

        def fire() -> None:
            with self.lock:
                name = self.current or "(between sections)"
                self.result["sections"][name] = {
                    "ok": False,
                    "error": f"TimeoutError: still running at the hard limit of {limit_s:.0f} s",
                }
                text = self._finish(f"killed at the hard limit while running {name}")
                self._write(text)
            print(text, flush=True)
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)
            os._exit(3)

        self.timer = threading.Timer(max(0.0, limit_s - (time.perf_counter() - self.t0)), fire)
        self.timer.daemon = True
        self.timer.start()


def main() -> None:
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda (default if any)")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models and data (the tests)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections after this")
    ap.add_argument(
        "--hard-limit-s",
        type=float,
        default=460.0,
        help="write what there is and exit 3 at this (0: no limit)",
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here (after every section)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    sizes = tiny_sizes() if args.tiny else full_sizes(cpus or 1)
    result: dict[str, Any] = {
        "benchmark": "device_check",
        "scale": sizes.scale,
        "device": str(device),
        "budget_s": args.budget_s,
        "status": "starting",
        "environment": {},
        "sizes": asdict(sizes),
        "sections": {},
    }
    runner = Runner(result, args.out, args.budget_s)
    runner.t0 = t_start
    if args.hard_limit_s > 0:
        runner.watchdog(args.hard_limit_s)
    if device.type == "cuda" and not cuda:  # say why, in the JSON, rather than run on the CPU
        result["environment"] = environment(torch.device("cpu"))
        result["error"] = f"--device {device}: torch.cuda.is_available() is False"
        print(runner.final("no device"), flush=True)
        sys.exit(2)
    try:
        result["environment"] = environment(device)
    except Exception as err:
        result["environment"] = {"error": f"{type(err).__name__}: {err}"}
    with tempfile.TemporaryDirectory(prefix="efcm-device-check-") as tmp:
        ctx = Context(device, sizes, Path(tmp))
        runner.work = ctx.work
        sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("extraction_teacher", lambda: extraction(ctx, "teacher")),
            ("extraction_student", lambda: extraction(ctx, "student")),
            ("dataloader", lambda: dataloader(ctx)),
            ("distill_vfd", lambda: distill(ctx, "vfd")),
            ("distill_fpd", lambda: distill(ctx, "fpd")),
            ("distill_mcm", lambda: distill(ctx, "mcm")),
            ("etc", lambda: etc(ctx)),
            ("clam", lambda: clam(ctx)),
            ("slide_request", lambda: slide_request(ctx)),
        ]
        for name, fn in sections:
            runner.run(name, fn)
    print(runner.final(), flush=True)


if __name__ == "__main__":
    main()

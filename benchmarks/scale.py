"""Cohort-scale benchmark: the patch-shard store measured here, and a scale model for 10,000 slides.

Measured on this machine (the demo's teacher and slides, `params.yaml`; the CPU unless CUDA):
  write       teacher extraction with the store (`store.enabled`, the params' codec) vs extraction
              alone, slide by slide, the modes back to back on each slide in an alternating
              order, over `--repeats`: patches/s of each, and `overhead_ratio` = the median over
              (slide, repeat) pairs of (time with the store / time alone), goal <= 1.15; also
              with `store.fidelity_patches: 0` (the codec's cosine check: one teacher forward of
              the decoded patch for up to 16 patches a slide, at most 5 % of its patches; see
              `fidelity_forwards`).
              `where_time_goes`: the same work timed piece by piece in this process (slide
              reads, teacher forward, encode + tar, fidelity forwards) and the ratio they predict
              for num_workers 0, checked against the measured one. Per `--workers`
              (extract.num_workers): with 0 the encode runs in the main process, between the
              model's batches; with N > 0 in the DataLoader workers, beside the model.
  read        the store streamed as distillation streams it (`efcm.io.store.stream_samples`, the
              params' shuffle buffer and interleave, then `Codec.decode`) vs random slide reads as
              distillation's slide path does them (`efcm.training.distill.PairDataset` over
              `SlidePatches`, the patches in a random order across slides, each slide opened once
              by this process, included): patches/s and `ratio` (stream / random slide). Random
              slide reads twice: OpenSlide's tile cache as it is (a demo slide's tiles mostly fit
              in it) and off (every read decodes its tiles: a cohort of 10,000 large slides read
              at random hits the cache almost never). Also the store read at random through its
              index (`StorePatches.read`, what ETC's top-K reads do).
  per_core    one process, one OpenCV thread: JPEG decode and encode patches/s at the store's
              codec, at 224 px on real H&E tissue (../shared/data/wsi/CMU-1-Small-Region.svs
              patched at 224 px, 0.5 um/px; a synthetic slide when absent, and the JSON says so)
              and at the demo's patch size on its synthetic tissue; a 224 px shard streamed and
              decoded (tar, shuffle buffer, decode: the model's store read rate); slide reads at
              224 px in grid order (teacher extraction; tile cache on, cold) and at random (tile
              cache off).
  bytes       the store's bytes per patch, tar headers and padding included: the demo's shards
              (synthetic tissue at its patch size) and shards of 224 px real tissue written by
              `ShardWriter` (the figure the model uses); synthetic tissue at 224 px for contrast.
  ddp         benchmarks/ddp_overhead.py (DDP 2 vs 1 gloo processes on CPU), run as a subprocess
              when it exists; null with the reason when not.
Modelled (`cohort_model`, pure arithmetic, every assumption printed): hours per phase and
terabytes for 10,000 slides with a ViT-B/16 teacher and a ResNet-18 student on 8 GPUs, with the
store and with the slide path; each phase runs at the lower of its GPU-bound rate (published
throughputs) and its CPU-bound rate (the per-core rates measured here x the loader cores).

Prints one JSON object. Usage:
  python benchmarks/scale.py [--slides 8] [--repeats 3] [--workers 0,2] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
DDP_SCRIPT = ROOT / "benchmarks" / "ddp_overhead.py"
GOALS = {"write_overhead_ratio_max": 1.15}
HOUR = 3600.0
_FRACTIONS = {"distill_val_fraction", "mil_val_fraction"}
_MAY_BE_ZERO = {"fidelity_patches", "loop_cores_per_gpu", *_FRACTIONS}

# -- the scale model (pure arithmetic: tests/unit/test_scale_model.py) ---------------------------


@dataclass(frozen=True)
class Assumptions:
    """What the cohort model assumes; every field is printed with the result.

    GPU throughputs are per GPU, forward only, mixed precision, from timm's published benchmark
    tables (inference, AMP, one recent datacentre GPU): ResNet-18 about 14,000-19,000 img/s and
    ViT-B/16 about 3,000-4,000 img/s at 224 px; the defaults are the middles of those ranges.
    """

    slides: int = 10_000
    patches_per_slide: int = 10_000  # 224 px at 20x (0.5 um/px), no overlap: ~125 mm2 of tissue
    gpus: int = 8
    cpus: int = 64  # vCPUs of the node(s): 8 per GPU
    loop_cores_per_gpu: int = 1  # each GPU's driving process: not a data loader
    teacher_img_s: float = 3_500.0  # ViT-B/16 forward, AMP, one GPU
    student_img_s: float = 16_500.0  # ResNet-18 forward, AMP, one GPU
    train_step_factor: float = 3.0  # a training step (forward + backward) ~ 3 forwards
    etc_step_factor: float = 4.0  # ETC's gradient checkpointing recomputes the forward: ~ 4
    ddp_efficiency: float = 0.9  # 8-GPU all-reduce of ResNet-18's 11.7 M parameters per step
    teacher_dim: int = 768  # ViT-B/16's features
    student_dim: int = 768  # the student's features (vfd / fpd project to the teacher's dim)
    float16: bool = False  # extract.float16: features stored as fp16 (2 bytes) or fp32 (4)
    distill_epochs: int = 4  # distill.epochs
    distill_val_fraction: float = 0.2  # distill.val_fraction: validated (forward only) per epoch
    fidelity_patches: int = 16  # store.fidelity_patches: one teacher forward each, per slide
    etc_k: int = 512  # ib.k: patches per slide in ETC's bags
    etc_epochs: int = 2  # mil.etc.epochs
    folds: int = 3  # train_mil.folds: ETC fine-tunes and re-extracts once per fold
    mil_val_fraction: float = 0.25  # train_mil.val_fraction (ETC trains on the rest of a fold)
    etc_gpus: int = 8  # pipeline.etc_gpus: ETC's DDP processes in one pod, one per GPU
    # ETC's training reads: each process reads and decodes the next bag in one background thread
    # while it trains on this one (efcm.io.prefetch): "prefetch"; "serial" (read, then train) and
    # "workers" (DataLoader workers on the pod's loader cores) are the alternatives. Its
    # re-extraction reads as the student's extraction does (extract.num_workers loaders).
    etc_loader: str = "prefetch"
    bag_cache_gb: float = 0.268  # efcm.training.mil.BAG_CACHE_BYTES (256 MiB): bags held at once
    slide_gb: float = 1.0  # a 20x/40x H&E whole-slide image (TCGA SVS: ~0.2-3 GB)
    stage_gb_per_s: float = 1.0  # one node reading slides from gs:// into its local disk

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if f.name in _FRACTIONS and not 0 <= v < 1:
                raise ValueError(f"scale model: assumption {f.name} must be in [0, 1), got {v}")
            if v < 0 or (v == 0 and f.name not in _MAY_BE_ZERO):
                raise ValueError(f"scale model: assumption {f.name} must be > 0, got {v}")
        if self.cpus <= self.loop_cores_per_gpu * self.gpus:
            raise ValueError(
                f"scale model: cpus={self.cpus} leaves no data-loader core beside "
                f"loop_cores_per_gpu={self.loop_cores_per_gpu} x gpus={self.gpus}"
            )
        if self.etc_gpus > self.gpus:
            raise ValueError(f"scale model: etc_gpus={self.etc_gpus} > gpus={self.gpus}")
        if self.etc_loader not in {"serial", "prefetch", "workers"}:
            raise ValueError(
                "scale model: etc_loader must be serial | prefetch | workers, got "
                f"{self.etc_loader!r}"
            )

    @property
    def patches(self) -> int:
        return self.slides * self.patches_per_slide

    def loader_cores(self, gpus: int) -> float:
        """Data-loader cores of a phase on `gpus` of the node's GPUs (its share of the CPUs)."""
        return (self.cpus / self.gpus - self.loop_cores_per_gpu) * gpus


@dataclass(frozen=True)
class CpuRates:
    """Patches/s on one CPU core, at the model's patch size (measured by this script)."""

    decode: float  # the store read and decoded (tar, shuffle buffer, the codec's decode)
    encode: float  # the store's codec, encode (+ tar)
    slide_seq_read: float  # a slide's patches in grid order (extraction), tile cache on
    slide_random_read: float  # patches at random across slides (distillation), tile cache off

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(
                    f"scale model: rate {f.name} must be > 0, got {getattr(self, f.name)}"
                )


def fidelity_forwards(fidelity_patches: int, n_patches: int) -> int:
    """Teacher forwards the store's fidelity check adds to a slide of `n_patches`: one per
    compared patch (`efcm.io.store.fidelity_count`, the rule extraction applies)."""
    from efcm.io.store import fidelity_count

    return fidelity_count(fidelity_patches, n_patches)


def phase(
    patches: float,
    gpu_s: float,
    cpu_s: float,
    gpus: int,
    loader_cores: float,
    *,
    overlap: bool = True,
    efficiency: float = 1.0,
) -> dict[str, Any]:
    """Hours of one phase: `patches` each costing `gpu_s` GPU-seconds and `cpu_s` core-seconds.

    With `overlap` (DataLoader workers), the phase runs at the lower of the GPUs' rate
    (gpus x efficiency / gpu_s) and the loader cores' rate (loader_cores / cpu_s); without, the
    driving process reads then computes, so each GPU's patch costs gpu_s + cpu_s.
    """
    gpu_rate = gpus * efficiency / gpu_s
    if overlap:
        cpu_rate = loader_cores / cpu_s if cpu_s > 0 else math.inf
        rate, bound = (gpu_rate, "gpu") if gpu_rate <= cpu_rate else (cpu_rate, "cpu")
    else:
        rate, bound = gpus * efficiency / (gpu_s + cpu_s), "serial"
    return {
        "patches": patches,
        "gpus": gpus,
        "bound": bound,
        "patches_per_s": round(rate, 1),
        "hours": patches / rate / HOUR,
    }


def cohort_phases(a: Assumptions, r: CpuRates, path: str) -> dict[str, dict[str, Any]]:
    """The compute phases that touch pixels, for `path` "store" (later steps read the patch-shard
    store) or "slides" (they read the slides). Phases on features only (CLAM, IB, evaluation:
    minutes) are left out."""
    if path not in {"store", "slides"}:
        raise ValueError(f"scale model: path must be 'store' or 'slides', got {path!r}")
    store = path == "store"
    n, g = a.patches, a.gpus
    cores = a.loader_cores(g)
    fidelity = (
        fidelity_forwards(a.fidelity_patches, a.patches_per_slide) / a.patches_per_slide
        if store
        else 0
    )
    read_seq, read_rand = 1 / r.slide_seq_read, 1 / r.slide_random_read
    # the pixels of each later phase: the store decoded, or the slides read
    seq = 1 / r.decode if store else read_seq
    rand = 1 / r.decode if store else read_rand
    v = a.distill_val_fraction
    distill_gpu = ((1 - v) * a.train_step_factor + v) / a.student_img_s
    etc_train_slides = a.slides * (1 - 1 / a.folds) * (1 - a.mil_val_fraction)
    etc_cores = a.loader_cores(a.etc_gpus)
    # one reader thread per ETC process, or the pod's loader cores
    etc_train_cores = float(a.etc_gpus) if a.etc_loader == "prefetch" else etc_cores
    out = {
        "teacher_extract": phase(
            n,
            (1 + fidelity) / a.teacher_img_s,
            read_seq + (1 / r.encode if store else 0.0),
            g,
            cores,
        ),
        "distill": phase(
            n * a.distill_epochs, distill_gpu, rand, g, cores, efficiency=a.ddp_efficiency
        ),
        "student_extract": phase(n, 1 / a.student_img_s, seq, g, cores),
        "etc_train": phase(
            a.folds * a.etc_epochs * etc_train_slides * min(a.etc_k, a.patches_per_slide),
            a.etc_step_factor / a.student_img_s,
            rand,
            a.etc_gpus,
            etc_train_cores,
            overlap=a.etc_loader != "serial",
            # one gradient all-reduce per optimiser step across the ranks
            efficiency=a.ddp_efficiency if a.etc_gpus > 1 else 1.0,
        ),
        "etc_reextract": phase(a.folds * n, 1 / a.student_img_s, seq, a.etc_gpus, etc_cores),
    }
    if not store:  # one pod stages the cohort's slides onto its node (the gs:// slide cache)
        hours = a.slides * a.slide_gb / a.stage_gb_per_s / HOUR
        out["stage_slides"] = {"patches": 0, "gpus": 0, "bound": "network", "hours": hours}
    return out


def cohort_storage(a: Assumptions, store_bytes_per_patch: float) -> dict[str, float]:
    """Terabytes (1e12 bytes) on the pipeline root: the slides, the store, the features (teacher,
    student). ETC's re-extracted features are not kept: each fold's are written to the ETC pod's
    disk and removed once its CLAM is trained (`etc_scratch_tb`, beside this)."""
    if store_bytes_per_patch <= 0:
        raise ValueError(
            f"scale model: store bytes per patch must be > 0, got {store_bytes_per_patch}"
        )
    value = 2 if a.float16 else 4
    tb = {
        "slides_tb": a.slides * a.slide_gb / 1e3,
        "store_tb": a.patches * store_bytes_per_patch / 1e12,
        "teacher_features_tb": a.patches * a.teacher_dim * value / 1e12,
        "student_features_tb": a.patches * a.student_dim * value / 1e12,
    }
    tb["total_tb"] = sum(tb.values())
    tb["total_without_store_tb"] = tb["total_tb"] - tb["store_tb"]
    return tb


def cohort_model(a: Assumptions, r: CpuRates, store_bytes_per_patch: float) -> dict[str, Any]:
    """Hours per phase and in total, store path and slide path, and terabytes (see above)."""

    def rounded(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
        total = sum(p["hours"] for p in phases.values())
        return {
            "phases": {k: {**p, "hours": round(p["hours"], 2)} for k, p in phases.items()},
            "total_hours": round(total, 2),
        }

    store, slides = cohort_phases(a, r, "store"), cohort_phases(a, r, "slides")
    # what ETC would gain beyond this: DataLoader workers reading its pixels beside the GPUs
    store_workers = cohort_phases(replace(a, etc_loader="workers"), r, "store")
    value = 2 if a.float16 else 4
    one_bag_gb = a.patches_per_slide * max(a.teacher_dim, a.student_dim) * value / 1e9
    te_alone = phase(
        a.patches, 1 / a.teacher_img_s, 1 / r.slide_seq_read, a.gpus, a.loader_cores(a.gpus)
    )
    return {
        "assumptions": asdict(a),
        "cpu_rates_per_core": asdict(r),
        "store_bytes_per_patch": round(store_bytes_per_patch, 1),
        "patches": a.patches,
        "loader_cores": a.loader_cores(a.gpus),
        "store": rounded(store),
        "slides": rounded(slides),
        "store_with_etc_loader_workers": rounded(store_workers),
        "teacher_extract_overhead_ratio": round(
            store["teacher_extract"]["hours"] / te_alone["hours"], 3
        ),
        "distill_slides_over_store": round(
            slides["distill"]["hours"] / store["distill"]["hours"], 2
        ),
        # the teacher bags and a fold's re-extracted bags, each read on access through an LRU
        # (`efcm.training.mil.FeatureBags`), instead of the cohort's bags in RAM
        "etc_bags_ram_gb": round(2 * (a.bag_cache_gb + one_bag_gb), 2),
        "etc_scratch_tb": round(a.patches * a.student_dim * 4 / 1e12, 3),
        "storage": {k: round(v, 3) for k, v in cohort_storage(a, store_bytes_per_patch).items()},
    }


# -- measurements --------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _demo(args: argparse.Namespace, params: Any, tmp: Path) -> tuple[Path, Path, str]:
    """(manifest, patches dir, where they came from): `--demo/--patches`, or a fresh demo."""
    from efcm import stages

    if args.demo:
        manifest = Path(args.demo) / "manifest.csv"
        patches = Path(args.patches) if args.patches else tmp / "patch"
        if not args.patches:
            stages.patch(manifest, patches, params)
        return manifest, patches, f"{args.demo} ({args.patches or 'patched here'})"
    manifest = stages.demo_data(tmp / "demo", params, n_slides=args.slides)
    stages.patch(manifest, tmp / "patch", params)
    return manifest, tmp / "patch", f"efcm demo-data, {args.slides} slides (params demo_data)"


def _truncate(patches_dir: Path, n: int, tmp: Path) -> Path:
    """A copy of a patch output whose coords files keep their first `n` patches (`--max-patches`:
    fewer teacher forwards; the given folder is never changed)."""
    import h5py

    out = tmp / "patch-truncated"
    (out / "patches").mkdir(parents=True)
    for src in sorted((patches_dir / "patches").glob("*.h5")):
        with h5py.File(src, "r") as f, h5py.File(out / "patches" / src.name, "w") as g:
            d = g.create_dataset("coords", data=f["coords"][:n])
            d.attrs.update(dict(f["coords"].attrs))
            g.attrs.update(dict(f.attrs))
    return out


def _teacher(params: Any) -> Any:
    """The teacher as `efcm.stages.extract` builds it (seeded random init for the demo)."""
    import torch

    from efcm.models.encoders import EncoderWithTransform, build_backbone

    torch.manual_seed(params.seed)
    backbone, _ = build_backbone(params.teacher, warn_random=False)
    model = EncoderWithTransform(backbone, params.teacher).to(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def _slides(manifest: Any, patches_dir: Path) -> list[tuple[str, str, Any]]:
    """(slide_id, uri, coords) of every patched slide with patches."""
    from efcm.slides.patching import read_coords

    out = []
    for s in manifest.slides:
        path = patches_dir / "patches" / f"{s.slide_id}.h5"
        if path.is_file():
            cf = read_coords(path)
            if len(cf.coords):
                uri = s.uri if os.path.isabs(s.uri) else str(manifest.base_dir / s.uri)
                out.append((s.slide_id, uri, cf))
    if not out:
        raise SystemExit(f"{patches_dir}: no patched slides with patches")
    return out


def _write(
    model: Any,
    manifest: Any,
    slide_ids: list[str],
    patches_dir: Path,
    params: Any,
    workers: int,
    repeats: int,
    tmp: Path,
) -> tuple[dict[str, Any], Path]:
    """Teacher extraction alone, with the store, and with the store without its fidelity check,
    slide by slide, the three modes back to back on each slide in an alternating order (a pair
    measured seconds apart shares the shared machine's load); the ratios are per slide and
    repeat, their median reported. Returns the figures and the store of the last repeat."""
    import shutil

    from efcm.config import ExtractParams, StoreParams
    from efcm.features import extract_manifest

    store = StoreParams.model_validate({**params.store.model_dump(), "enabled": True})
    modes = {
        "alone": None,
        "store": store,
        "store_no_fidelity": StoreParams.model_validate(
            {**store.model_dump(), "fidelity_patches": 0}
        ),
    }
    ex = ExtractParams.model_validate({**params.extract.model_dump(), "num_workers": workers})
    entries = {s.slide_id: s for s in manifest.slides}
    secs: dict[str, list[float]] = {m: [] for m in modes}
    totals: dict[str, list[float]] = {m: [] for m in modes}  # seconds per repeat
    n = 0
    for rep in range(repeats):
        outs = {m: tmp / f"write-w{workers}-{m}-{rep}" for m in modes}
        spent = dict.fromkeys(modes, 0.0)
        n = 0
        for k, sid in enumerate(slide_ids):
            one = replace(manifest, slides=(entries[sid],))
            for mode in list(modes) if (rep + k) % 2 == 0 else list(reversed(modes)):
                t0 = time.perf_counter()
                rows = extract_manifest(
                    model,
                    one,
                    patches_dir,
                    outs[mode],
                    ex,
                    {"encoder": "teacher"},
                    store=modes[mode],
                )
                dt = time.perf_counter() - t0
                secs[mode].append(dt)
                spent[mode] += dt
            n += int(rows[0].get("n_patches") or 0)
        for mode in modes:
            totals[mode].append(spent[mode])
            if mode != "store" or rep < repeats - 1:
                shutil.rmtree(outs[mode])
    ratio = [s / a for s, a in zip(secs["store"], secs["alone"], strict=True)]
    ratio0 = [s / a for s, a in zip(secs["store_no_fidelity"], secs["alone"], strict=True)]
    fig = {
        "num_workers": workers,
        "encode_runs_in": "the main process" if workers == 0 else "the DataLoader workers",
        "patches": n,
        "pairs": len(ratio),
        "extract_alone_patches_per_s": round(n / _median(totals["alone"]), 1),
        "extract_with_store_patches_per_s": round(n / _median(totals["store"]), 1),
        "extract_with_store_no_fidelity_patches_per_s": round(
            n / _median(totals["store_no_fidelity"]), 1
        ),
        "overhead_ratio": round(_median(ratio), 3),
        "overhead_ratio_no_fidelity": round(_median(ratio0), 3),
        "overhead_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratio, n=4)]
        if len(ratio) > 1
        else None,
        "overhead_ratio_no_fidelity_quartiles": [
            round(q, 3) for q in statistics.quantiles(ratio0, n=4)
        ]
        if len(ratio0) > 1
        else None,
        "overhead_ratio_of_totals": round(_median(totals["store"]) / _median(totals["alone"]), 3),
    }
    return fig, outs["store"] / "store"


def _where_time_goes(
    model: Any, slides: list[tuple[str, str, Any]], params: Any, tmp: Path
) -> dict[str, Any]:
    """Each piece of an extraction with the store timed alone in this process (one pass over the
    slides): reads, teacher forward, encode + tar, fidelity forwards; the overhead they predict
    for a serial (num_workers 0) extraction."""
    import torch

    from efcm.features import embed_batches
    from efcm.io.store import Codec, ShardWriter
    from efcm.slides.patches import SlidePatches

    codec = Codec(params.store.format, params.store.quality)
    b = params.extract.batch_size
    t_read = t_model = t_enc = 0.0
    n = fid = 0
    for sid, uri, cf in slides:
        sp = SlidePatches(uri, cf)
        t0 = time.perf_counter()
        batches = [sp.read_batch(range(i, min(i + b, len(sp)))) for i in range(0, len(sp), b)]
        t_read += time.perf_counter() - t0
        sp.close()
        t0 = time.perf_counter()
        embed_batches(model, (torch.from_numpy(x) for x in batches))
        t_model += time.perf_counter() - t0
        t0 = time.perf_counter()
        with ShardWriter(tmp / "where", sid, cf.coords, codec, cf.patch_size) as w:
            row = 0
            for x in batches:
                enc = codec.encode_batch(x)
                w.add_batch(row, enc)
                row += len(enc)
        t_enc += time.perf_counter() - t0
        n += len(sp)
        fid += fidelity_forwards(params.store.fidelity_patches, len(sp))
    t_fid = t_model * fid / n
    base = t_read + t_model
    return {
        "patches": n,
        "read_ms_per_patch": round(1e3 * t_read / n, 3),
        "teacher_ms_per_patch": round(1e3 * t_model / n, 3),
        "encode_and_tar_ms_per_patch": round(1e3 * t_enc / n, 3),
        "fidelity_forwards": fid,
        "fidelity_ms_per_patch": round(1e3 * t_fid / n, 3),
        "predicted_overhead_ratio": round((base + t_enc + t_fid) / base, 3),
        "predicted_overhead_ratio_no_fidelity": round((base + t_enc) / base, 3),
        "share_of_store_run": {
            k: round(v / (base + t_enc + t_fid), 3)
            for k, v in {
                "read": t_read,
                "teacher": t_model,
                "encode_tar": t_enc,
                "fidelity": t_fid,
            }.items()
        },
    }


def _read(
    store_dir: Path, slides: list[tuple[str, str, Any]], params: Any, repeats: int
) -> dict[str, Any]:
    """Stream + decode the store vs distillation's random slide reads vs the store's index."""
    import numpy as np

    from efcm.io.store import Codec, shard_path, stream_samples
    from efcm.slides.patches import SlidePatches, StorePatches
    from efcm.training.distill import PairDataset

    shards = [shard_path(store_dir, sid) for sid, _, _ in slides]
    total = sum(len(cf.coords) for _, _, cf in slides)

    def stream(rep: int) -> float:
        t0 = time.perf_counter()
        n = 0
        for _, _, data in stream_samples(
            shards,
            seed=params.seed,
            epoch=rep,
            interleave=params.store.interleave,
            buffer=params.store.shuffle_buffer,
        ):
            Codec.decode(data)
            n += 1
        assert n == total, (n, total)
        return n / (time.perf_counter() - t0)

    def slide_random(rep: int, cached: bool) -> float:
        # as distillation's slide path: a PairDataset over fresh SlidePatches (each slide is
        # opened on its first read in this process, and that is timed), items in random order
        from _timing import uncached_patches  # a script: benchmarks/ is on the path

        t0 = time.perf_counter()
        sps = [
            SlidePatches(uri, cf) if cached else uncached_patches(uri, cf) for _, uri, cf in slides
        ]
        ds = PairDataset(sps, [np.zeros((len(cf.coords), 1), np.float32) for _, _, cf in slides])
        for k in np.random.default_rng([params.seed, rep]).permutation(len(ds)):
            ds[int(k)]
        for sp in sps:
            sp.close()
        return len(ds) / (time.perf_counter() - t0)

    def store_random(rep: int) -> float:
        t0 = time.perf_counter()
        sps = [StorePatches(store_dir, sid, cf) for sid, _, cf in slides]
        items = [(s, i) for s, sp in enumerate(sps) for i in range(len(sp))]
        for k in np.random.default_rng([params.seed, rep]).permutation(len(items)):
            s, i = items[int(k)]
            sps[s].read(i)
        return len(items) / (time.perf_counter() - t0)

    runs: dict[str, list[float]] = {"stream": [], "slide": [], "slide_uncached": [], "index": []}
    fns = {
        "stream": stream,
        "slide": lambda rep: slide_random(rep, True),
        "slide_uncached": lambda rep: slide_random(rep, False),
        "index": store_random,
    }
    for rep in range(repeats):
        for key in list(fns) if rep % 2 == 0 else list(reversed(fns)):
            runs[key].append(fns[key](rep))
    ratio = [s / r for s, r in zip(runs["stream"], runs["slide_uncached"], strict=True)]
    ratio_c = [s / r for s, r in zip(runs["stream"], runs["slide"], strict=True)]
    return {
        "patches": total,
        "shards": len(shards),
        "stream_decode_patches_per_s": round(_median(runs["stream"]), 1),
        "slide_random_patches_per_s_tile_cache_off": round(_median(runs["slide_uncached"]), 1),
        "slide_random_patches_per_s_tile_cache_default": round(_median(runs["slide"]), 1),
        "store_index_random_patches_per_s": round(_median(runs["index"]), 1),
        "ratio": round(_median(ratio), 2),
        "ratio_tile_cache_default": round(_median(ratio_c), 2),
        "ratio_is": "stream + decode / random slide reads with the tile cache off (median)",
    }


def _rate(fn: Any, items: list[Any], min_s: float) -> float:
    """Items/s of `fn` over `items`, repeated until at least `min_s` (one warm-up item first)."""
    fn(items[0])
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < min_s:
        for x in items:
            fn(x)
        n += len(items)
    return n / (time.perf_counter() - t0)


def _tissue_224(tmp: Path, demo_slide: tuple[str, str, Any]) -> tuple[str, Any, str]:
    """(uri, coords, source): real H&E tissue patched at 224 px, 0.5 um/px (CMU-1-Small-Region),
    else the demo's slide read at 224 px."""
    from efcm.config import PatchParams
    from efcm.slides.batch import plan_patches
    from efcm.slides.patching import CoordsFile
    from efcm.slides.reader import open_slide

    if SHARED_SLIDE.is_file():
        with open_slide(str(SHARED_SLIDE)) as s:
            plan = plan_patches(
                s, PatchParams(target_mpp=0.5, patch_size=224, step=224), name="cmu1"
            )
        g = plan.geometry
        cf = CoordsFile(plan.coords, g.patch_level, g.read_size, g.patch_size, "cmu1")
        return str(SHARED_SLIDE), cf, "real H&E: CMU-1-Small-Region.svs, 224 px at 0.5 um/px"
    _, uri, cf = demo_slide
    return uri, _at_224(cf), f"synthetic demo tissue at 224 px ({SHARED_SLIDE} is absent)"


def _at_224(cf: Any) -> Any:
    from efcm.slides.patching import CoordsFile

    return CoordsFile(cf.coords, cf.patch_level, 224, 224, cf.name + "@224")


def _shard(tmp: Path, name: str, pixels: Any, codec: Any) -> Path:
    """A shard of `pixels` written by ShardWriter (its index beside it)."""
    import numpy as np

    from efcm.io.store import ShardWriter, shard_path

    d = tmp / f"bytes-{name}"
    coords = np.zeros((len(pixels), 2), np.int64)
    coords[:, 0] = np.arange(len(pixels))
    with ShardWriter(d, name, coords, codec, pixels.shape[1]) as w:
        w.add_batch(0, codec.encode_batch(pixels))
    return shard_path(d, name)


def _stream_decode(shard: Path, params: Any) -> int:
    """Stream one shard as distillation does and decode every sample; the sample count."""
    from efcm.io.store import Codec, stream_samples

    n = 0
    for _, _, data in stream_samples(
        [shard],
        seed=params.seed,
        epoch=0,
        interleave=params.store.interleave,
        buffer=params.store.shuffle_buffer,
    ):
        Codec.decode(data)
        n += 1
    return n


def _per_core(
    slides: list[tuple[str, str, Any]], params: Any, tmp: Path, min_s: float, demo_pixels: Any
) -> dict[str, Any]:
    """Per-core rates (one process, one OpenCV thread) and the store's bytes per patch."""
    import cv2
    import numpy as np

    from efcm.io.store import Codec
    from efcm.slides.patches import SlidePatches

    codec = Codec(params.store.format, params.store.quality)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        uri, cf, source = _tissue_224(tmp, slides[0])
        n224 = len(cf.coords)
        order = [int(i) for i in np.random.default_rng(params.seed).permutation(n224)]

        def seq_pass(_: Any) -> Any:  # a fresh handle each pass: its tile cache starts cold
            sp = SlidePatches(uri, cf)
            out = [sp.read_batch(range(i, min(i + 64, n224))) for i in range(0, n224, 64)]
            sp.close()
            return np.concatenate(out)

        def random_pass(_: Any) -> None:  # opening the slide included, as distillation pays it
            from _timing import uncached_patches  # a script: benchmarks/ is on the path

            un = uncached_patches(uri, cf)
            for i in order:
                un.read(i)
            un.close()

        pix224 = seq_pass(None)
        seq = _rate(seq_pass, [None], min_s) * n224
        rand = _rate(random_pass, [None], min_s) * n224
        enc224 = codec.encode_batch(pix224)
        encd = codec.encode_batch(demo_pixels)
        rates = {
            "source_224": source,
            "patches_224": n224,
            "decode_224": _rate(Codec.decode, enc224, min_s),
            "encode_224": _rate(codec.encode, list(pix224), min_s),
            "decode_demo": _rate(Codec.decode, encd, min_s),
            "encode_demo": _rate(codec.encode, list(demo_pixels), min_s),
            "demo_patch_size": int(demo_pixels.shape[1]),
            "slide_seq_read_224": seq,
            "slide_random_read_224_tile_cache_off": rand,
        }
        demo224 = SlidePatches(slides[0][1], _at_224(slides[0][2]))
        pix_demo224 = demo224.read_batch(range(len(demo224)))
        demo224.close()
        real, syn = _shard(tmp, "real224", pix224, codec), _shard(tmp, "syn224", pix_demo224, codec)
        # the store read as distillation reads it: tar parsing, the shuffle buffer and decode
        rates["stream_decode_224"] = (
            _rate(lambda p: _stream_decode(p, params), [real], min_s) * n224
        )
        sizes = {
            "real_224": real.stat().st_size / n224,
            "synthetic_224": syn.stat().st_size / len(pix_demo224),
            "jpeg_only_real_224": float(np.mean([len(b) for b in enc224])),
        }
    finally:
        cv2.setNumThreads(threads)
    return {"rates": rates, "bytes": sizes}


def _store_bytes(store_dir: Path) -> dict[str, Any]:
    """The demo store's bytes per patch: shard files (tar included) / samples, and data alone."""
    from efcm.io.store import read_index

    total = data = n = 0
    for idx_path in sorted(store_dir.glob("*.h5")):
        idx = read_index(store_dir, idx_path.stem)
        total += idx.shard_bytes
        data += idx.nbytes
        n += len(idx)
    return {
        "shard_bytes_per_patch": round(total / n, 1),
        "image_bytes_per_patch": round(data / n, 1),
        "tar_overhead": round(total / data, 3),
        "patches": n,
    }


def _ddp(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None]:
    """The DDP benchmark's JSON (DDP 2 vs 1 process on CPU), or None and why."""
    if args.no_ddp:
        return None, "skipped (--no-ddp)"
    if not DDP_SCRIPT.is_file():
        return None, f"{DDP_SCRIPT.relative_to(ROOT)} does not exist on this branch yet"
    cmd = [sys.executable, str(DDP_SCRIPT), *shlex.split(args.ddp_args)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.ddp_timeout, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(cmd)}: no result within {args.ddp_timeout} s"
    if proc.returncode != 0:
        return None, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-600:]}"
    try:
        return json.loads(proc.stdout), None
    except json.JSONDecodeError:
        return None, f"{' '.join(cmd)}: stdout is not one JSON object: {proc.stdout[-300:]!r}"


def _assumptions(params: Any) -> Assumptions:
    """The default assumptions with the params' epochs, K, folds and float16."""
    return Assumptions(
        float16=params.extract.float16,
        distill_epochs=params.distill.epochs,
        distill_val_fraction=params.distill.val_fraction,
        fidelity_patches=params.store.fidelity_patches,
        etc_k=params.ib.k,
        etc_epochs=params.mil.etc.epochs,
        folds=params.train_mil.folds,
        mil_val_fraction=params.train_mil.val_fraction,
        student_dim=768 if params.distill.method in {"vfd", "fpd"} else 512,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--slides", type=int, default=8, help="demo slides to generate")
    ap.add_argument("--demo", help="an existing demo dataset (its manifest.csv) instead")
    ap.add_argument("--patches", help="its patch output (default: patched here)")
    ap.add_argument("--max-patches", type=int, default=0, help="patches per slide (0: all)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated repeats of each mode")
    ap.add_argument(
        "--workers", default="0,2", help="extract.num_workers values to measure the write at"
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="min timing of a per-core rate")
    ap.add_argument("--no-ddp", action="store_true", help="do not run benchmarks/ddp_overhead.py")
    ap.add_argument("--ddp-args", default="", help="arguments for benchmarks/ddp_overhead.py")
    ap.add_argument("--ddp-timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.slides, args.repeats, args.workers, args.seconds = 2, 1, "0", 0.2
        args.max_patches = args.max_patches or 24
        args.no_ddp = True
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]

    t_start = time.perf_counter()
    result = _run(args, workers)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _run(args: argparse.Namespace, workers: list[int]) -> dict[str, Any]:
    """Every measurement, then the model; the JSON object."""
    import torch
    from _timing import machine as host  # a script: benchmarks/ is on the path

    from efcm.config import load_params
    from efcm.features import embed_batches
    from efcm.io.manifest import read_manifest
    from efcm.slides.patches import SlidePatches

    params = load_params(args.params)
    machine = host()
    sections: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        sections[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="efcm-bench-scale-") as tmp_s:
        tmp = Path(tmp_s)
        manifest_path, patches_dir, source = _demo(args, params, tmp)
        if args.max_patches:
            patches_dir = _truncate(patches_dir, args.max_patches, tmp)
        manifest = read_manifest(manifest_path, tuple(params.dataset.classes))
        slides = _slides(manifest, patches_dir)
        model = _teacher(params)
        size = slides[0][2].patch_size
        warm = torch.zeros((params.extract.batch_size, size, size, 3), dtype=torch.uint8)
        embed_batches(model, [warm])  # first-call allocations are not the store's
        lap("setup")
        write, store_dir = {}, None
        for w in workers:
            write[str(w)], store_dir = _write(
                model,
                manifest,
                [sid for sid, _, _ in slides],
                patches_dir,
                params,
                w,
                args.repeats,
                tmp,
            )
        lap("write")
        where = _where_time_goes(model, slides, params, tmp)
        lap("where_time_goes")
        assert store_dir is not None
        read = _read(store_dir, slides, params, args.repeats)
        lap("read")
        sp = SlidePatches(slides[0][1], slides[0][2])
        demo_pixels = sp.read_batch(range(len(sp)))
        sp.close()
        core = _per_core(slides, params, tmp, args.seconds, demo_pixels)
        demo_bytes = _store_bytes(store_dir)
        lap("per_core_and_bytes")
    ddp, ddp_reason = _ddp(args)
    lap("ddp")
    r = core["rates"]
    rates = CpuRates(
        decode=r["stream_decode_224"],
        encode=r["encode_224"],
        slide_seq_read=r["slide_seq_read_224"],
        slide_random_read=r["slide_random_read_224_tile_cache_off"],
    )
    model_out = cohort_model(_assumptions(params), rates, core["bytes"]["real_224"])
    key = str(params.extract.num_workers)
    headline = write[key] if key in write else write[str(workers[0])]
    serial = write.get("0")
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "benchmark": "scale",
        "machine": machine,
        "data": {
            "demo": source,
            "slides": len(slides),
            "patches": sum(len(cf.coords) for _, _, cf in slides),
            "max_patches_per_slide": args.max_patches or None,
            "patch_size": size,
            "read_size": slides[0][2].read_size,
            "teacher": params.teacher.arch,
            "teacher_input": params.teacher.input_size,
            "codec": {"format": params.store.format, "quality": params.store.quality},
            "fidelity_patches": params.store.fidelity_patches,
        },
        "repeats": args.repeats,
        "goals": GOALS,
        "shard_write_overhead_ratio": headline["overhead_ratio"],
        "shard_write_overhead_ratio_no_fidelity": headline["overhead_ratio_no_fidelity"],
        "shard_write_overhead_at_workers": headline["num_workers"],
        "goals_met": {
            "write_overhead_ratio": headline["overhead_ratio"] <= GOALS["write_overhead_ratio_max"],
            "write_overhead_ratio_no_fidelity": headline["overhead_ratio_no_fidelity"]
            <= GOALS["write_overhead_ratio_max"],
        },
        "write": write,
        "where_time_goes": where,
        "shard_read_over_slide_read": read["ratio"],
        "read": read,
        "decode_patches_per_s_per_core": {
            "224": round(r["decode_224"], 1),
            str(r["demo_patch_size"]): round(r["decode_demo"], 1),
        },
        "per_core": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
        "store_bytes_per_patch": {
            "demo_synthetic": demo_bytes,
            "real_224_measured": round(core["bytes"]["real_224"], 1),
            "synthetic_224_measured": round(core["bytes"]["synthetic_224"], 1),
            "real_224_jpeg_only": round(core["bytes"]["jpeg_only_real_224"], 1),
            "source_224": r["source_224"],
            "model_uses": "real_224_measured",
        },
        "ddp_steps_per_s_2_vs_1": ddp.get("ratio_2_vs_1") if ddp else None,
        "ddp": ddp,
        "ddp_reason": ddp_reason,
        "model_check": {
            "write_overhead_predicted_serial": where["predicted_overhead_ratio"],
            "write_overhead_measured_serial": serial["overhead_ratio"] if serial else None,
            "write_overhead_predicted_serial_no_fidelity": where[
                "predicted_overhead_ratio_no_fidelity"
            ],
            "write_overhead_measured_serial_no_fidelity": serial["overhead_ratio_no_fidelity"]
            if serial
            else None,
            "stream_over_decode_per_core": round(
                read["stream_decode_patches_per_s"] / r["decode_demo"], 3
            ),
        },
        "model": model_out,
        "sections_s": sections,
    }


if __name__ == "__main__":
    main()

"""Benchmark of the predictor: slide-URI latency per step, student vs teacher, and features-request
latency per protocol.

  slides    for ../shared/data/wsi/CMU-1-Small-Region.svs and a synthetic slide of about
            `--synthetic-patches` patches (default 20,000), `efcm.inference.predict_slide` (the
            predictor's own path, heatmap on) with the student package, timed per step:
            download (gs:// staging; 0 for local files), patching (mpp, tissue, grid), features
            (patch reading in threads overlapped with the encoder), clam, heatmap; and the same with
            the teacher encoder packaged instead of the student, on CMU-1 and on a synthetic slide
            of `--teacher-patches` patches (default 300: a ViT-B/16 on 2 CPU cores runs ~4
            patches/s). `student_teacher_speedup` compares the features step per patch (goal >= 5).
  requests  `efcm serve` in a subprocess on 127.0.0.1 with the student package; a 2,000 x 512
            FP32 feature bag sent `--requests` times over REST JSON, REST binary and gRPC with
            kserve's clients; p50/p99 in ms.

  runtimes  the same slides (CMU-1-Small-Region and a synthetic slide of about
            `--runtime-patches` 128-px patches) served by each runtime a package carries: torch
            FP32 (the extraction engine's path: channels_last, `cpu_bf16=False`), torch under CPU
            bf16 autocast (where the CPU computes bf16 natively), ONNX Runtime FP32 and INT8.
            Per runtime: model-only ms/patch (`Runtime.embed` on the slide's patches already read
            into memory, `_timing.runtime_rate`) and the slide request's features step ms/patch
            (`predict_slide`, reading in threads ahead of the runtime), with the thread split the
            server uses (`efcm.limits.RuntimeSettings`); their ratio is
            `slide_engine_model_ratio` (goal >= 0.9). At the demo's size (a resnet18 student at
            112 px on 128-px patches) and at 224 px (the same student at 224 px on 256-px patches
            at the same 1 um/px, centre-cropped in the graph as at 112: 4x the pixels read and
            embedded). The INT8 parity against torch FP32 as the package's export measured it
            (model.json) and re-measured here on the benchmark slides' patches. And the latency
            split of the `--synthetic-patches` slide served by the runtime `auto` picks on a CPU
            node without torch (int8): the share of tissue segmentation + grid planning (goal
            < 10%).

Packages: params.yaml's patch settings (128 px at 1 um/px) and its demo student (resnet18 @ 112
px, centre-cropped from the 128-px patch: params.yaml's student section as it is), 512-d output,
and Retrain CLAM's `train_mil.folds` fold CLAM-SB heads (the ensemble a package ships), made by
`tests.packages.build_package` with the real export; the teacher package is the `brow` preset
(ViT-B/16 @ 224) in the student's place. Weights are random (nothing can be
downloaded): timings do not depend on them.
Absolute times mean little on a shared 2-core CPU; the ratio is the point. Prints one JSON object.
Usage: python benchmarks/serving.py [--synthetic-patches N] [--teacher-patches N] [--requests N]
                                   [--runtime-patches N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from _timing import runtime_rate

from efcm.config import PatchParams, params_from_dict
from efcm.inference import predict_slide
from efcm.limits import RuntimeSettings
from efcm.models.package import load_package
from efcm.runtimes import INT8, ONNX, Runtime, cosine_rows, cpu_flags, load_runtime
from efcm.runtimes.torch_runtime import TorchRuntime
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.packages
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
DIM = 512
GOAL_SPEEDUP = 5.0
GOAL_RATIO = 0.9  # a slide request's features step / the same runtime's model-only throughput
GOAL_PATCHING_SHARE = 0.1  # tissue segmentation + grid planning, of a 20,000-patch request
GOAL_INT8_SPEEDUP = 3.5
BATCH = 64  # the predictor's batch size
# the sizes the runtimes are measured at: student input px, patch px (at params.yaml's 1 um/px)
SIZES = {"112": (112, 128), "224": (224, 256)}


def demo_student(input_size: int | None = None) -> dict[str, Any]:
    """params.yaml's student (the demo's: ResNet-18 at 112 px, centre-cropped from 128-px
    patches), at `input_size` instead when given (cropped alike from SIZES' larger patches)."""
    student = dict(yaml.safe_load((ROOT / "params.yaml").read_text())["student"])
    return student if input_size is None else {**student, "input_size": input_size}


def build_package(
    out: Path,
    encoder: dict[str, Any],
    *,
    patch_size: int | None = None,
    runtimes: tuple[str, ...] = (),
) -> Path:
    """Retrain CLAM's package (params.yaml's fold count, CLAM-SB at its default size) with
    `encoder` as the student; `patch_size` px patches instead of params.yaml's (step the same);
    with `runtimes` (onnx, int8) carried too."""
    from tests import packages

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["student"] = encoder
    if patch_size:
        raw["patch"] = {**raw.get("patch", {}), "patch_size": patch_size, "step": patch_size}
    params = params_from_dict(raw)
    return packages.build_package(
        out,
        params,
        DIM,
        strategy="retrain",
        folds=params.train_mil.folds,
        clam={},
        runtimes=runtimes,
    )


def synthetic_slide(folder: Path, patches: int, pkg) -> tuple[Path, int]:
    """A synthetic slide with about `patches` patches: a probe slide gives the tissue density."""
    from efcm.config import PatchParams

    params = PatchParams.model_validate(pkg.meta["patch"])

    def count(path: Path) -> int:
        with open_slide(path) as s:
            return len(plan_patches(s, params).coords)

    folder.mkdir(parents=True, exist_ok=True)
    probe_side = 4096
    probe = folder / "probe.tif"
    write_slide(probe, SlideSpec(probe_side, probe_side, mpp=1.0, levels=3, seed=7))
    side = int(probe_side * math.sqrt(patches / max(count(probe), 1)))
    path = folder / f"synthetic_{patches}.tif"
    write_slide(path, SlideSpec(side, side, mpp=1.0, levels=4, seed=7))
    return path, count(path)


def slide_run(pkg, slide: Path, read_workers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    pred = predict_slide(pkg, slide, heatmap=True, read_workers=read_workers)
    total = time.perf_counter() - t0
    n = len(pred.attention)
    return {
        "patches": n,
        "seconds": {**pred.timings, "total": round(total, 3)},
        "features_ms_per_patch": round(1e3 * pred.timings["features"] / n, 3),
    }


def slide_patches(slide: Path, params: PatchParams) -> tuple[SlidePatches, float]:
    """The slide's patches as the predictor plans them, and the seconds the plan took."""
    t0 = time.perf_counter()
    with open_slide(slide) as s:
        plan = plan_patches(s, params)
    seconds = time.perf_counter() - t0
    g = plan.geometry
    coords = CoordsFile(plan.coords, g.patch_level, g.read_size, g.patch_size, str(slide))
    return SlidePatches(str(slide), coords), seconds


def read_all(patches: SlidePatches) -> list[np.ndarray]:
    """Every patch of the slide, in the predictor's batches, read into memory (one thread)."""
    try:
        n = len(patches)
        return [patches.read_batch(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
    finally:
        patches.close()


def runtimes_of(path: Path, threads: int) -> dict[str, Runtime | str]:
    """The runtimes under test for the package at `path` (a reason in place of one that cannot
    run here): torch FP32 as the engine runs it, torch with CPU bf16 autocast, onnx, int8."""
    out: dict[str, Runtime | str] = {
        "torch": TorchRuntime(load_package(path), threads=threads, cpu_bf16=False)
    }
    bf16 = TorchRuntime(load_package(path), threads=threads)  # bf16 where the export allows it
    if bf16.cpu_bf16:
        out["torch_bf16"] = bf16
    else:
        passed = bf16.meta.get("runtimes", {}).get("torch", {}).get("bf16", {}).get("passed")
        out["torch_bf16"] = (
            "the CPU has no native bf16 (avx512_bf16 / amx_bf16)"
            if passed
            else "the package's export did not pass bf16 parity"
        )
    out[ONNX] = load_runtime(path, ONNX, threads=threads)
    out[INT8] = load_runtime(path, INT8, threads=threads)
    return out


def _ms(rate: float) -> float:
    return round(1e3 / rate, 3)


def runtime_rows(
    path: Path, slides: dict[str, Path], settings: RuntimeSettings, threads: int
) -> dict[str, Any]:
    """Model-only and slide-request ms/patch of every runtime of the package at `path` on each
    of `slides`, with the INT8 (and ONNX) parity re-measured on their patches."""
    rts = runtimes_of(path, threads)
    params = PatchParams.model_validate(rts["torch"].meta["patch"])
    out: dict[str, Any] = {"slides": {}, "runtimes": {}}
    feats: dict[str, dict[str, np.ndarray]] = {}
    for name, slide in slides.items():
        batches = read_all(slide_patches(slide, params)[0])
        n = sum(len(b) for b in batches)
        out["slides"][name] = {"patches": n}
        feats[name] = {}
        for rname, rt in rts.items():
            row = out["runtimes"].setdefault(rname, {})
            if isinstance(rt, str):
                row["skipped"] = rt
                continue
            rate, feats[name][rname] = runtime_rate(rt, batches)
            pred = predict_slide(rt, slide, batch_size=BATCH, read_workers=settings.read_workers)
            slide_rate = n / pred.timings["features"]
            row[name] = {
                "model_ms_per_patch": _ms(rate),
                "slide_features_ms_per_patch": _ms(slide_rate),
                "slide_engine_model_ratio": round(slide_rate / rate, 3),
            }
    for rname, rt in rts.items():
        if not isinstance(rt, str):
            out["runtimes"][rname]["describe"] = rt.describe()
    out["parity"] = {
        r: parity(rts["torch"], rts[r], feats, r)
        for r in (ONNX, INT8, "torch_bf16")
        if not isinstance(rts[r], str)
    }
    return out


def parity(ref: Runtime, rt: Runtime, feats: dict[str, dict[str, np.ndarray]], name: str):
    """`rt` against torch FP32 on every benchmark slide: the minimum feature cosine over the
    patches, the largest class-probability difference over the slides (each served whole by
    both: its features, then its runtime's head), how many slides get the same label."""
    cos, diffs, same = [], [], 0
    for by_rt in feats.values():
        a, b = by_rt["torch"], by_rt[name]
        cos.append(float(cosine_rows(a, b).min()))
        pa, pb = ref.head(a)[0], rt.head(b)[0]
        diffs.append(float(np.abs(pa - pb).max()))
        same += int(pa.argmax() == pb.argmax())
    return {
        "feature_cosine_min": round(min(cos), 6),
        "max_prob_diff": round(max(diffs), 6),
        "same_label": f"{same}/{len(feats)}",
    }


def latency_split(pkg: Runtime, slide: Path, read_workers: int) -> dict[str, Any]:
    """A slide request's seconds per step and each step's share of the request."""
    run = slide_run(pkg, slide, read_workers)
    secs = run["seconds"]
    total = secs["total"]
    steps = {k: v for k, v in secs.items() if k != "total"}
    return {
        "runtime": pkg.name,
        "patches": run["patches"],
        "seconds": secs,
        "share": {k: round(v / total, 4) for k, v in steps.items()},
        "segmentation_and_grid_share": round(steps["patching"] / total, 4),
        "goal_segmentation_and_grid_share_max": GOAL_PATCHING_SHARE,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _bag() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2000, DIM)).astype(np.float32)


def _features_inputs(binary: bool) -> list[Any]:
    """The features request: a 2,000 x DIM FP32 bag (made once)."""
    from kserve import InferInput

    bag = _bag()
    inp = InferInput("features", list(bag.shape), "FP32")
    inp.set_data_from_numpy(bag, binary_data=binary)
    return [inp]


def request_latencies(
    package: Path,
    requests: int,
    log: Path,
    inputs: Any = _features_inputs,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`efcm serve package` in a subprocess (environment `env` added), and the p50/p99 in ms of
    `requests` requests over REST JSON, REST binary and gRPC, each request's inputs made by
    `inputs(binary)` (a list of kserve `InferInput`) within the timed call (encoding the request
    is part of a client's cost); one warm-up request each first."""
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferRequest, RESTConfig

    http_port, grpc_port = _free_port(), _free_port()
    efcm = Path(sys.executable).with_name("efcm")
    cmd = [
        str(efcm) if efcm.exists() else sys.executable,
        *([] if efcm.exists() else ["-m", "efcm.cli"]),
    ]
    cmd += ["serve", str(package), "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"efcm serve did not start:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        def made(binary: bool) -> InferRequest:
            return InferRequest("efcm", inputs(binary))

        async def timed(call) -> dict[str, float]:
            await call()  # warm-up
            ms = []
            for _ in range(requests):
                t0 = time.perf_counter()
                await call()
                ms.append(1e3 * (time.perf_counter() - t0))
            return {
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "n": requests,
            }

        async def run() -> dict[str, Any]:
            rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
            grpc = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=120)
            try:
                return {
                    "rest_json": await timed(
                        lambda: rest.infer(url, made(False), model_name="efcm")
                    ),
                    "rest_binary": await timed(
                        lambda: rest.infer(url, made(True), model_name="efcm")
                    ),
                    "grpc": await timed(lambda: grpc.infer(made(True))),
                }
            finally:
                await rest.close()
                await grpc.close()

        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def runtimes_section(
    work: Path, student_dir: Path, slides: dict[str, Path], settings: RuntimeSettings
) -> dict[str, Any]:
    """`runtime_rows` at each of SIZES (the demo's 112 px package is `student_dir`)."""
    threads = settings.threads or os.cpu_count() or 1
    out: dict[str, Any] = {}
    for size, (input_size, patch_size) in SIZES.items():
        path = student_dir
        if (input_size, patch_size) != SIZES["112"]:
            path = build_package(
                work / f"student_{size}",
                demo_student(input_size),
                patch_size=patch_size,
                runtimes=(ONNX, INT8),
            )
        rows = runtime_rows(path, slides, settings, threads)
        out[size] = {
            "student": f"resnet18 @ {input_size} px, centre-cropped from {patch_size}-px patches "
            "at 1 um/px (params.yaml's student transform)",
            "threads": threads,
            "read_workers": settings.read_workers,
            **rows,
            "speedups_model_only": speedups(rows, next(iter(slides))),
        }
    return out


def speedups(rows: dict[str, Any], slide: str) -> dict[str, float]:
    """Model-only speed of each runtime against torch FP32 channels_last, on `slide`."""
    rts = rows["runtimes"]
    base = rts["torch"][slide]["model_ms_per_patch"]
    return {
        f"{r}_vs_torch": round(base / rts[r][slide]["model_ms_per_patch"], 2)
        for r in ("torch_bf16", ONNX, INT8)
        if slide in rts[r]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-patches", type=int, default=20_000)
    ap.add_argument("--teacher-patches", type=int, default=300)
    ap.add_argument("--requests", type=int, default=20, help="per protocol (features bags)")
    ap.add_argument(
        "--runtime-patches",
        type=int,
        default=2000,
        help="128-px patches of the slide each runtime serves (1/4 as many 256-px ones at 224)",
    )
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="efcm-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EFCM_CACHE_DIR", str(work / "cache"))
    settings = RuntimeSettings.from_env()  # the server's runtime threads and slide readers

    student_dir = build_package(work / "student", demo_student(), runtimes=(ONNX, INT8))
    teacher_dir = build_package(work / "teacher", {"preset": "brow"})
    # torch FP32, as before the package carried a bf16 parity (the runtimes section has bf16)
    student = TorchRuntime(load_package(student_dir), threads=settings.threads, cpu_bf16=False)
    teacher = load_runtime(teacher_dir, "torch", threads=settings.threads)
    big, big_n = synthetic_slide(work / "big", args.synthetic_patches, student)
    small, small_n = synthetic_slide(work / "small", args.teacher_patches, student)
    mid, mid_n = synthetic_slide(work / "runtimes", args.runtime_patches, student)
    readers = settings.read_workers

    slides: dict[str, Any] = {}
    if SHARED_SLIDE.is_file():
        slides["CMU-1-Small-Region.svs"] = {
            "student": slide_run(student, SHARED_SLIDE, readers),
            "teacher": slide_run(teacher, SHARED_SLIDE, readers),
        }
    slides[f"synthetic_{big_n}_patches"] = {"student": slide_run(student, big, readers)}
    slides[f"synthetic_{small_n}_patches"] = {
        "student": slide_run(student, small, readers),
        "teacher": slide_run(teacher, small, readers),
    }
    speedups_teacher = {
        name: round(
            r["teacher"]["features_ms_per_patch"] / r["student"]["features_ms_per_patch"], 2
        )
        for name, r in slides.items()
        if "teacher" in r
    }

    bench_slides = {f"synthetic_{mid_n}_patches": mid}
    if SHARED_SLIDE.is_file():
        bench_slides["CMU-1-Small-Region.svs"] = SHARED_SLIDE
    runtimes = runtimes_section(work, student_dir, bench_slides, settings)
    real = runtimes["112"]
    ratio_slide = next(iter(bench_slides))
    exported = student.meta["runtimes"][INT8]["parity"]
    int8 = load_runtime(student_dir, INT8, threads=settings.threads)  # what `auto` serves, no torch

    result = {
        "benchmark": "serving",
        "machine": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(),
            "cpu_flags": sorted(
                cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
            ),
            "torch_threads": torch.get_num_threads(),
            "runtime_threads": settings.threads,
            "read_workers": settings.read_workers,
            "torch": torch.__version__,
            "onnxruntime": int8.describe()["onnxruntime"],
            "python": platform.python_version(),
        },
        "packages": {
            "student": student.meta["encoder"]["arch"]
            + f" @ {student.meta['encoder']['input_size']}",
            "teacher": teacher.meta["encoder"]["arch"]
            + f" @ {teacher.meta['encoder']['input_size']}",
            "patch": {k: student.meta["patch"][k] for k in ("patch_size", "target_mpp")},
            "feature_dim": DIM,
            "fold_members": student.package.n_members,
        },
        "slides": slides,
        "student_teacher_speedup": speedups_teacher,
        "goal_speedup_min": GOAL_SPEEDUP,
        "runtimes": runtimes,
        "int8_vs_torch_speedup": real["speedups_model_only"][f"{INT8}_vs_torch"],
        "onnx_vs_torch_speedup": real["speedups_model_only"][f"{ONNX}_vs_torch"],
        "bf16_vs_torch_speedup": real["speedups_model_only"].get("torch_bf16_vs_torch"),
        "goal_int8_vs_torch_speedup_min": GOAL_INT8_SPEEDUP,
        "int8_max_prob_diff": {
            "export": exported["max_prob_diff"],
            "benchmark_slides": real["parity"][INT8]["max_prob_diff"],
        },
        "int8_min_feature_cosine": {
            "export": exported["feature_cosine_min"],
            "benchmark_slides": real["parity"][INT8]["feature_cosine_min"],
        },
        "slide_engine_model_ratio": real["runtimes"][INT8][ratio_slide]["slide_engine_model_ratio"],
        "slide_engine_model_ratios": {
            size: {
                r: row[ratio_slide]["slide_engine_model_ratio"]
                for r, row in rows["runtimes"].items()
                if ratio_slide in row
            }
            for size, rows in runtimes.items()
        },
        "goal_slide_engine_model_ratio_min": GOAL_RATIO,
        "latency_split": {
            f"synthetic_{big_n}_patches": latency_split(int8, big, readers),
        },
        "features_requests": {
            "bag": [2000, DIM],
            "dtype": "FP32",
            **request_latencies(student_dir, args.requests, work / "server.log"),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

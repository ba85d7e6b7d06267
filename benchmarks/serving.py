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

Packages: params.yaml's patch settings (128 px at 1 um/px) and its demo student (resnet18 @ 112
px), 512-d output, and Retrain CLAM's `train_mil.folds` fold CLAM-SB heads (the ensemble a package
ships), made by `tests.packages.build_package` with the real export; the teacher package is the
`brow` preset (ViT-B/16 @ 224) in the student's place. Weights are random (nothing can be
downloaded): timings do not depend on them.
Absolute times mean little on a shared 2-core CPU; the ratio is the point. Prints one JSON object.
Usage: python benchmarks/serving.py [--synthetic-patches N] [--teacher-patches N] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
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

from efcm.config import params_from_dict
from efcm.inference import predict_slide
from efcm.runtimes import load_runtime
from efcm.slides.batch import plan_patches
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.packages
SHARED_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
DIM = 512
GOAL_SPEEDUP = 5.0


def build_package(out: Path, encoder: dict[str, Any]) -> Path:
    """Retrain CLAM's package (params.yaml's fold count, CLAM-SB at its default size) with
    `encoder` as the student."""
    from tests import packages

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["student"] = encoder
    params = params_from_dict(raw)
    return packages.build_package(
        out, params, DIM, strategy="retrain", folds=params.train_mil.folds, clam={}
    )


def synthetic_slide(folder: Path, patches: int, pkg) -> tuple[Path, int]:
    """A synthetic slide with about `patches` patches: a probe slide gives the tissue density."""
    from efcm.config import PatchParams

    params = PatchParams.model_validate(pkg.meta["patch"])

    def count(path: Path) -> int:
        with open_slide(path) as s:
            return len(plan_patches(s, params).coords)

    probe_side = 4096
    probe = folder / "probe.tif"
    write_slide(probe, SlideSpec(probe_side, probe_side, mpp=1.0, levels=3, seed=7))
    side = int(probe_side * math.sqrt(patches / max(count(probe), 1)))
    path = folder / f"synthetic_{patches}.tif"
    write_slide(path, SlideSpec(side, side, mpp=1.0, levels=4, seed=7))
    return path, count(path)


def slide_run(pkg, slide: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    pred = predict_slide(pkg, slide, heatmap=True)
    total = time.perf_counter() - t0
    n = len(pred.attention)
    return {
        "patches": n,
        "seconds": {**pred.timings, "total": round(total, 3)},
        "features_ms_per_patch": round(1e3 * pred.timings["features"] / n, 3),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_latencies(package: Path, requests: int, log: Path) -> dict[str, Any]:
    from kserve import (
        InferenceGRPCClient,
        InferenceRESTClient,
        InferInput,
        InferRequest,
        RESTConfig,
    )

    http_port, grpc_port = _free_port(), _free_port()
    efcm = Path(sys.executable).with_name("efcm")
    cmd = [
        str(efcm) if efcm.exists() else sys.executable,
        *([] if efcm.exists() else ["-m", "efcm.cli"]),
    ]
    cmd += ["serve", str(package), "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
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
        bag = np.random.default_rng(0).normal(size=(2000, DIM)).astype(np.float32)

        def request(binary: bool) -> InferRequest:
            inp = InferInput("features", list(bag.shape), "FP32")
            inp.set_data_from_numpy(bag, binary_data=binary)
            return InferRequest("efcm", [inp])

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
                        lambda: rest.infer(url, request(False), model_name="efcm")
                    ),
                    "rest_binary": await timed(
                        lambda: rest.infer(url, request(True), model_name="efcm")
                    ),
                    "grpc": await timed(lambda: grpc.infer(request(True))),
                }
            finally:
                await rest.close()
                await grpc.close()

        return {"bag": [2000, DIM], "dtype": "FP32", **asyncio.run(run())}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-patches", type=int, default=20_000)
    ap.add_argument("--teacher-patches", type=int, default=300)
    ap.add_argument("--requests", type=int, default=20, help="per protocol (features bags)")
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="efcm-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EFCM_CACHE_DIR", str(work / "cache"))

    student_dir = build_package(work / "student", {"preset": "resnet18", "input_size": 112})
    teacher_dir = build_package(work / "teacher", {"preset": "brow"})
    student, teacher = load_runtime(student_dir, "torch"), load_runtime(teacher_dir, "torch")
    big, big_n = synthetic_slide(work, args.synthetic_patches, student)
    small, small_n = synthetic_slide(work, args.teacher_patches, student)

    slides: dict[str, Any] = {}
    if SHARED_SLIDE.is_file():
        slides["CMU-1-Small-Region.svs"] = {
            "student": slide_run(student, SHARED_SLIDE),
            "teacher": slide_run(teacher, SHARED_SLIDE),
        }
    slides[f"synthetic_{big_n}_patches"] = {"student": slide_run(student, big)}
    slides[f"synthetic_{small_n}_patches"] = {
        "student": slide_run(student, small),
        "teacher": slide_run(teacher, small),
    }
    speedups = {
        name: round(
            r["teacher"]["features_ms_per_patch"] / r["student"]["features_ms_per_patch"], 2
        )
        for name, r in slides.items()
        if "teacher" in r
    }
    result = {
        "benchmark": "serving",
        "machine": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
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
        "student_teacher_speedup": speedups,
        "goal_speedup_min": GOAL_SPEEDUP,
        "features_requests": request_latencies(student_dir, args.requests, work / "server.log"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Which INT8 CPU backend the package ships: ONNX Runtime's static quantizer or OpenVINO with NNCF,
measured on the same student graph, calibration and evaluation patches. Prints one JSON object.

    python benchmarks/int8_backends.py --package runs/package --manifest data/demo/manifest.csv \
        --patches runs/patch

For each backend: model-only patches/s (batch 64, `--threads` threads, one process) in FP32 and
INT8, and the INT8 features' cosine to the FP32 ONNX features on held-out patches (the package's
parity rule wants >= 0.99 for every patch). ONNX Runtime's INT8 is quantized as
`efcm.training.runtimes.quantize_int8` does for the package (QDQ, per-channel 7-bit weights);
OpenVINO's with `nncf.quantize` defaults (and the MIXED preset). OpenVINO and NNCF are not EFCM
dependencies: without them (`pip install openvino nncf`) only ONNX Runtime is measured. Calibration
and evaluation patches are disjoint halves of patches spread over the manifest's slides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from efcm.io.manifest import read_manifest
from efcm.runtimes import cosine_rows, cpu_flags, has_vnni
from efcm.runtimes.onnx_runtime import ENCODER_INPUT, session
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import read_coords
from efcm.training.runtimes import quantize_int8

BATCH = 64


def patches_of(manifest: Path, patches_dir: Path, per_slide: int) -> np.ndarray:
    m = read_manifest(manifest)
    out = []
    for s in m.slides:
        coords_file = patches_dir / "patches" / f"{s.slide_id}.h5"
        if not coords_file.is_file():
            continue
        coords = read_coords(coords_file)
        sp = SlidePatches(s.uri, coords, m.base_dir)
        idx = np.unique(np.linspace(0, len(sp) - 1, min(len(sp), per_slide)).astype(int))
        out.append(sp.read_batch(idx))
        sp.close()
    return np.concatenate(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def rate(fn, x: np.ndarray, seconds: float) -> float:
    """Patches per second of `fn` on batch `x`, after one warm-up call."""
    fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return round(n / (time.perf_counter() - t0), 1)


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(cosine_rows(a, b).min()), 6)


def onnxruntime_figures(
    fp32: Path, calib: np.ndarray, held: np.ndarray, threads: int, seconds: float, tmp: Path
) -> tuple[dict[str, Any], np.ndarray]:
    int8 = tmp / "student_int8.onnx"
    quantize_int8(fp32, int8, calib)
    f, q = session(fp32, threads), session(int8, threads)

    def run(s):
        return lambda x: s.run(None, {ENCODER_INPUT: x})[0]

    ref = np.concatenate([run(f)(held[i : i + BATCH]) for i in range(0, len(held), BATCH)])
    got = np.concatenate([run(q)(held[i : i + BATCH]) for i in range(0, len(held), BATCH)])
    x = held[:BATCH]
    figures = {
        "version": ort.__version__,
        "fp32_patches_per_s": rate(run(f), x, seconds),
        "int8_patches_per_s": rate(run(q), x, seconds),
        "int8_min_feature_cosine": min_cos(got, ref),
    }
    return figures, ref


def openvino_figures(
    fp32: Path, calib: np.ndarray, held: np.ndarray, ref: np.ndarray, threads: int, seconds: float
) -> dict[str, Any]:
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        return {"skipped": f"not installed ({err}); pip install openvino nncf"}
    core = ov.Core()
    model = core.read_model(str(fp32))
    cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    data = nncf.Dataset([calib[i : i + BATCH] for i in range(0, len(calib), BATCH)])
    out: dict[str, Any] = {"version": ov.__version__, "nncf": nncf.__version__}
    f = core.compile_model(model, "CPU", cfg)
    x = held[:BATCH]
    out["fp32_patches_per_s"] = rate(lambda b: f(b)[0], x, seconds)
    for name, kw in (("default", {}), ("mixed", {"preset": nncf.QuantizationPreset.MIXED})):
        q = core.compile_model(nncf.quantize(model, data, subset_size=len(calib), **kw), "CPU", cfg)
        got = np.concatenate([q(held[i : i + BATCH])[0] for i in range(0, len(held), BATCH)])
        out[f"int8_{name}_patches_per_s"] = rate(lambda b, q=q: q(b)[0], x, seconds)
        out[f"int8_{name}_min_feature_cosine"] = min_cos(got, ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="runs/package")
    ap.add_argument("--manifest", default="data/demo/manifest.csv")
    ap.add_argument("--patches", default="runs/patch")
    ap.add_argument("--per-slide", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    px = patches_of(Path(args.manifest), Path(args.patches), args.per_slide)
    calib, held = px[::2], px[1::2]
    fp32 = Path(args.package) / "student.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        ortf, ref = onnxruntime_figures(fp32, calib, held, args.threads, args.seconds, Path(tmp))
    ovf = openvino_figures(fp32, calib, held, ref, args.threads, args.seconds)
    print(
        json.dumps(
            {
                "machine": {
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "vnni": has_vnni(),
                    "avx512_bf16": "avx512_bf16" in cpu_flags(),
                    "threads": args.threads,
                    "python": sys.version.split()[0],
                },
                "patches": {"calibration": len(calib), "held_out": len(held)},
                "onnxruntime": ortf,
                "openvino": ovf,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

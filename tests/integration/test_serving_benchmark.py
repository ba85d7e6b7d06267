"""benchmarks/serving.py at tiny sizes, so the script keeps working between its full runs: every
section runs (slides, runtimes at 112 and 224 px, the latency split, features requests) and its
JSON has the keys the issues read. Timings are read, never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serving.py"
RUNTIMES = ("torch", "torch_bf16", "onnx", "int8")


def test_the_serving_benchmark_runs_at_tiny_sizes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--synthetic-patches=120",
            "--teacher-patches=12",
            "--runtime-patches=120",
            "--requests=1",
            f"--keep={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)

    # the keys it had before the runtimes
    assert {"slides", "student_teacher_speedup", "packages", "machine"} <= r.keys()
    assert {"rest_json", "rest_binary", "grpc"} <= r["features_requests"].keys()
    for runs in r["slides"].values():
        assert runs["student"]["patches"] > 0 and runs["student"]["features_ms_per_patch"] > 0

    # every runtime on the same slides, at both sizes, the 224-px slide cut into fewer patches
    ratio_slide = next(k for k in r["runtimes"]["112"]["slides"] if k.startswith("synthetic"))
    small = r["runtimes"]["112"]["slides"][ratio_slide]["patches"]
    assert 0 < r["runtimes"]["224"]["slides"][ratio_slide]["patches"] < small
    for size in ("112", "224"):
        rows = r["runtimes"][size]["runtimes"]
        assert set(rows) == set(RUNTIMES)
        for name in RUNTIMES:
            if "skipped" in rows[name]:
                assert name == "torch_bf16", rows[name]
                continue
            row = rows[name][ratio_slide]
            assert row["model_ms_per_patch"] > 0 and row["slide_features_ms_per_patch"] > 0
            assert math.isclose(
                row["slide_engine_model_ratio"],
                row["model_ms_per_patch"] / row["slide_features_ms_per_patch"],
                rel_tol=0.02,
            )
        assert rows["torch"]["describe"]["autocast"] is None  # the engine's FP32 path
        # ONNX FP32 is the same model: the parity threshold, on the benchmark's patches
        assert r["runtimes"][size]["parity"]["onnx"]["feature_cosine_min"] >= 0.999
    ratios = r["slide_engine_model_ratios"]["112"]
    assert r["slide_engine_model_ratio"] == ratios["int8"]

    for key in ("int8_vs_torch_speedup", "onnx_vs_torch_speedup"):
        assert r[key] > 0
    assert r["bf16_vs_torch_speedup"] is None or r["bf16_vs_torch_speedup"] > 0
    for key in ("int8_max_prob_diff", "int8_min_feature_cosine"):
        assert set(r[key]) == {"export", "benchmark_slides"}
    assert -1 <= r["int8_min_feature_cosine"]["benchmark_slides"] <= 1

    (split,) = r["latency_split"].values()
    assert split["runtime"] == "int8"
    assert {"download", "patching", "features", "clam", "heatmap"} <= split["share"].keys()
    assert math.isclose(sum(split["share"].values()), 1.0, abs_tol=0.02)
    assert split["segmentation_and_grid_share"] == split["share"]["patching"]

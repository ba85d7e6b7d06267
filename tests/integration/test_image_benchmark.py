"""benchmarks/image.py at tiny sizes (`--quick`: a vit_tiny teacher with the RETFound preset's
pooling, the tiny params' student, 8 demo fundus images), so the script keeps working between its
full runs: every section runs, its JSON has the keys the issue reads, and the speedups are the
ratios of the rates it measured. Timings are read, never asserted."""

from __future__ import annotations

import statistics

import pytest
import yaml

from tests.benchmark_script import run_quick
from tests.conftest import tiny_image_params_dict

pytestmark = pytest.mark.integration


def test_the_image_benchmark_runs_at_tiny_sizes(tmp_path):
    params = tmp_path / "params.yaml"
    data = tiny_image_params_dict()
    data["distill"]["method"] = "fpd"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    r = run_quick("image.py", tmp_path, f"--params={params}")

    models = r["models"]
    assert set(models) == {"teacher", "vfd", "fpd"}
    teacher = models["teacher"]
    assert (teacher["preset"], teacher["arch"]) == ("retfound", "vit_tiny_patch16_224")
    assert models["vfd"]["arch"] == models["fpd"]["arch"] == "test_resnet"  # the params' student
    for m in models.values():
        assert m["input_size"] == r["data"]["image_size"] == 64
        assert m["feature_dim"] == 192  # vit_tiny's width: the students predict the teacher's
        assert m["params"] > 0 and m["gflops_per_image"] > 0
        assert len(m["forward_images_per_s_runs"]) == r["repeats"]["forward"] == 2
        assert len(m["end_to_end_images_per_s_runs"]) == r["repeats"]["end_to_end"] == 1
        assert m["forward_images_per_s"] == pytest.approx(
            statistics.median(m["forward_images_per_s_runs"]), abs=1e-3
        )
        assert m["forward_ms_per_image"] == pytest.approx(
            1000 / m["forward_images_per_s"], rel=1e-3
        )

    # the headline is the student distill.method names, its rate over the teacher's
    assert r["student"] == "fpd"
    for name in ("vfd", "fpd"):
        s = r["speedups"][name]
        assert s["forward"] == pytest.approx(
            models[name]["forward_images_per_s"] / teacher["forward_images_per_s"], abs=2e-3
        )
        assert s["end_to_end"] == pytest.approx(
            models[name]["end_to_end_images_per_s"] / teacher["end_to_end_images_per_s"], abs=2e-3
        )
        rounds = [
            a / b
            for a, b in zip(
                models[name]["forward_images_per_s_runs"],
                teacher["forward_images_per_s_runs"],
                strict=True,
            )
        ]
        assert s["forward_paired_runs"] == pytest.approx(rounds, rel=1e-2)
        assert s["forward_paired"] == pytest.approx(statistics.median(rounds), rel=1e-2)
    assert r["student_teacher_speedup"] == r["speedups"]["fpd"]["forward"]
    assert r["student_teacher_speedup_paired"] == r["speedups"]["fpd"]["forward_paired"]
    assert r["student_teacher_speedup_end_to_end"] == r["speedups"]["fpd"]["end_to_end"]
    assert r["goals"]["speedup_min"] == 15.0
    assert r["goals_met"]["speedup"] == (r["student_teacher_speedup"] >= 15.0)

    per = r["per_image_ms"]
    assert per["images"] == r["data"]["images"] == 16
    assert per["formats"] == [".jpg", ".png"]  # the demo writes both
    assert per["decode_ms"] > 0 and per["preprocess_ms"] > 0
    assert per["forward_ms"]["teacher"] == teacher["forward_ms_per_image"]

    # the endpoint: an image package of the fpd student, served by each runtime it carries
    ep = r["endpoint"]
    assert ep["image"]["file"].endswith(".png") and ep["image_px"] == max(ep["image"]["px"])
    assert ep["package"] == "retrain fold heads (2) on the fpd student"
    carried = ["torch", "onnx"] + (["int8"] if ep["int8_refused"] is None else [])
    assert list(ep["runtimes"]) == carried
    for runs in ep["runtimes"].values():
        assert set(runs) == {"rest_json", "rest_binary", "grpc"}
        for t in runs.values():
            assert t["n"] == 3 and 0 < t["p50_ms"] <= t["p99_ms"]
    assert ep["p50_runtime"] == carried[-1] and ep["p50_protocol"] == "grpc"
    assert ep["p50_latency_ms"] == ep["runtimes"][carried[-1]]["grpc"]["p50_ms"]
    assert r["machine"]["cpus_usable"] >= 1
    assert len(r["machine"]["loadavg_start"]) == len(r["machine"]["loadavg_end"]) == 3

"""The cohort scale model of benchmarks/scale.py: pure arithmetic, checked on its properties (GPUs
speed up GPU-bound phases only, CPU-bound phases need CPUs, a serial phase pays both, storage adds
up, the store pays off exactly when slide reads are slower than decoding)."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


scale = _load_scale()
FAST = scale.CpuRates(decode=1e9, encode=1e9, slide_seq_read=1e9, slide_random_read=1e9)
SLOW = scale.CpuRates(decode=10.0, encode=10.0, slide_seq_read=10.0, slide_random_read=10.0)
PARALLEL = ("teacher_extract", "distill", "student_extract")  # the phases on every GPU


def hours(a, rates, path="store"):
    return {k: p["hours"] for k, p in scale.cohort_phases(a, rates, path).items()}


def test_doubling_gpus_and_cpus_halves_the_gpu_bound_phases():
    a = scale.Assumptions()
    b = replace(a, gpus=2 * a.gpus, cpus=2 * a.cpus)
    before, after = hours(a, FAST), hours(b, FAST)
    for name in PARALLEL:
        assert scale.cohort_phases(a, FAST, "store")[name]["bound"] == "gpu"
        assert math.isclose(after[name], before[name] / 2, rel_tol=1e-9), name
    # ETC runs on pipeline.etc_gpus (one pod): more GPUs on the node do not touch it
    assert after["etc_reextract"] == before["etc_reextract"]
    # ... more ETC processes do: its re-extraction has no all-reduce, its training one a step
    half = replace(a, etc_gpus=a.etc_gpus // 2)
    assert hours(half, FAST)["etc_reextract"] == pytest.approx(2 * before["etc_reextract"])
    assert hours(half, FAST)["etc_train"] == pytest.approx(2 * before["etc_train"])
    one = replace(a, etc_gpus=1)
    ratio = hours(one, FAST)["etc_train"] / before["etc_train"]
    assert ratio == pytest.approx(a.etc_gpus * a.ddp_efficiency)


def test_a_cpu_bound_phase_needs_more_cpus_not_more_gpus():
    a = scale.Assumptions()
    more_gpus = replace(a, gpus=2 * a.gpus)  # same CPUs, and one more driving core per GPU
    both = replace(a, gpus=2 * a.gpus, cpus=2 * a.cpus)
    before = hours(a, SLOW)
    for name in PARALLEL:
        assert scale.cohort_phases(a, SLOW, "store")[name]["bound"] == "cpu"
        assert hours(more_gpus, SLOW)[name] >= before[name], name
        assert math.isclose(hours(both, SLOW)[name], before[name] / 2, rel_tol=1e-9), name


def test_a_cpu_bound_rate_is_the_loader_cores_over_the_cost_per_patch():
    a = scale.Assumptions(gpus=8, cpus=64, loop_cores_per_gpu=1)
    p = scale.cohort_phases(a, SLOW, "store")["student_extract"]
    assert p["patches_per_s"] == pytest.approx(56 * 10.0)  # (64 / 8 - 1) x 8 cores x 10/s


def test_a_serial_phase_pays_gpu_and_cpu_time_one_after_the_other():
    p = scale.phase(3600.0, gpu_s=0.001, cpu_s=0.003, gpus=2, loader_cores=100, overlap=False)
    assert p["bound"] == "serial"
    assert p["hours"] == pytest.approx(3600 * 0.004 / 2 / 3600)
    q = scale.phase(3600.0, gpu_s=0.001, cpu_s=0.003, gpus=2, loader_cores=100, overlap=True)
    assert q["bound"] == "gpu" and q["hours"] == pytest.approx(3600 * 0.001 / 2 / 3600)


def test_ddp_efficiency_slows_the_gpu_bound_distillation_only():
    a = scale.Assumptions(ddp_efficiency=1.0)
    b = replace(a, ddp_efficiency=0.5)
    assert hours(b, FAST)["distill"] == pytest.approx(2 * hours(a, FAST)["distill"])
    assert hours(b, FAST)["student_extract"] == hours(a, FAST)["student_extract"]


def test_the_store_pays_off_exactly_when_slide_reads_are_slower_than_decoding():
    a = scale.Assumptions()
    slow_slides = scale.CpuRates(
        decode=2000, encode=2000, slide_seq_read=500, slide_random_read=300
    )
    store, slides = hours(a, slow_slides, "store"), hours(a, slow_slides, "slides")
    assert store["distill"] < slides["distill"]
    assert "stage_slides" in slides and "stage_slides" not in store
    same = scale.CpuRates(decode=300, encode=2000, slide_seq_read=300, slide_random_read=300)
    assert hours(a, same, "store")["distill"] == pytest.approx(hours(a, same, "slides")["distill"])


def test_writing_the_store_costs_the_encode_and_the_fidelity_forwards():
    a = scale.Assumptions(fidelity_patches=0)
    rates = scale.CpuRates(decode=100, encode=100, slide_seq_read=100, slide_random_read=100)
    model = scale.cohort_model(a, rates, 10_000)
    # CPU-bound at these rates, with and without the store: read + encode per patch is twice
    # the read alone
    assert model["teacher_extract_overhead_ratio"] == pytest.approx(2.0)
    gpu_bound = scale.cohort_model(replace(a, fidelity_patches=100), FAST, 10_000)
    # 100 extra teacher forwards per 10,000-patch slide
    assert gpu_bound["teacher_extract_overhead_ratio"] == pytest.approx(1.01)


def test_the_fidelity_check_is_at_most_five_percent_of_a_slide():
    assert scale.fidelity_forwards(16, 10_000) == 16
    assert scale.fidelity_forwards(16, 71) == 3  # a demo slide: 71 // 20
    assert scale.fidelity_forwards(16, 5) == 1
    assert scale.fidelity_forwards(0, 10_000) == 0


def test_storage_adds_up():
    a = scale.Assumptions(slides=100, patches_per_slide=1000, slide_gb=2.0, teacher_dim=768)
    tb = scale.cohort_storage(a, 20_000.0)
    assert tb["slides_tb"] == pytest.approx(0.2)
    assert tb["store_tb"] == pytest.approx(100 * 1000 * 20_000 / 1e12)
    assert tb["teacher_features_tb"] == pytest.approx(100 * 1000 * 768 * 4 / 1e12)
    parts = ("slides_tb", "store_tb", "teacher_features_tb", "student_features_tb")
    assert tb["total_tb"] == pytest.approx(sum(tb[k] for k in parts))
    assert tb["total_without_store_tb"] == pytest.approx(tb["total_tb"] - tb["store_tb"])
    half = scale.cohort_storage(replace(a, float16=True), 20_000.0)
    assert half["teacher_features_tb"] == pytest.approx(tb["teacher_features_tb"] / 2)


def test_the_model_prints_every_assumption_and_both_paths():
    a = scale.Assumptions()
    out = scale.cohort_model(a, FAST, 15_000.0)
    assert out["assumptions"]["gpus"] == 8 and out["assumptions"]["slides"] == 10_000
    assert out["patches"] == 10_000 * 10_000
    for path in ("store", "slides", "store_with_etc_loader_workers"):
        phases = out[path]["phases"]
        assert out[path]["total_hours"] == pytest.approx(
            sum(p["hours"] for p in phases.values()), abs=0.05
        )
    assert out["store_with_etc_loader_workers"]["total_hours"] <= out["store"]["total_hours"]
    # ETC reads its bags one at a time: well under a GB, not the cohort's features
    assert out["etc_bags_ram_gb"] < 1
    assert out["etc_scratch_tb"] == pytest.approx(1e8 * a.student_dim * 4 / 1e12, abs=1e-3)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"gpus": 0}, "gpus"),
        ({"cpus": 8, "gpus": 8}, "cpus=8"),
        ({"distill_val_fraction": 1.0}, "distill_val_fraction"),
        ({"etc_gpus": 9}, "etc_gpus"),
        ({"etc_loader": "threads"}, "etc_loader"),
    ],
)
def test_impossible_assumptions_are_refused_by_name(change, word):
    with pytest.raises(ValueError, match=word):
        scale.Assumptions(**change)


def test_unmeasured_rates_and_sizes_are_refused():
    with pytest.raises(ValueError, match="decode"):
        scale.CpuRates(decode=0.0, encode=1, slide_seq_read=1, slide_random_read=1)
    with pytest.raises(ValueError, match="bytes per patch"):
        scale.cohort_storage(scale.Assumptions(), 0.0)
    with pytest.raises(ValueError, match="path"):
        scale.cohort_phases(scale.Assumptions(), FAST, "gcs")

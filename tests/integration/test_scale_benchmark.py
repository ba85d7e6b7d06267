"""benchmarks/scale.py at tiny sizes (`--quick`, the tests' tiny params), so the script keeps
working between its full runs: every section runs and its JSON has the keys the issue reads.
Timings are read, never asserted."""

from __future__ import annotations

import pytest

from tests.benchmark_script import run_quick

pytestmark = pytest.mark.integration


def test_the_scale_benchmark_runs_at_tiny_sizes(tiny_params_file, tmp_path):
    r = run_quick("scale.py", tmp_path, f"--params={tiny_params_file}")

    assert r["data"]["patches"] == 2 * 24  # --quick: 2 slides, 24 patches each
    (write,) = r["write"].values()
    assert write["patches"] == r["data"]["patches"]
    for key in ("extract_alone_patches_per_s", "extract_with_store_patches_per_s"):
        assert write[key] > 0
    assert r["shard_write_overhead_ratio"] == write["overhead_ratio"] > 0
    assert r["read"]["patches"] == r["data"]["patches"]
    assert r["shard_read_over_slide_read"] > 0
    assert set(r["decode_patches_per_s_per_core"]) == {"224", "64"}
    sizes = r["store_bytes_per_patch"]
    # a tar member is a 512-byte header and the data padded to 512 bytes
    assert (
        sizes["demo_synthetic"]["shard_bytes_per_patch"]
        > sizes["demo_synthetic"]["image_bytes_per_patch"] + 512
    )
    assert sizes["real_224_measured"] > sizes["real_224_jpeg_only"] > 0
    assert r["ddp"] is None and r["ddp_reason"]  # --quick does not run the DDP benchmark

    model = r["model"]
    # the model's store read rate is the measured stream + decode at 224 px, not the codec alone
    rates = model["cpu_rates_per_core"]
    assert rates["decode"] == pytest.approx(r["per_core"]["stream_decode_224"], rel=1e-3)
    assert rates["slide_random_read"] == pytest.approx(
        r["per_core"]["slide_random_read_224_tile_cache_off"], rel=1e-3
    )
    assert model["assumptions"]["slides"] == 10_000 and model["assumptions"]["gpus"] == 8
    assert model["assumptions"]["distill_epochs"] == 1  # from the params given
    for path in ("store", "slides"):
        assert model[path]["total_hours"] > 0
        assert {"teacher_extract", "distill", "student_extract", "etc_train", "etc_reextract"} <= (
            model[path]["phases"].keys()
        )
    assert model["storage"]["store_tb"] == pytest.approx(
        1e8 * sizes["real_224_measured"] / 1e12, rel=1e-3
    )

"""The patch-shard store through the stages (efcm.stages, as dvc.yaml runs them): teacher
extraction writes it, and every later stage reads its pixels from it: with the slides moved away
right after the teacher's extraction, distillation (each method), student extraction, ETC,
evaluation (with localisation) and the export still run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from efcm import stages
from efcm.config import for_stage, params_from_dict
from efcm.io.manifest import read_manifest
from efcm.io.status import read_status
from efcm.io.store import read_index
from efcm.slides.patches import SlidePatches, StorePatches
from efcm.slides.patching import read_coords
from tests.conftest import run_demo_pipeline, tiny_params_dict

pytestmark = pytest.mark.integration


def _copy_dataset(manifest: Path, dest: Path) -> Path:
    """The tiny dataset copied to `dest` (its slides can then be moved away)."""
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def _params(**store):
    raw = tiny_params_dict()
    raw["store"] = {**raw["store"], "enabled": True, **store}
    raw["mil"] = {**raw["mil"], "strategies": ["reuse", "retrain", "etc"]}
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def store_run(tiny_dataset, tmp_path_factory):
    """The demo pipeline with the store on (JPEG q90); the slides are moved away right after the
    teacher's extraction, so any later stage that opens one fails."""
    work = tmp_path_factory.mktemp("store_run")
    manifest = _copy_dataset(tiny_dataset, work / "data")
    slides, hidden = work / "data" / "slides", work / "hidden-slides"

    def hide_slides() -> None:
        slides.rename(hidden)

    w = run_demo_pipeline(
        manifest, work / "runs", _params(), ("reuse", "retrain", "etc"), hide_slides
    )
    w["manifest"], w["hidden"] = manifest, hidden
    return w


def test_no_stage_after_the_teacher_extraction_opens_a_slide(store_run):
    w = store_run
    assert w["hidden"].is_dir() and not (w["manifest"].parent / "slides").exists()
    assert (w["package"] / "model.json").is_file()
    assert "patch-shard store" in (w["package"] / "model.json").read_text()
    # evaluation with localisation: the slide widths come from the coords files
    params = for_stage(_params(), "evaluate")
    out = stages.evaluate(
        w["teacher_mil"],
        w["strategies"],
        w["patch"].parent / "evaluate-loc",
        params,
        manifest=w["manifest"],
        patches_dir=w["patch"],
        masks_dir=w["manifest"].parent / "masks",
    )
    assert out  # the table was written
    rows = read_status(w["extract_student"] / "status.csv")
    assert {r["status"] for r in rows} == {"ok"}
    # the status of the teacher's extraction reports each slide's fidelity
    teacher = read_status(w["extract_teacher"] / "status.csv")
    cosines = [float(r["store_cosine"]) for r in teacher if r["status"] == "ok"]
    assert cosines and min(cosines) > 0.95


def test_without_the_store_the_same_stage_needs_the_slides(store_run, tmp_path):
    """The check above can fail: with the store off, student extraction opens the (gone) slides
    and reports every slide unreadable."""
    w = store_run
    raw = tiny_params_dict()
    params = for_stage(params_from_dict(raw), "extract")
    with pytest.raises(Exception, match="slide"):
        stages.extract(
            w["manifest"],
            w["patch"],
            tmp_path / "student",
            params,
            encoder="student",
            student=w["distill"],
        )


def test_png_store_pixels_are_the_slides_pixels(tiny_dataset, tmp_path):
    params = _params(format="png")
    manifest = read_manifest(tiny_dataset)
    stages.patch(tiny_dataset, tmp_path / "patch", for_stage(params, "patch"))
    stages.extract(
        tiny_dataset, tmp_path / "patch", tmp_path / "t", for_stage(params, "extract"),
        encoder="teacher",
    )  # fmt: skip
    entry = manifest.slides[0]
    coords = read_coords(tmp_path / "patch" / "patches" / f"{entry.slide_id}.h5")
    from_slide = SlidePatches(entry.uri, coords, manifest.base_dir).read_batch(
        range(len(coords.coords))
    )
    stored = StorePatches(tmp_path / "t" / "store", entry.slide_id, coords)
    assert np.array_equal(stored.read_batch(range(len(stored))), from_slide)
    idx = read_index(tmp_path / "t" / "store", entry.slide_id)
    assert idx.extra["fidelity"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    # a rerun reuses the slide's features and shard; a removed index redoes the slide
    before = (tmp_path / "t" / "store" / f"{entry.slide_id}.tar").stat().st_mtime_ns
    (tmp_path / "t" / "store" / f"{manifest.slides[1].slide_id}.h5").unlink()
    rows = stages.extract(
        tiny_dataset, tmp_path / "patch", tmp_path / "t", for_stage(params, "extract"),
        encoder="teacher",
    )  # fmt: skip
    reasons = {r["slide_id"]: r["reason"] for r in rows}
    assert reasons[entry.slide_id] == "already done"
    assert reasons[manifest.slides[1].slide_id] != "already done"
    assert (tmp_path / "t" / "store" / f"{entry.slide_id}.tar").stat().st_mtime_ns == before


@pytest.mark.parametrize("method", ["fpd", "mcm"])
def test_every_method_distils_from_the_store(store_run, method, tmp_path):
    """FPD pairs and MCM-KD windows stream from the store too (the slides are still gone)."""
    w = store_run
    raw = tiny_params_dict()
    raw["store"] = {**raw["store"], "enabled": True}
    raw["distill"] = {**raw["distill"], "method": method, "mcm": {"window": 2, "min_valid": 0.5}}
    metrics = stages.distill(
        w["manifest"],
        w["patch"],
        w["extract_teacher"],
        tmp_path / method,
        for_stage(params_from_dict(raw), "distill"),
    )
    assert metrics["method"] == method
    assert metrics["history"][-1]["items_seen"] == metrics["items_per_epoch"] > 0
    assert (tmp_path / method / "student.pt").is_file()

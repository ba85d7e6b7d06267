"""The Kubeflow pipeline (kfp.local) with the patch-shard store on, against the same pipeline
reading the slides: the 6 tiny slides in 2 shards. With the store, the teacher-extraction shards
are the last steps that open a slide (every open of a slide file is watched with inotify, from
any process); distillation, the student's sharded extraction, ETC and the export read the store.
The store's shards are written to a gs:// prefix (the GCS emulator; `store.uri`), as on a cluster:
the teacher-features artifact that the later steps take as input holds the indexes only, and they
read the pixels by URI. The run's package and metrics are compared with the slide path's within
stated tolerances."""

import json
from pathlib import Path

import pytest

from efcm import registry
from efcm.io.manifest import read_manifest
from efcm.io.status import read_status
from efcm.io.store import read_index
from tests.file_opens import watch_opens
from tests.integration.test_kfp_local import _outputs, _run, _runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The two runs see the training items in another order (a stream through a shuffle buffer vs a
# global permutation), so their students differ as two seeds would: the distilled student's
# validation cosine is compared within 0.05, and each student row's AUROC within 0.25 (the tiny
# demo's 3 test slides per class make AUROC steps of 1/9).
VAL_COSINE_TOL = 0.05
AUC_TOL = 0.25
MIN_STORE_COSINE = 0.99  # JPEG q90 at the demo's patch size (measured: about 0.9999)


def _finished(out: dict[str, Path], task: str) -> list[float]:
    """The `finished` times the ParallelFor iterations of `task` recorded in their metadata."""
    times = []
    for key, path in out.items():
        if "-iteration-" in key and key.endswith(f"/{task}/executor_output.json"):
            arts = json.loads(path.read_text())["artifacts"]
            (art,) = next(iter(arts.values()))["artifacts"]
            times.append(art["metadata"]["finished"])
    return times


def test_with_the_store_no_slide_is_opened_after_the_teacher_extraction_shards(
    local_kfp, tiny_dataset, gcs_bucket
):
    from pipelines.pipeline import build_pipeline

    pipeline = build_pipeline(parallelism=2)
    gate = {"max_auc_drop": 1.0, "min_auc": 0.0}
    _run(pipeline, tiny_dataset, deploy=gate)  # the slide path
    slides_dir = tiny_dataset.parent / "slides"
    root = gcs_bucket.uri("pipeline-root/store")
    names = {Path(s.uri).name for s in read_manifest(tiny_dataset).slides}
    with watch_opens(slides_dir) as opens:
        _run(pipeline, tiny_dataset, deploy=gate, store={"enabled": True, "uri": root})
    slide_run, store_run = (_outputs(r) for r in _runs(local_kfp))

    # the teacher's extraction (per shard, cached patches) opened the slides, and nothing after
    teacher_done = _finished(store_run, "extract")
    assert len(teacher_done) == 2, sorted(store_run)
    slide_opens = [(t, n) for t, n in opens if n in names]
    assert {n for _, n in slide_opens} == names  # the watch works: every slide was read
    late = [(t - max(teacher_done), n) for t, n in slide_opens if t > max(teacher_done)]
    assert late == [], f"slides opened after the teacher extraction finished: {late}"
    # ...while the steps after it ran in this run (not from the cache) and read pixels
    assert {"distill/student_model", "export/package"} <= set(store_run)
    assert len([k for k in store_run if k.endswith("/extract-2/features")]) == 2
    assert len([k for k in store_run if k.endswith("strategy/strategy")]) == 3

    # the store: one shard per slide, an object under `root`; the gathered teacher features
    # (the later steps' input artifact) hold each shard's index, naming it by URI, and no pixels
    merged = [v for k, v in store_run.items() if k.startswith("gather") and (v / "store").is_dir()]
    (teacher,) = merged
    ids = sorted(s.slide_id for s in read_manifest(tiny_dataset).slides)
    objects = {b.name: b.size for b in gcs_bucket.client.list_blobs(gcs_bucket.name)}
    assert sorted(objects) == [f"pipeline-root/store/{s}.tar" for s in ids]
    assert list((teacher / "store").glob("*.tar")) == []
    assert sorted(p.stem for p in (teacher / "store").glob("*.h5")) == ids
    for s in ids:
        idx = read_index(teacher / "store", s)
        assert (
            str(idx.shard) == f"{root}/{s}.tar"
            and idx.shard_bytes == objects[f"pipeline-root/store/{s}.tar"]
        )
    index_bytes = sum(p.stat().st_size for p in (teacher / "store").iterdir())
    assert index_bytes < sum(objects.values()), (index_bytes, objects)
    cosines = [float(r["store_cosine"]) for r in read_status(teacher / "status.csv")]
    assert min(cosines) >= MIN_STORE_COSINE, cosines

    # the store run against the slide run
    def metrics(out):
        return json.loads((out["evaluate/evaluation"] / "metrics.json").read_text())

    m_slide, m_store = metrics(slide_run), metrics(store_run)
    t = registry.TEACHER_ROW
    assert m_store[t]["auc"] == m_slide[t]["auc"]  # the teacher's path reads no store pixels
    for row in m_slide:
        if registry.is_student_row(row):
            assert abs(m_store[row]["auc"] - m_slide[row]["auc"]) <= AUC_TOL, row

    def distilled(out):
        return json.loads((out["distill/student_model"] / "metrics.json").read_text())

    d_slide, d_store = distilled(slide_run), distilled(store_run)
    assert d_store["items_per_epoch"] == d_slide["items_per_epoch"]
    for h in d_store["history"]:
        assert h["items_seen"] == d_store["items_per_epoch"]
    gap = abs(d_store["val_after"]["val_cosine"] - d_slide["val_after"]["val_cosine"])
    assert gap <= VAL_COSINE_TOL, gap

    meta = {
        k: json.loads((out["export/package"] / "model.json").read_text())
        for k, out in (("slide", slide_run), ("store", store_run))
    }
    for key in ("strategy", "row", "classes", "files", "feature_dim"):
        assert meta["store"][key] == meta["slide"][key], key
    assert "patch-shard store" in meta["store"]["runtimes"]["int8"]["parity"]["pixels"]
    assert meta["slide"]["runtimes"]["int8"]["parity"]["pixels"] == "read from the slides"

"""Unlabelled slides: valid in a manifest, used by the label-free stages (patch, extract, distill),
left out, and counted, by the slide-level ones (splits, train-mil, evaluation)."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from efcm.config import params_from_dict
from efcm.io.dataset import resolve_dataset, select_shard
from efcm.io.manifest import Manifest, SlideEntry, read_manifest, write_manifest
from efcm.training.mil import make_splits
from tests.conftest import tiny_params_dict

CLASSES = ("normal", "tumour")


def _write(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "case_id", "uri", "label"])
        w.writerows(rows)
    return path


def test_an_empty_label_is_valid_and_marks_an_unlabelled_slide(tmp_path):
    path = _write(
        tmp_path / "m.csv",
        [("a", "c1", "a.tif", "tumour"), ("b", "c2", "b.tif", ""), ("c", "c3", "c.tif", " ")],
    )
    m = read_manifest(path, CLASSES)
    assert [s.slide_id for s in m.slides] == ["a", "b", "c"]  # every slide is kept
    assert m.unlabelled == ["b", "c"]
    assert m.labels(CLASSES) == {"a": 1}  # labelled slides only


def test_an_unknown_label_is_an_error_naming_the_slide_file_and_classes(tmp_path):
    path = _write(tmp_path / "m.csv", [("a", "c1", "a.tif", "tumour"), ("b", "c2", "b", "cancer")])
    with pytest.raises(ValueError) as err:
        read_manifest(path, CLASSES)
    msg = str(err.value)
    assert str(path) in msg and "'cancer' of b" in msg and "['normal', 'tumour']" in msg


def test_labels_refuse_a_label_outside_the_classes_naming_the_slide(tmp_path):
    m = read_manifest(_write(tmp_path / "m.csv", [("a", "c1", "a.tif", "cancer")]))  # no classes
    with pytest.raises(ValueError, match="'cancer' of a is not one of"):
        m.labels(CLASSES)


def _cohort(n_cases: int = 6) -> list[SlideEntry]:
    return [
        SlideEntry(f"s{c}", f"case{c}", "x", CLASSES[c % 2]) for c in range(n_cases)
    ]  # 3 normal and 3 tumour cases, one slide each


def test_splits_leave_unlabelled_slides_out_and_record_them():
    extra = [
        SlideEntry("u_alone", "case_u", "x", ""),  # a case with no label at all
        SlideEntry("u_mixed", "case1", "x", ""),  # beside the tumour slide s1 of case1
    ]
    splits = make_splits(Manifest(None, (*_cohort(), *extra)), CLASSES, 2, 0.34, seed=0)
    assert splits["unlabelled"] == ["u_alone", "u_mixed"]
    used = {s for f in splits["folds"] for part in f.values() for s in part}
    assert used == {f"s{c}" for c in range(6)}  # s1 keeps case1's label; u_mixed is left out
    tested = sorted(s for f in splits["folds"] for s in f["test"])
    assert tested == sorted(used)
    # the unlabelled slides change nothing in the folds of the labelled ones
    plain = make_splits(Manifest(None, tuple(_cohort())), CLASSES, 2, 0.34, seed=0)
    assert plain["folds"] == splits["folds"] and plain["unlabelled"] == []


def test_splits_count_only_the_available_unlabelled_slides():
    extra = [SlideEntry("u1", "cu1", "x", ""), SlideEntry("u2", "cu2", "x", "")]
    m = Manifest(None, (*_cohort(), *extra))
    available = {s.slide_id for s in m.slides} - {"u2"}  # u2 failed extraction
    assert make_splits(m, CLASSES, 2, 0.34, seed=0, available=available)["unlabelled"] == ["u1"]


def test_a_case_with_two_different_labels_is_still_an_error():
    slides = (*_cohort(), SlideEntry("s1b", "case1", "x", "normal"))  # case1 is tumour
    with pytest.raises(ValueError, match="case case1 has slides with different labels"):
        make_splits(Manifest(None, slides), CLASSES, 2, 0.34, seed=0)


def test_dataset_resolution_and_shards_keep_unlabelled_rows(tmp_path):
    (tmp_path / "ds").mkdir()
    src = _write(
        tmp_path / "ds" / "manifest.csv",
        [("a", "c1", "slides/a.tif", "tumour"), ("b", "c2", "slides/b.tif", "")],
    )
    meta = resolve_dataset(None, "", str(src), tmp_path / "out.csv", CLASSES)
    assert (meta["slides"], meta["unlabelled"]) == (2, 1)
    resolved = read_manifest(tmp_path / "out.csv", CLASSES)
    assert resolved.unlabelled == ["b"]
    assert resolved.slides[1].uri == str(tmp_path / "ds" / "slides" / "b.tif")
    assert [s.slide_id for s in select_shard(resolved, 1, 1).slides] == ["b"]


def _with_unlabelled(tiny_dataset: Path, dest: Path) -> Manifest:
    """The tiny dataset with absolute URIs plus two unlabelled rows pointing at its first two
    slide files under new slide_ids: one in a case of its own, one in the first slide's case."""
    m = read_manifest(tiny_dataset)
    slides = [replace(s, uri=str(m.base_dir / s.uri)) for s in m.slides]
    first, second = slides[0], slides[1]
    extra = [
        SlideEntry("unlab_alone", "case_unlabelled", second.uri, ""),
        SlideEntry("unlab_mixed", first.case_id, first.uri, ""),
    ]
    return write_manifest(dest, [*slides, *extra])


@pytest.mark.slow
def test_label_free_stages_use_every_slide_and_slide_level_ones_the_labelled(
    tiny_dataset, tmp_path
):
    from efcm import stages

    params = params_from_dict(tiny_params_dict())
    m = _with_unlabelled(tiny_dataset, tmp_path / "manifest.csv")
    every = {s.slide_id for s in m.slides}
    labelled = every - {"unlab_alone", "unlab_mixed"}
    assert len(every) == 8 and len(labelled) == 6
    w = tmp_path / "run"

    rows = stages.patch(m.path, w / "patch", params)
    assert {r["slide_id"] for r in rows if r["status"] == "ok"} == every
    rows = stages.extract(m.path, w / "patch", w / "teacher", params, encoder="teacher")
    assert {r["slide_id"] for r in rows if r["status"] == "ok"} == every
    assert {p.stem for p in (w / "teacher" / "features").glob("*.h5")} == every
    metrics = stages.distill(m.path, w / "patch", w / "teacher", w / "distill", params)
    assert set(metrics["train_slides"]) | set(metrics["val_slides"]) == every

    splits = stages.splits(m.path, w / "splits.json", params, features_dir=w / "teacher")
    assert json.loads((w / "splits.json").read_text())["unlabelled"] == [
        "unlab_alone",
        "unlab_mixed",
    ]
    assert {s for f in splits["folds"] for part in f.values() for s in part} == labelled

    summary = stages.train_mil(m.path, w / "teacher", w / "splits.json", w / "mil", params)
    assert summary["unlabelled"] == 2
    assert json.loads((w / "mil" / "summary.json").read_text())["unlabelled"] == 2
    with open(w / "mil" / "predictions.csv", newline="") as f:
        assert {r["slide_id"] for r in csv.DictReader(f)} == labelled

    raw = tiny_params_dict()
    raw["mil"] = {**raw["mil"], "strategies": ["retrain"]}
    one = params_from_dict(raw)
    stages.strategy(
        "retrain", m.path, w / "splits.json", w / "retrain", one, student_features=w / "teacher"
    )
    result = stages.evaluate(w / "mil", [w / "retrain"], w / "eval", one, manifest=m.path)
    for row in ("teacher", "student.vfd.retrain"):
        assert result[row]["n"] == len(labelled) and result[row]["n_cases"] == len(labelled)


def test_train_mil_refuses_splits_naming_an_unlabelled_slide(tmp_path):
    from efcm.training.mil import train_mil

    params = params_from_dict(tiny_params_dict())
    m = Manifest(tmp_path / "m.csv", (*_cohort(), SlideEntry("u", "cu", "x", "")))
    splits = {"classes": list(CLASSES), "folds": [{"train": ["s0", "u"], "val": [], "test": []}]}
    with pytest.raises(ValueError, match=r"not labelled slides of .*m\.csv: \['u'\]"):
        train_mil(m, tmp_path / "features", splits, tmp_path / "out", params)

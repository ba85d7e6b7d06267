"""The image manifest: multi-class and multi-label labels, unlabelled images, and errors that name
the row and the problem (the row checks and URI rules are the slide manifest's)."""

from __future__ import annotations

import numpy as np
import pytest

from efcm.config import ConfigError, params_from_dict
from efcm.io.image_manifest import (
    ImageEntry,
    LabelSpace,
    import_image_manifest,
    read_image_manifest,
    write_image_manifest,
)

CXR = LabelSpace(("effusion", "nodule", "cardiomegaly"), multi_label=True)
FUNDUS = LabelSpace(("no_lesion", "lesion"))


def _csv(tmp_path, body: str, name: str = "manifest.csv"):
    path = tmp_path / name
    path.write_text("image_id,case_id,uri,label\n" + body)
    return path


def test_multi_label_labels_become_class_indices_and_multi_hot_targets(tmp_path):
    path = _csv(
        tmp_path,
        "a,p1,a.png,effusion|cardiomegaly\nb,p1,b.dcm,no_finding\nc,p2,c.png,\nd,,d.png, nodule \n",
    )
    m = read_image_manifest(path, CXR)
    assert [e.image_id for e in m.images] == ["a", "b", "c", "d"]
    assert m.images[3].case_id == "d"  # an empty case_id is the image's own
    assert m.unlabelled == ["c"]
    assert m.labels(CXR) == {"a": (0, 2), "b": (), "d": (1,)}
    targets = m.targets(CXR)
    np.testing.assert_array_equal(targets["a"], [1, 0, 1])
    np.testing.assert_array_equal(targets["b"], [0, 0, 0])
    assert targets["a"].dtype == np.float32
    assert "c" not in targets


def test_multi_class_targets_are_class_indices(tmp_path):
    m = read_image_manifest(_csv(tmp_path, "a,p,a.jpg,lesion\nb,p,b.jpg,no_lesion\n"), FUNDUS)
    assert m.targets(FUNDUS) == {"a": 1, "b": 0}


@pytest.mark.parametrize(
    ("space", "row", "message"),
    [
        (FUNDUS, "x,p,x.png,lesion|no_lesion", r":2: x: label 'lesion\|no_lesion' names 2 classes"),
        (FUNDUS, "x,p,x.png,cancer", r":2: x: label 'cancer': \['cancer'\] not in the classes"),
        (FUNDUS, "x,p,x.png,no_finding", r"\['no_finding'\] not in the classes"),
        (CXR, "x,p,x.png,nodule|tumour", r"\['tumour'\] not in the classes .* or 'no_finding'"),
        (CXR, "x,p,x.png,nodule|nodule", r"names a class twice"),
        (CXR, "x,p,x.png,no_finding|nodule", r"'no_finding' goes alone"),
    ],
)
def test_a_label_the_task_does_not_allow_names_the_row_and_why(tmp_path, space, row, message):
    path = _csv(tmp_path, row + "\n")
    with pytest.raises(ValueError, match=message):
        read_image_manifest(path, space)
    read_image_manifest(path)  # without a label space only the rows are checked


def test_the_row_checks_are_the_slide_manifests(tmp_path):
    with pytest.raises(ValueError, match=r":3: duplicate image_id 'a'"):
        read_image_manifest(_csv(tmp_path, "a,p,a.png,\na,p,b.png,\n"))
    with pytest.raises(ValueError, match=r":2: image_id 'a b' must be letters"):
        read_image_manifest(_csv(tmp_path, "a b,p,a.png,\n"))
    with pytest.raises(ValueError, match=r"no images"):
        read_image_manifest(_csv(tmp_path, ""))
    (tmp_path / "bad.csv").write_text("slide_id,case_id,uri,label\ns,p,s.svs,\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_id'\]"):
        read_image_manifest(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_image_manifest(tmp_path / "none.csv")


def test_import_makes_relative_uris_absolute_and_keeps_gs_and_absolute_ones(tmp_path):
    src_dir = tmp_path / "ds"
    src_dir.mkdir()
    path = _csv(
        src_dir,
        "a,p,img/a.png,lesion\nb,p,gs://bkt/b.png,\nc,p,/data/c.png,no_lesion\n",
    )
    copy = import_image_manifest(path, tmp_path / "out" / "manifest.csv", FUNDUS)
    assert [e.uri for e in copy.images] == [
        str(src_dir / "img" / "a.png"),
        "gs://bkt/b.png",
        "/data/c.png",
    ]
    assert read_image_manifest(copy.path, FUNDUS).images == copy.images


def test_write_then_read_round_trips(tmp_path):
    images = [ImageEntry("a", "p", "a.png", "effusion|nodule"), ImageEntry("b", "p", "b.png", "")]
    written = write_image_manifest(tmp_path / "m.csv", images)
    assert read_image_manifest(written.path, CXR).images == tuple(images)


def test_image_params_presets_and_label_space_rules():
    cxr = params_from_dict({"image": {"preset": "cxr"}}).image
    assert cxr.multi_label and cxr.channels == "grey" and cxr.crop == "none"
    fundus = params_from_dict({"image": {"preset": "fundus", "size": 128}}).image
    assert (fundus.crop, fundus.size, fundus.classes) == ("fundus", 128, ("no_lesion", "lesion"))
    with pytest.raises(ConfigError, match=r"image: .*classes must be >= 2 distinct names"):
        params_from_dict({"image": {"classes": ["only"]}})
    one = params_from_dict({"image": {"classes": ["only"], "multi_label": True}}).image
    assert one.classes == ("only",)  # one finding, present or not, is a multi-label task
    with pytest.raises(ConfigError, match=r"none_label 'nodule' is also a class"):
        params_from_dict({"image": {"preset": "cxr", "none_label": "nodule"}})
    with pytest.raises(ConfigError, match=r"a class name is not empty and has no '\|'"):
        params_from_dict({"image": {"classes": ["a|b", "c"]}})
    with pytest.raises(ConfigError, match=r"image\.bogus: unknown key"):
        params_from_dict({"image": {"bogus": 1}})


def test_the_encoder_gets_the_whole_image_and_the_tasks_normalisation():
    p = params_from_dict({"image": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    spec = p.image.encoder_spec(p.student)
    assert spec.resize == spec.input_size  # resized whole, never centre-cropped
    assert (spec.mean, spec.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    plain = params_from_dict({}).image.encoder_spec(p.student)
    assert (plain.mean, plain.std) == (p.student.mean, p.student.std)
    with pytest.raises(ConfigError, match=r"mean and std are given together"):
        params_from_dict({"image": {"mean": [0.5, 0.5, 0.5]}})


def test_relative_uris_of_a_gs_manifest_stay_in_its_bucket():
    from efcm.io.manifest import absolute_uri

    assert absolute_uri("gs://bkt/ds/manifest.csv", "img/a.png", "a") == "gs://bkt/ds/img/a.png"
    assert absolute_uri("gs://bkt/ds/m.csv", "../other/b.dcm", "b") == "gs://bkt/other/b.dcm"
    assert absolute_uri("gs://bkt/ds/m.csv", "gs://x/c.png", "c") == "gs://x/c.png"
    with pytest.raises(ValueError, match=r"uri '\.\./\.\./d\.png' of d leaves bucket bkt"):
        absolute_uri("gs://bkt/ds/m.csv", "../../d.png", "d")

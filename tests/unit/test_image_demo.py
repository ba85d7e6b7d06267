"""The synthetic image demo sets (`efcm demo-data --kind fundus|cxr`): deterministic from the
seed, every decoding path present, and the labels drawn where they belong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from efcm.cli import main
from efcm.config import params_from_dict
from efcm.images.reader import ImageReader
from efcm.images.synthetic import DemoSpec, cxr_image, fundus_image, streams, write_demo_images
from efcm.io.image_manifest import LabelSpace, read_image_manifest

CXR = ("effusion", "nodule", "cardiomegaly")
FUNDUS = ("no_lesion", "lesion")


def _write(out: Path, kind: str, n: int, seed: int = 0, **over) -> Path:
    classes = FUNDUS if kind == "fundus" else CXR
    spec = {"classes": classes, "size": 64, "unlabelled": 2, **over}
    return write_demo_images(out, kind, DemoSpec(images=n, seed=seed, **spec))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.*")}


@pytest.mark.parametrize("kind", ["fundus", "cxr"])
def test_the_same_seed_writes_the_same_bytes(tmp_path, kind):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _write(tmp_path / name, kind, 8, seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 9 and a == b  # 8 images and the manifest
    differ = [k for k in a if k != "manifest.csv" and a[k] != c.get(k)]
    assert len(differ) == 8  # another seed: other pixels in every image


def test_the_fundus_set_has_both_labels_jpeg_and_png_clipped_circles_and_cases(tmp_path):
    path = _write(tmp_path, "fundus", 20, size=96)
    m = read_image_manifest(path, LabelSpace(("no_lesion", "lesion")))
    assert m.unlabelled == [m.images[0].image_id, m.images[1].image_id]
    assert set(m.targets(LabelSpace(("no_lesion", "lesion"))).values()) == {0, 1}
    assert {Path(e.uri).suffix for e in m.images} == {".jpg", ".png"}
    assert len({e.case_id for e in m.images}) == 10
    reader = ImageReader(
        params_from_dict({"image": {"preset": "fundus", "size": 64}}).image, m.base_dir
    )
    for e in m.images:  # every image has a field of view the crop finds, clipped or not
        assert reader(e).shape == (64, 64, 3)


def test_lesions_change_the_fundus_only_where_they_are_drawn():
    clean, none = fundus_image(streams(7, "fundus", 5), 256, n_lesions=0, clipped=False)
    sick, centres = fundus_image(streams(7, "fundus", 5), 256, n_lesions=6, clipped=False)
    assert none == [] and len(centres) == 6
    diff = np.abs(clean.astype(int) - sick.astype(int)).max(axis=2)
    near = np.zeros(diff.shape, bool)
    yy, xx = np.mgrid[0 : diff.shape[0], 0 : diff.shape[1]]
    for x, y in centres:
        near |= np.hypot(xx - x, yy - y) <= 10  # the largest blotch: radius 6 px, blurred
        assert diff[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max() > 20  # visibly drawn
    assert diff[~near].max() == 0  # nothing else changed


def test_cxr_findings_are_drawn_where_they_belong():
    s = 128
    base = cxr_image(streams(1, "cxr", 2), s, ())
    rows = np.arange(s)[:, None] * np.ones((1, s))
    for finding in CXR:
        d = cxr_image(streams(1, "cxr", 2), s, (finding,)) - base
        changed = np.abs(d) > 0.02
        assert changed.sum() > 10, finding
        assert d[changed].mean() > 0, finding  # every finding is denser (brighter) tissue
        if finding == "effusion":  # the lower lung, at the costophrenic angle
            assert rows[changed].min() > 0.4 * s
        if finding == "cardiomegaly":  # a wider heart: lower centre
            cols = np.nonzero(changed)[1]
            assert rows[changed].mean() > 0.5 * s and abs(cols.mean() - s / 2) < 0.2 * s


def test_the_cxr_set_writes_png_8_16_bit_and_dicom_monochrome1_and_2(tmp_path):
    import pydicom

    path = _write(tmp_path, "cxr", 12)
    m = read_image_manifest(path, LabelSpace(CXR, multi_label=True))
    kinds = set()
    reader = ImageReader(
        params_from_dict({"image": {"preset": "cxr", "size": 64}}).image, m.base_dir
    )
    for e in m.images:
        f = m.base_dir / e.uri
        if f.suffix == ".dcm":
            ds = pydicom.dcmread(f)
            kinds.add(str(ds.PhotometricInterpretation))
            assert "WindowCenter" in ds and float(ds.RescaleIntercept) == -1024
        else:
            kinds.add("png16" if f.read_bytes()[24] == 16 else "png8")  # IHDR bit depth
        img = reader(e)[..., 0].astype(int)
        # decoded the right way round whatever the file: the spine is brighter than a lung
        assert img[8:56, 31:33].mean() > img[16:40, 10:18].mean() + 20, e.uri
    assert kinds == {"png8", "png16", "MONOCHROME1", "MONOCHROME2"}
    labels = [e.label for e in m.images if e.labelled]
    assert any("|" in x for x in labels)
    assert len({e.case_id for e in m.images}) == 6


def test_the_cli_writes_a_demo_set_and_refuses_the_wrong_count_option(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"image": {"preset": "cxr", "demo": {"size": 64}}}))
    out = tmp_path / "cxr"
    code = main(["demo-data", str(out), "--kind", "cxr", "--images", "6", "--params", str(params)])
    assert code == 0
    assert len(read_image_manifest(out / "manifest.csv").images) == 6
    code = main(
        ["demo-data", str(out), "--kind", "fundus", "--slides", "4", "--params", str(params)]
    )
    assert code == 2 and "--slides is for --kind slides" in capsys.readouterr().err


def test_cxr_demo_classes_follow_the_task_and_refuse_what_cannot_be_drawn(tmp_path):
    path = _write(tmp_path, "cxr", 10, classes=("nodule",))
    labels = {e.label for e in read_image_manifest(path).images}
    assert labels <= {"", "nodule", "no_finding"} and "nodule" in labels
    with pytest.raises(ValueError, match=r"cannot draw \['pneumothorax'\]"):
        _write(tmp_path, "cxr", 4, classes=("pneumothorax",))

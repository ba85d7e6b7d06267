"""`efcm patch` as a lab runs it: real slides of several scanners, bad files, a killed batch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from efcm.cli import main
from efcm.config import PatchParams, TissueParams
from efcm.errors import BatchFailed
from efcm.io.manifest import SlideEntry, read_manifest
from efcm.slides.batch import patch_manifest, patch_slide
from efcm.slides.patching import read_coords
from efcm.slides.synthetic import SlideSpec, write_slide
from tests.conftest import ROOT, first_slides, tiny_params_dict

pytestmark = pytest.mark.integration

P64 = PatchParams(target_mpp=1.0, patch_size=64, step=64)


def _outputs_exist(out: Path, sid: str) -> None:
    assert (out / "patches" / f"{sid}.h5").is_file(), f"{sid}: no coords h5"
    assert (out / "qc" / f"{sid}.png").stat().st_size > 0, f"{sid}: no QC PNG"
    geo = json.loads((out / "qc" / f"{sid}.geojson").read_text())
    assert geo["type"] == "FeatureCollection"


@pytest.mark.parametrize(
    ("name", "params", "expect"),
    [
        ("CMU-1-Small-Region.svs", PatchParams(), "ok"),
        # fluorescence (DAPI) on black: no H&E tissue, and it must not crash
        ("test3-DAPI-2-387.ndpi", PatchParams(), {"ok", "no_tissue"}),
        # a 29 um/px DICOM overview, patched at a resolution it has
        (
            "multiframe_camelyon_challenge_image.dcm",
            PatchParams(target_mpp=32.0, patch_size=16, step=16),
            "ok",
        ),
    ],
)
def test_real_slides_give_coords_qc_and_geojson(shared_data, tmp_path, name, params, expect):
    sid = name.split(".")[0]
    row = patch_slide(
        SlideEntry(sid, "c", str(shared_data / "wsi" / name), "normal"), Path("/"), tmp_path, params
    )
    assert row["status"] in ({expect} if isinstance(expect, str) else expect), row
    assert row["mpp_source"] == "openslide"
    _outputs_exist(tmp_path, sid)
    with h5py.File(tmp_path / "patches" / f"{sid}.h5") as f:
        assert f["coords"].attrs["mpp_source"] == "openslide"


def test_ndpi_pyramid_level_is_chosen_for_the_target(shared_data, tmp_path):
    """0.228 um/px at level 0, 7 levels: 1.0 um/px patches are read at level 2 (downsample 4)."""
    from efcm.slides.patching import geometry
    from efcm.slides.reader import open_slide, resolve_mpp

    with open_slide(shared_data / "wsi" / "test3-DAPI-2-387.ndpi") as s:
        assert s.level_count == 7
        mpp = resolve_mpp(s)
        g = geometry(
            list(s.level_downsamples),
            list(s.level_dimensions),
            mpp.value,
            mpp.source,
            PatchParams(target_mpp=1.0, patch_size=256),
        )
    assert g.patch_level == 2 and g.read_size == round(256 * 1.0 / 0.22818 / 4)


def test_cmu_biopsy_preset_is_within_20_percent_of_clam(shared_data, tmp_path):
    """CLAM's create_patches_fp with the bwh_biopsy preset keeps 50 patches of 256 px at
    0.5 um/px on this slide."""
    params = PatchParams(tissue=TissueParams(preset="biopsy"))
    row = patch_slide(
        SlideEntry("cmu", "c", str(shared_data / "wsi/CMU-1-Small-Region.svs"), "normal"),
        Path("/"),
        tmp_path,
        params,
    )
    assert 40 <= row["n_patches"] <= 60, row


def test_bad_files_each_get_a_reason_and_the_batch_completes(shared_data, tmp_path, tiny_dataset):
    real = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    data = real.read_bytes()
    (tmp_path / "truncated.svs").write_bytes(data[: len(data) // 3])
    shutil.copy(shared_data / "tiles/misc/stardist_histo.jpg", tmp_path / "photo.tif")
    shutil.copy(shared_data / "tiles/histolab_thumbnails/tcga-lung-rgb.png", tmp_path / "png.tif")
    (tmp_path / "zero.svs").write_bytes(b"")
    (tmp_path / "random.svs").write_bytes(np.random.default_rng(1).bytes(100_000))
    (tmp_path / "a_dir.svs").mkdir()
    good = read_manifest(tiny_dataset).slides[0]
    rows = [
        "slide_id,case_id,uri,label",
        f"good,c0,{tiny_dataset.parent / good.uri},{good.label}",
        f"real,c1,{real},normal",
    ]
    rows += [
        f"{n},c{i + 2},{n}.{ext},normal"
        for i, (n, ext) in enumerate(
            [
                ("truncated", "svs"),
                ("png", "tif"),
                ("photo", "tif"),
                ("zero", "svs"),
                ("random", "svs"),
                ("a_dir", "svs"),
                ("absent", "svs"),
            ]
        )
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    params = PatchParams(target_mpp=1.0, patch_size=64, step=64)
    out = {
        r["slide_id"]: r
        for r in patch_manifest(
            read_manifest(tmp_path / "m.csv"), tmp_path / "out", params, workers=2
        )
    }
    assert out["good"]["status"] == "ok" and out["real"]["status"] == "ok"
    for sid in ("truncated", "png", "photo", "zero", "random", "a_dir"):
        assert out[sid]["status"] == "unreadable", out[sid]
        assert out[sid]["reason"], sid
    assert out["absent"]["status"] == "missing"
    assert "truncated" in out["truncated"]["reason"] or "corrupt" in out["truncated"]["reason"]
    assert "empty file" in out["zero"]["reason"]
    assert "not a slide format" in out["png"]["reason"]
    status = (tmp_path / "out" / "status.csv").read_text().splitlines()
    assert len(status) == 10 and status[0].startswith("slide_id,status,reason,mpp,mpp_source")


def test_fail_on_policy(tmp_path, tiny_dataset, tiny_params_file):
    (tmp_path / "bad.svs").write_bytes(b"x" * 10)
    good = read_manifest(tiny_dataset).slides[0]
    (tmp_path / "m.csv").write_text(
        "slide_id,case_id,uri,label\n"
        f"good,c0,{tiny_dataset.parent / good.uri},{good.label}\nbad,c1,bad.svs,normal\n"
    )
    args = ["patch", "--manifest", str(tmp_path / "m.csv"), "--params"]
    assert main([*args, str(tiny_params_file), "--out", str(tmp_path / "a")]) == 0
    strict = yaml.safe_load(tiny_params_file.read_text())
    strict["patch"]["fail_on"] = "any"
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict))
    assert main([*args, str(tmp_path / "strict.yaml"), "--out", str(tmp_path / "b")]) == 1


def test_killed_batch_resumes_without_half_files_or_redoing_slides(tmp_path):
    """SIGKILL mid-batch, then rerun: no half-written h5, finished slides untouched."""
    n = 8
    lines = ["slide_id,case_id,uri,label"]
    for i in range(n):
        write_slide(tmp_path / f"s{i}.tif", SlideSpec(4096, 4096, seed=100 + i))
        lines.append(f"s{i},c{i},s{i}.tif,normal")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    params = tiny_params_dict()
    params["patch"].update({"target_mpp": 0.5, "patch_size": 32, "step": 16})  # slow-ish grid
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "efcm.cli",
        "patch",
        "--manifest",
        str(tmp_path / "m.csv"),
        "--out",
        str(out),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "patches").glob("s*.h5"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((out / "patches").glob("s*.h5"))
    assert 2 <= len(done) < n, "the kill did not land mid-batch"
    for p in done:  # whatever exists under its final name is complete
        assert len(read_coords(p).coords) > 0
    before = {p.name: p.stat().st_mtime_ns for p in done}
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    after = sorted((out / "patches").glob("s*.h5"))
    assert len(after) == n
    for p in done:
        assert p.stat().st_mtime_ns == before[p.name], f"{p.name} was redone"
    assert not list((out / "patches").glob("*.part")), "half-written files left behind"
    status = (out / "status.csv").read_text()
    assert status.count("already done") == len(done)


def test_clam_layout_coords_are_accepted_by_efcm_extract(tmp_path, tiny_dataset):
    """A coords h5 with only CLAM's attributes (patch_size, patch_level) extracts features."""
    from efcm import stages
    from efcm.config import for_stage, params_from_dict
    from efcm.features import read_features

    params = for_stage(params_from_dict(tiny_params_dict()), "extract")
    m = read_manifest(tiny_dataset)
    sid = m.slides[0].slide_id
    (tmp_path / "patches" / "patches").mkdir(parents=True)
    with h5py.File(tmp_path / "patches" / "patches" / f"{sid}.h5", "w") as f:
        d = f.create_dataset("coords", data=np.array([[512, 512], [640, 512], [512, 640]]))
        d.attrs["patch_size"] = 64
        d.attrs["patch_level"] = 0
    one = tmp_path / "one.csv"
    s = m.slides[0]
    one.write_text(
        f"slide_id,case_id,uri,label\n{sid},{s.case_id},{tiny_dataset.parent / s.uri},{s.label}\n"
    )
    rows = stages.extract(one, tmp_path / "patches", tmp_path / "features", params)
    assert rows[0]["status"] == "ok"
    feats, coords = read_features(tmp_path / "features" / "features" / f"{sid}.h5")
    assert feats.shape == (3, 64) and coords.tolist()[0] == [512, 512]


def test_demo_params_file_is_used_by_the_cli_default(tmp_path, monkeypatch):
    """`--params` defaults to ./params.yaml (DESIGN section 10)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert main(["demo-data", str(tmp_path / "d"), "--slides", "2"]) == 0
    assert len(read_manifest(tmp_path / "d" / "manifest.csv").slides) == 2


# -- reruns reuse a slide's outputs only when they were made with the same settings --------------


def _first_slides(tiny_dataset: Path, n: int = 2):
    from efcm.io.manifest import Manifest

    m = read_manifest(tiny_dataset)
    return Manifest(m.path, m.slides[:n])


def _files(out: Path) -> dict[str, int]:
    """Inode of every coords h5: an atomic rewrite gives a new one."""
    return {p.stem: p.stat().st_ino for p in (out / "patches").glob("*.h5")}


def _redo_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "redoing" in r.getMessage()]


def test_coords_h5_records_the_settings_that_made_it(tmp_path, tiny_dataset):
    from efcm.slides.patching import patch_settings, read_patch_settings

    m = _first_slides(tiny_dataset, 1)
    sid = m.slides[0].slide_id
    patch_manifest(m, tmp_path, P64)
    path = tmp_path / "patches" / f"{sid}.h5"
    stored = read_patch_settings(path)
    assert stored == patch_settings(P64)
    assert "fail_on" not in stored and stored["mpp_override"] is None
    assert stored["patch_size"] == 64 and stored["tissue"]["sthresh"] == 8
    with h5py.File(path) as f:
        raw = f["coords"].attrs["efcm_patch_settings"]
    assert list(json.loads(raw)) == sorted(json.loads(raw))  # keys sorted
    # a CLAM file has none
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((1, 2), np.int64)).attrs["patch_size"] = 64
    assert read_patch_settings(tmp_path / "clam.h5") is None


def test_rerun_with_the_same_settings_redoes_nothing(tmp_path, tiny_dataset, caplog):
    m = _first_slides(tiny_dataset)
    first = patch_manifest(m, tmp_path, P64)
    before = _files(tmp_path)
    caplog.set_level("INFO", logger="efcm")
    # fail_on is a batch policy: it does not change the outputs
    again = patch_manifest(m, tmp_path, P64.model_copy(update={"fail_on": "any"}))
    assert [r["reason"] for r in again] == ["already done"] * 2
    assert [r["n_patches"] for r in again] == [r["n_patches"] for r in first]
    assert _files(tmp_path) == before
    assert _redo_messages(caplog) == []


@pytest.mark.parametrize(
    ("update", "change"),
    [
        ({"patch_size": 32}, "patch_size 64 -> 32"),
        ({"step": 32}, "step 64 -> 32"),
        ({"target_mpp": 2.0}, "target_mpp 1.0 -> 2.0"),
        ({"tissue": TissueParams(sthresh=20)}, "tissue.sthresh 8 -> 20"),
    ],
)
def test_rerun_with_a_changed_setting_redoes_every_slide(
    tmp_path, tiny_dataset, caplog, update, change
):
    from efcm.slides.patching import patch_settings, read_patch_settings

    m = _first_slides(tiny_dataset)
    patch_manifest(m, tmp_path, P64)
    before = _files(tmp_path)
    caplog.set_level("INFO", logger="efcm")
    changed = P64.model_copy(update=update)
    rows = patch_manifest(m, tmp_path, changed)
    assert [r["reason"] for r in rows] == ["", ""], rows
    after = _files(tmp_path)
    assert all(after[s] != before[s] for s in before), "a slide was reused"
    assert _redo_messages(caplog) == [
        f"{s.slide_id}: patch settings changed ({change}): redoing" for s in m.slides
    ]
    for s in m.slides:
        assert read_patch_settings(tmp_path / "patches" / f"{s.slide_id}.h5") == (
            patch_settings(changed)
        )
    # and the new outputs are reused by the next run with the new settings
    assert [r["reason"] for r in patch_manifest(m, tmp_path, changed)] == ["already done"] * 2
    assert _files(tmp_path) == after


def test_an_mpp_override_is_part_of_the_settings(tmp_path, tiny_dataset, caplog):
    from dataclasses import replace

    from efcm.io.manifest import Manifest

    m = _first_slides(tiny_dataset)
    patch_manifest(m, tmp_path, P64)
    before = _files(tmp_path)
    a, b = m.slides
    overridden = Manifest(m.path, (replace(a, mpp=0.25), b))
    caplog.set_level("INFO", logger="efcm")
    rows = patch_manifest(overridden, tmp_path, P64)
    assert [r["reason"] for r in rows] == ["", "already done"]
    assert rows[0]["mpp_source"] == "override"
    assert _redo_messages(caplog) == [
        f"{a.slide_id}: patch settings changed (mpp_override null -> 0.25): redoing"
    ]
    after = _files(tmp_path)
    assert after[a.slide_id] != before[a.slide_id] and after[b.slide_id] == before[b.slide_id]
    # dropping the override again redoes that slide with the slide's own mpp
    rows = patch_manifest(m, tmp_path, P64)
    assert [r["reason"] for r in rows] == ["", "already done"]
    assert rows[0]["mpp_source"] == "openslide"


def test_a_coords_file_without_stored_settings_is_redone(tmp_path, tiny_dataset, caplog):
    m = _first_slides(tiny_dataset)
    patch_manifest(m, tmp_path, P64)
    old = m.slides[0].slide_id
    with h5py.File(tmp_path / "patches" / f"{old}.h5", "a") as f:  # as CLAM or efcm < this
        del f["coords"].attrs["efcm_patch_settings"]
    before = _files(tmp_path)
    caplog.set_level("INFO", logger="efcm")
    rows = patch_manifest(m, tmp_path, P64)
    assert [r["reason"] for r in rows] == ["", "already done"]
    assert _redo_messages(caplog) == [
        f"{old}: {old}.h5 has no stored patch settings (written by CLAM or an older efcm): redoing"
    ]
    assert _files(tmp_path)[old] != before[old]


def test_a_redone_slide_that_fails_keeps_no_coords_of_the_old_settings(tmp_path, tiny_dataset):
    """Patches at 0.2 um/px on a 0.5 um/px slide would be upsampled 2.5x (max_upsample 2): the
    slide fails, and its 1.0 um/px coords must not stay behind for extract to use."""
    m = _first_slides(tiny_dataset)
    patch_manifest(m, tmp_path, P64)
    rows = patch_manifest(m, tmp_path, P64.model_copy(update={"target_mpp": 0.2}))
    assert [r["status"] for r in rows] == ["too_coarse"] * 2
    assert _files(tmp_path) == {}


# -- an unexpected exception (a bug) is told apart from bad slides --------------------------------


def _three_slides(tiny_dataset: Path, out: Path) -> tuple[Path, list[str]]:
    """A manifest of the first three tiny slides (absolute URIs) and their ids."""
    path = first_slides(tiny_dataset, 3, out)
    return path, [s.slide_id for s in read_manifest(path).slides]


def _params_file(tmp_path: Path, fail_on: str) -> Path:
    data = tiny_params_dict()
    data["patch"]["fail_on"] = fail_on
    path = tmp_path / f"params_{fail_on}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _inject_bug(monkeypatch, broken: set[str]) -> None:
    """`plan_patches` raises a RuntimeError (as a bug would) for the slides in `broken`."""
    from efcm.slides import batch

    real = batch.plan_patches

    def plan_patches(slide, params, *, mpp_override=None, name="slide"):
        if name in broken:
            raise RuntimeError(f"injected bug on {name}")
        return real(slide, params, mpp_override=mpp_override, name=name)

    monkeypatch.setattr(batch, "plan_patches", plan_patches)


def _cli(command: str, manifest: Path, out: Path, params: Path, *more: str) -> int:
    """`efcm <command>` run in process, as the entry point runs it; returns its exit status."""
    return main(
        [command, "--manifest", str(manifest), "--out", str(out), "--params", str(params), *more]
    )


def _status_rows(out: Path) -> dict[str, dict[str, str]]:
    from efcm.io.status import read_status

    return {r["slide_id"]: r for r in read_status(out / "status.csv")}


@pytest.mark.parametrize("fail_on", ["all", "never"])
def test_an_unexpected_error_on_most_slides_fails_patch_whatever_fail_on_says(
    tmp_path, tiny_dataset, monkeypatch, capsys, caplog, fail_on
):
    manifest, ids = _three_slides(tiny_dataset, tmp_path / "m.csv")
    _inject_bug(monkeypatch, set(ids[1:]))
    out = tmp_path / "out"
    code = _cli("patch", manifest, out, _params_file(tmp_path, fail_on))
    assert code == 1
    err = capsys.readouterr().err
    assert "unexpected error on 2 of 3 attempted slides" in err
    assert f"RuntimeError on {ids[1]}, {ids[2]}" in err
    # each bug is logged with its traceback
    logged = [r for r in caplog.records if r.exc_info and "unexpected error" in r.getMessage()]
    assert [r.exc_info[0] for r in logged] == [RuntimeError, RuntimeError]
    # nothing already written is lost: every row, and the finished slide's outputs
    rows = _status_rows(out)
    assert rows[ids[0]]["status"] == "ok"
    _outputs_exist(out, ids[0])
    for sid in ids[1:]:
        assert rows[sid]["status"] == "error"
        assert rows[sid]["reason"] == f"RuntimeError: injected bug on {sid}"
        assert not (out / "patches" / f"{sid}.h5").exists()


def test_an_unexpected_error_on_one_slide_does_not_stop_the_batch(
    tmp_path, tiny_dataset, monkeypatch
):
    manifest, ids = _three_slides(tiny_dataset, tmp_path / "m.csv")
    _inject_bug(monkeypatch, {ids[0]})
    out = tmp_path / "out"
    code = _cli("patch", manifest, out, _params_file(tmp_path, "all"))
    assert code == 0
    rows = _status_rows(out)
    assert rows[ids[0]]["status"] == "error"
    assert rows[ids[0]]["reason"] == f"RuntimeError: injected bug on {ids[0]}"
    for sid in ids[1:]:
        assert rows[sid]["status"] == "ok"
        _outputs_exist(out, sid)


def test_bad_slides_on_most_of_the_batch_keep_the_fail_on_all_policy(
    tmp_path, tiny_dataset, shared_data
):
    """Expected failures (InvalidSlide, a missing file) are not bugs: with fail_on: all, one good
    slide out of four is a successful batch, as before."""
    good = read_manifest(tiny_dataset).slides[0]
    (tmp_path / "zero.svs").write_bytes(b"")
    shutil.copy(shared_data / "tiles/misc/stardist_histo.jpg", tmp_path / "photo.tif")
    (tmp_path / "m.csv").write_text(
        "slide_id,case_id,uri,label\n"
        f"good,c0,{tiny_dataset.parent / good.uri},{good.label}\n"
        "zero,c1,zero.svs,normal\nphoto,c2,photo.tif,normal\nabsent,c3,absent.svs,normal\n"
    )
    out = tmp_path / "out"
    code = _cli("patch", tmp_path / "m.csv", out, _params_file(tmp_path, "all"))
    assert code == 0
    rows = _status_rows(out)
    assert {s: r["status"] for s, r in rows.items()} == {
        "good": "ok",
        "zero": "unreadable",
        "photo": "unreadable",
        "absent": "missing",
    }


def test_reused_slides_do_not_count_as_attempted(tmp_path, tiny_dataset, monkeypatch):
    """A rerun that reuses two slides and hits a bug on the only one it attempts fails."""
    manifest, ids = _three_slides(tiny_dataset, tmp_path / "m.csv")
    out = tmp_path / "out"
    m = read_manifest(manifest)
    patch_manifest(type(m)(m.path, m.slides[:2]), out, P64)
    _inject_bug(monkeypatch, set(ids))
    with pytest.raises(BatchFailed, match=rf"1 of 1 attempted slides \(RuntimeError on {ids[2]}\)"):
        patch_manifest(m, out, P64)
    rows = _status_rows(out)
    assert [rows[s]["reason"] for s in ids] == [
        "already done",
        "already done",
        f"RuntimeError: injected bug on {ids[2]}",
    ]


def test_an_unexpected_error_on_most_slides_fails_extract(tmp_path, tiny_dataset, monkeypatch):
    from efcm import features

    manifest, ids = _three_slides(tiny_dataset, tmp_path / "m.csv")
    params = _params_file(tmp_path, "all")
    assert _cli("patch", manifest, tmp_path / "p", params) == 0
    real = features.extract_slide

    def extract_slide(model, patches, params):
        if patches.coords.name != ids[0]:
            raise RuntimeError("injected bug")
        return real(model, patches, params)

    monkeypatch.setattr(features, "extract_slide", extract_slide)
    out = tmp_path / "f"
    code = _cli(
        "extract", manifest, out, params, "--patches", str(tmp_path / "p"), "--encoder", "teacher"
    )
    assert code == 1
    rows = _status_rows(out)
    assert [rows[s]["status"] for s in ids] == ["ok", "error", "error"]
    assert (out / "features" / f"{ids[0]}.h5").is_file()

"""`efcm extract` killed mid-batch resumes: finished slides kept, no half files, same features."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from efcm.config import for_stage, params_from_dict
from efcm.features import features_complete, read_features
from efcm.io.manifest import read_manifest
from efcm.models.encoders import build_backbone
from efcm.slides.batch import patch_manifest
from tests.conftest import first_slides, tiny_params_dict

pytestmark = pytest.mark.integration

# slow enough (~0.5-1 s per tiny slide on 2 CPU cores) that the kill lands mid-batch
TEACHER = {"arch": "resnet18", "input_size": 112, "resize": 112}


def _extract_cmd(manifest: Path, patches: Path, out: Path, params: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "efcm.cli",
        "extract",
        "--encoder",
        "teacher",
        "--manifest",
        str(manifest),
        "--patches",
        str(patches),
        "--out",
        str(out),
        "--params",
        str(params),
    ]


def _status(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "status.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_killed_extract_resumes_without_redoing_or_half_files(tmp_path, tiny_dataset):
    data = tiny_params_dict()
    # fixed weights: a rerun must build the very same teacher (random init is not seeded)
    ckpt = tmp_path / "teacher.pt"
    teacher, _ = build_backbone(params_from_dict({"teacher": TEACHER}).teacher, warn_random=False)
    torch.save(teacher.state_dict(), ckpt)
    data["teacher"] = {**TEACHER, "weights": str(ckpt)}
    data["extract"] = {"batch_size": 8, "num_workers": 0}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(data))
    params = params_from_dict(data)

    manifest = read_manifest(tiny_dataset)
    n = len(manifest.slides)
    rows = patch_manifest(manifest, tmp_path / "patches", params.patch)
    assert all(r["status"] == "ok" and r["n_patches"] > 0 for r in rows), rows

    out = tmp_path / "killed"
    feats_dir = out / "features"
    cmd = _extract_cmd(tiny_dataset, tmp_path / "patches", out, params_file)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(feats_dir.glob("*.h5")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(feats_dir.glob("*.h5"))
    assert 0 < len(done) < n, f"the kill did not land mid-batch ({len(done)} of {n} done)"
    for p in done:  # whatever exists under its final name is complete (atomic writes)
        assert features_complete(p), p.name
    before = {p.name: p.stat().st_mtime_ns for p in done}
    # what SIGKILL inside write_features leaves: the killed writer's temporary file
    todo = next(e.slide_id for e in manifest.slides if f"{e.slide_id}.h5" not in before)
    stale = feats_dir / f".{todo}.h5.{proc.pid}.part"
    stale.write_bytes(b"half an HDF5 file")

    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = sorted(feats_dir.glob("*.h5"))
    assert len(after) == n
    assert all(features_complete(p) for p in after)
    for p in done:
        assert p.stat().st_mtime_ns == before[p.name], f"{p.name} was redone"
    assert not list(feats_dir.glob("*.part")), "half-written files left behind"
    status = _status(out)
    assert all(r["status"] == "ok" for r in status.values()), status
    assert sorted(s for s, r in status.items() if r["reason"] == "already done") == sorted(
        p.stem for p in done
    )

    # the resumed features equal those of an uninterrupted run
    ref = tmp_path / "uninterrupted"
    full = subprocess.run(
        _extract_cmd(tiny_dataset, tmp_path / "patches", ref, params_file),
        capture_output=True,
        text=True,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    for p in after:
        feats, coords = read_features(p)
        ref_feats, ref_coords = read_features(ref / "features" / p.name)
        assert np.array_equal(coords, ref_coords), p.name
        np.testing.assert_allclose(feats, ref_feats, rtol=1e-4, atol=1e-5, err_msg=p.name)


# -- reruns reuse a slide's features only when they were made with the same settings -------------

CNN = {"arch": "test_resnet", "input_size": 64}  # any input size: one setting changes at a time


@pytest.fixture
def two_patched(tmp_path, tiny_dataset):
    """The first two tiny slides, patched: (manifest path, patches dir, params dict)."""
    manifest = first_slides(tiny_dataset, 2, tmp_path / "two.csv")
    data = tiny_params_dict()
    data["teacher"] = dict(CNN)
    rows = patch_manifest(
        read_manifest(manifest), tmp_path / "patches", params_from_dict(data).patch
    )
    assert all(r["n_patches"] > 0 for r in rows), rows
    return manifest, tmp_path / "patches", data


def _inodes(out: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_ino for p in (out / "features").glob("*.h5")}


def _redo_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "redoing" in r.getMessage()]


def _extract(manifest, patches, out, data, **kw):
    """`efcm extract` as the CLI and the KFP component run it: with only its params sections."""
    from efcm import stages

    return stages.extract(
        manifest, patches, out, for_stage(params_from_dict(data), "extract"), **kw
    )


def test_extract_rerun_with_the_same_settings_redoes_nothing(tmp_path, two_patched, caplog):
    manifest, patches, data = two_patched
    _extract(manifest, patches, tmp_path / "f", data)
    before = _inodes(tmp_path / "f")
    caplog.set_level("INFO", logger="efcm")
    data["extract"] = {"batch_size": 5}  # batching does not change the features
    rows = _extract(manifest, patches, tmp_path / "f", data)
    assert [r["reason"] for r in rows] == ["already done"] * 2
    assert _inodes(tmp_path / "f") == before and _redo_messages(caplog) == []


@pytest.mark.parametrize(
    ("section", "update", "change"),
    [
        ("teacher", {"input_size": 48}, "input_size 64 -> 48"),
        ("teacher", {"resize": 80}, "resize null -> 80"),
        ("teacher", {"mean": [0.5, 0.5, 0.5]}, "mean [0.485, 0.456, 0.406] -> [0.5, 0.5, 0.5]"),
        ("extract", {"float16": True}, "float16 false -> true"),
    ],
)
def test_extract_rerun_with_a_changed_setting_redoes_every_slide(
    tmp_path, two_patched, caplog, section, update, change
):
    manifest, patches, data = two_patched
    first = _extract(manifest, patches, tmp_path / "f", data)
    before = _inodes(tmp_path / "f")
    caplog.set_level("INFO", logger="efcm")
    data[section] = {**data[section], **update}
    rows = _extract(manifest, patches, tmp_path / "f", data)
    assert [r["reason"] for r in rows] == ["", ""], rows
    assert all(_inodes(tmp_path / "f")[s] != before[s] for s in before), "a slide was reused"
    assert _redo_messages(caplog) == [
        f"{r['slide_id']}: extraction settings changed ({change}): redoing" for r in first
    ]
    again = _extract(manifest, patches, tmp_path / "f", data)
    assert [r["reason"] for r in again] == ["already done"] * 2


def test_extract_with_other_student_weights_redoes_every_slide(tmp_path, two_patched, caplog):
    from efcm.config import EncoderParams
    from efcm.io.files import sha256_file
    from efcm.models.students import build_vfd, save_student

    manifest, patches, data = two_patched
    spec = EncoderParams(**CNN)
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_student(tmp_path / f"s{seed}.pt", build_vfd(spec, 16, warn_random=False), spec)
    _extract(manifest, patches, tmp_path / "f", data, encoder="student", student=tmp_path / "s0.pt")
    before = _inodes(tmp_path / "f")
    caplog.set_level("INFO", logger="efcm")
    rows = _extract(
        manifest, patches, tmp_path / "f", data, encoder="student", student=tmp_path / "s1.pt"
    )
    assert [r["reason"] for r in rows] == ["", ""]
    assert all(_inodes(tmp_path / "f")[s] != before[s] for s in before)
    old, new = sha256_file(tmp_path / "s0.pt"), sha256_file(tmp_path / "s1.pt")
    assert [m.split(": ", 1)[1] for m in _redo_messages(caplog)] == [
        f'extraction settings changed (weights_sha256 "{old}" -> "{new}"): redoing'
    ] * 2


def test_extract_redoes_only_the_slide_whose_coords_changed(tmp_path, two_patched, caplog):
    manifest, patches, data = two_patched
    first = _extract(manifest, patches, tmp_path / "f", data)
    before = _inodes(tmp_path / "f")
    m = read_manifest(manifest)
    a, b = m.slides
    # re-patch slide a alone with a finer step: its grid changes, b's does not
    finer = params_from_dict({**data, "patch": {**data["patch"], "step": 32}}).patch
    patch_manifest(type(m)(m.path, (a,)), patches, finer)
    caplog.set_level("INFO", logger="efcm")
    rows = _extract(manifest, patches, tmp_path / "f", data)
    assert [r["reason"] for r in rows] == ["", "already done"]
    after = _inodes(tmp_path / "f")
    assert after[a.slide_id] != before[a.slide_id] and after[b.slide_id] == before[b.slide_id]
    (msg,) = _redo_messages(caplog)
    assert msg.startswith(f"{a.slide_id}: extraction settings changed (coords.n ")
    assert "coords.sha256" in msg
    feats, coords = read_features(tmp_path / "f" / "features" / f"{a.slide_id}.h5")
    assert len(feats) == len(coords) == rows[0]["n_patches"] > first[0]["n_patches"]


def test_features_without_stored_settings_are_redone(tmp_path, two_patched, caplog):
    import h5py

    manifest, patches, data = two_patched
    _extract(manifest, patches, tmp_path / "f", data)
    sid = read_manifest(manifest).slides[0].slide_id
    with h5py.File(tmp_path / "f" / "features" / f"{sid}.h5", "a") as f:  # as efcm < this
        del f.attrs["efcm_extract_settings"]
    caplog.set_level("INFO", logger="efcm")
    rows = _extract(manifest, patches, tmp_path / "f", data)
    assert [r["reason"] for r in rows] == ["", "already done"]
    assert _redo_messages(caplog) == [
        f"{sid}: {sid}.h5 has no stored extraction settings (written by an older efcm): redoing"
    ]

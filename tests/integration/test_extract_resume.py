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

from efcm.config import params_from_dict
from efcm.features import features_complete, read_features
from efcm.manifest import read_manifest
from efcm.models.encoders import build_backbone
from efcm.slides.batch import patch_manifest
from tests.conftest import tiny_params_dict

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

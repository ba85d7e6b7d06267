"""Distillation on images under DDP for real: `efcm distill --kind image --nproc-per-node 2`
(torchrun, gloo on the CPU) against a single process, with a student without BatchNorm
(timm's test_vit), so that the two runs agree to float rounding: the image items go through the
slides' training loop unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from efcm.config import params_from_dict
from efcm.stages import extract_images
from tests.conftest import tiny_image_params_dict

pytestmark = pytest.mark.integration

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_processes_distil_images_as_one(fundus_demo, tmp_path):
    raw = tiny_image_params_dict()
    raw["student"] = {"arch": "test_vit", "input_size": 64, "model_kwargs": {"img_size": 64}}
    raw["distill"].update(method="vfd", epochs=2, checkpoint_steps=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    extract_images(fundus_demo, tmp_path / "t", params_from_dict(raw))
    metrics = {}
    for n in (1, 2):
        out = tmp_path / f"world{n}"
        cmd = [sys.executable, "-m", "efcm.cli", "distill", "--kind", "image"]
        cmd += ["--manifest", str(fundus_demo), "--teacher-features", str(tmp_path / "t")]
        cmd += ["--out", str(out), "--params", str(tmp_path / "params.yaml")]
        cmd += ["--nproc-per-node", str(n)]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics[n] = json.loads((out / "metrics.json").read_text())
    one, two = metrics[1], metrics[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["pixels"] == two["pixels"] == "images"
    assert one["val_cases"] == two["val_cases"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["items_seen"] == a["items_seen"] == 8  # 10 training images, 2 full batches of 4
        assert b["items_per_rank"] == [4, 4]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_mse"] == pytest.approx(a["val_mse"], rel=1e-4)
    assert Path(tmp_path / "world2" / "student.pt").is_file()

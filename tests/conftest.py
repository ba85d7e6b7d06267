"""Shared fixtures: tiny params, a tiny synthetic dataset, and the real slides in ../shared/data."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

# Overrides of params.yaml that make every stage take seconds on 2 CPU cores: 6 small slides,
# timm's tiny test models, 2 folds.
TINY = {
    "demo_data": {"slides": 6, "size": 1536, "slides_per_case": 1},
    "patch": {"target_mpp": 1.0, "patch_size": 64, "step": 64, "max_upsample": 64},
    "teacher": {"arch": "test_vit", "input_size": 64, "model_kwargs": {"img_size": 64}},
    "student": {"arch": "test_resnet", "input_size": 64},
    "extract": {"batch_size": 32},
    "distill": {"epochs": 1, "batch_size": 32},
    "train_mil": {
        "folds": 2,
        "epochs": 4,
        "min_epochs": 1,
        "patience": 2,
        "hidden": 32,
        "attn_dim": 16,
        "k_sample": 4,
        "val_fraction": 0.34,
    },
    "ib": {"k": 16, "epochs": 3, "hidden": 16, "samples": 4},
    "mil": {"etc": {"epochs": 1, "chunk": 16}},
    "evaluate": {"bootstrap": 50},
    "pipeline": {"shard_size": 3, "parallelism": 2},  # the 6 slides in 2 shards, both at once
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params_dict() -> dict:
    """params.yaml of the repo with the TINY overrides (a plain dict)."""
    return _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic slides (3 normal, 3 tumour), written once per session; returns the manifest."""
    from efcm.config import params_from_dict
    from efcm.stages import demo_data

    return demo_data(tmp_path_factory.mktemp("tiny_dataset"), params_from_dict(tiny_params_dict()))


@pytest.fixture(scope="session")
def demo_package(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package the demo pipeline exports, from its own stages (`efcm.stages`: patch, teacher
    extraction, distillation, student extraction, splits, Retrain CLAM, export) run on the tiny
    demo data; written once per session."""
    from efcm import stages
    from efcm.config import params_from_dict

    params = params_from_dict(tiny_params_dict())
    w = tmp_path_factory.mktemp("demo_pipeline")
    stages.patch(tiny_dataset, w / "patch", params)
    stages.extract(tiny_dataset, w / "patch", w / "extract_teacher", params, encoder="teacher")
    stages.distill(tiny_dataset, w / "patch", w / "extract_teacher", w / "distill", params)
    stages.extract(
        tiny_dataset,
        w / "patch",
        w / "extract_student",
        params,
        encoder="student",
        student=w / "distill",
    )
    stages.splits(tiny_dataset, w / "splits.json", params, features_dir=w / "extract_teacher")
    stages.train_mil(tiny_dataset, w / "extract_student", w / "splits.json", w / "mil", params)
    return stages.export(w / "distill", w / "mil", w / "package", params)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test slides not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gcs_emulator():
    """gcp-storage-emulator on 127.0.0.1 (a free port, in memory), for the whole session."""
    from tests import gcs

    with gcs.emulator() as emu:
        yield emu


@pytest.fixture
def gcs_bucket(gcs_emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh emulator bucket; `STORAGE_EMULATOR_HOST` points at it and `EFCM_CACHE_DIR` is private
    to the test (tmp_path/"gcs-cache"); efcm's download counters start at zero."""
    import uuid

    from efcm import storage
    from tests import gcs

    gcs.use_emulator(monkeypatch, gcs_emulator, tmp_path / "gcs-cache")
    storage.reset_download_stats()
    return gcs.create_bucket(gcs_emulator, f"efcm-test-{uuid.uuid4().hex[:12]}")

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


# The image path's overrides on top of TINY: the fundus task at 64 px, 16 demo images of 96 px
# (8 patients, 2 unlabelled), a tiny ViT teacher with the RETFound preset's pooling, 4 epochs.
TINY_IMAGE = {
    "image": {"preset": "fundus", "size": 64, "demo": {"images": 16, "size": 96, "unlabelled": 2}},
    "teacher": {
        "preset": "retfound",
        "arch": "vit_tiny_patch16_224",
        "input_size": 64,
        "model_kwargs": {"img_size": 64},
    },
    "extract": {"batch_size": 4},
    "distill": {"epochs": 4, "batch_size": 4, "lr": 1e-2, "val_fraction": 0.34},
}


def tiny_image_params_dict() -> dict:
    """tiny_params_dict() with the TINY_IMAGE overrides (a plain dict)."""
    return _merge(tiny_params_dict(), TINY_IMAGE)


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
def fundus_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fundus demo set of TINY_IMAGE (16 images, 8 patients), written once per session;
    returns its manifest."""
    from efcm.config import params_from_dict
    from efcm.stages import demo_data

    params = params_from_dict(tiny_image_params_dict())
    return demo_data(tmp_path_factory.mktemp("fundus_demo"), params, kind="fundus")


@pytest.fixture(scope="session")
def cxr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny multi-label chest X-ray run through every image command, export included
    (`tests.image_run`), made once per session; returns its folder (package/ is the package)."""
    from tests.image_run import cxr_params, run_image_cli

    return run_image_cli(tmp_path_factory.mktemp("cxr_run"), cxr_params())


def first_slides(manifest: Path, n: int, out: Path) -> Path:
    """A manifest of the first `n` slides of `manifest`, with absolute URIs, written to `out`."""
    from efcm.io.manifest import read_manifest

    m = read_manifest(manifest)
    lines = ["slide_id,case_id,uri,label"]
    lines += [f"{s.slide_id},{s.case_id},{manifest.parent / s.uri},{s.label}" for s in m.slides]
    out.write_text("\n".join(lines[: n + 1]) + "\n")
    return out


def run_demo_pipeline(
    manifest: Path,
    work: Path,
    params,
    strategies: tuple[str, ...],
    after_teacher=None,
) -> dict:
    """The demo pipeline's stages (`efcm.stages`, as dvc.yaml and the KFP graph run them) on
    `manifest` into `work`, with the strategies `strategies` (the others are skipped); returns
    {name: path} of every output, the package included. `after_teacher()`, when given, runs
    right after the teacher's extraction."""
    from efcm import stages
    from efcm.config import for_stage

    def p(stage: str):
        return for_stage(params, stage)

    w = {k: work / k for k in ("patch", "extract_teacher", "distill", "extract_student")}
    w.update(splits=work / "splits.json", teacher_mil=work / "train_mil_teacher")
    stages.patch(manifest, w["patch"], p("patch"))
    stages.extract(manifest, w["patch"], w["extract_teacher"], p("extract"), encoder="teacher")
    if after_teacher is not None:
        after_teacher()
    stages.distill(manifest, w["patch"], w["extract_teacher"], w["distill"], p("distill"))
    stages.extract(
        manifest,
        w["patch"],
        w["extract_student"],
        p("extract"),
        encoder="student",
        student=w["distill"],
        teacher_features=w["extract_teacher"],
    )
    stages.splits(manifest, w["splits"], p("splits"), features_dir=w["extract_teacher"])
    stages.train_mil(manifest, w["extract_teacher"], w["splits"], w["teacher_mil"], p("train_mil"))
    w["strategies"] = []
    for name in strategies:
        out = work / "strategies" / name
        stages.strategy(
            name,
            manifest,
            w["splits"],
            out,
            p("strategy"),
            patches=w["patch"],
            teacher_features=w["extract_teacher"],
            teacher_mil=w["teacher_mil"],
            student=w["distill"],
            student_features=w["extract_student"],
        )
        w["strategies"].append(out)
    w["evaluate"] = work / "evaluate"
    stages.evaluate(
        w["teacher_mil"], w["strategies"], w["evaluate"], p("evaluate"), manifest=manifest
    )
    w["package"] = stages.export(
        w["distill"],
        w["strategies"],
        work / "package",
        p("export"),
        metrics_path=w["evaluate"] / "metrics.json",
        patches_dir=w["patch"],
        manifest=manifest,
        teacher_features=w["extract_teacher"],
    )
    return w


@pytest.fixture(scope="session")
def demo_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo pipeline on the tiny demo data with Reuse and Retrain CLAM (the exported
    strategy), written once per session: {output name: path}, the package included."""
    from efcm.config import params_from_dict

    raw = tiny_params_dict()
    raw["mil"] = {**raw["mil"], "strategies": ["reuse", "retrain"]}
    params = params_from_dict(raw)
    return run_demo_pipeline(
        tiny_dataset, tmp_path_factory.mktemp("demo_pipeline"), params, ("reuse", "retrain")
    )


@pytest.fixture(scope="session")
def demo_package(demo_run: dict) -> Path:
    """The package the demo pipeline exports (Retrain CLAM's fold ensemble)."""
    return demo_run["package"]


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
    """A fresh emulator bucket; `STORAGE_EMULATOR_HOST` points at it and `EFCM_CACHE_DIR` (what
    the adapters' `SlideCache.from_env()` reads) is private to the test: tmp_path/"gcs-cache"."""
    import uuid

    from tests import gcs

    gcs.use_emulator(monkeypatch, gcs_emulator, tmp_path / "gcs-cache")
    return gcs.create_bucket(gcs_emulator, f"efcm-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def gcs_cache(gcs_bucket, tmp_path: Path):
    """A fresh `SlideCache` over the test's private cache folder (the one `EFCM_CACHE_DIR` names),
    20 GiB cap: its `stats` count what this test staged through it."""
    from efcm.io.cache import SlideCache

    return SlideCache(tmp_path / "gcs-cache", 20 << 30)


@pytest.fixture
def local_kfp(tmp_path):
    """kfp.local for this test only (it changes process-global state: tests/kfp_local.py);
    yields the pipeline root."""
    import docker
    from tests.kfp_local import local_pipeline_runs

    if not hasattr(docker, "DockerClient"):  # the repo's docker/ folder, a namespace package
        pytest.fail("kfp.local imports the `docker` package: pip install docker (the [dev] extra)")
    root = tmp_path / "pipeline_root"
    # also puts back builtins.print and the root logger, which overlapping tasks leave changed
    with local_pipeline_runs(root, tmp_path / "kfp_cache"):
        yield root

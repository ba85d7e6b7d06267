"""Encoders, checkpoint loading, the extraction engine, VFD distillation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from efcm.config import EncoderParams, ExtractParams, params_from_dict
from efcm.features import extract_manifest, read_features
from efcm.io.manifest import read_manifest
from efcm.models.encoders import EncoderWithTransform, PatchTransform, build_backbone, load_weights
from efcm.models.students import build_vfd
from efcm.slides.batch import patch_manifest
from tests.conftest import tiny_params_dict

TINY = params_from_dict(tiny_params_dict())


@pytest.fixture(scope="module")
def patched(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("patched")
    patch_manifest(read_manifest(tiny_dataset), out, TINY.patch)
    return tiny_dataset, out


def test_transform_crops_and_normalises():
    spec = EncoderParams(arch="test_resnet", input_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
    y = PatchTransform(spec)(x)
    assert y.shape == (2, 3, 48, 48)
    assert torch.allclose(y, torch.ones_like(y))


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "dino_teacher", "prefixed"])
def test_checkpoint_layouts_load(tmp_path, layout):
    spec = EncoderParams(arch="test_resnet")
    src, _ = build_backbone(spec, warn_random=False)
    sd = src.state_dict()
    wrapped = {
        "plain": sd,
        "model": {"model": sd},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "dino_teacher": {"teacher": {f"backbone.{k}": v for k, v in sd.items()}},
        "prefixed": {f"module.encoder.{k}": v for k, v in sd.items()},
    }[layout]
    torch.save(wrapped, tmp_path / "w.pt")
    dst, _ = build_backbone(spec, warn_random=False)
    sha = load_weights(dst, str(tmp_path / "w.pt"))
    assert len(sha) == 64
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_shape_mismatch_names_the_key(tmp_path):
    spec = EncoderParams(arch="test_resnet")
    model, _ = build_backbone(spec, warn_random=False)
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if v.ndim == 4)
    sd[key] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_weights(model, str(tmp_path / "bad.pt"))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="no_such_net"):
        build_backbone(EncoderParams(arch="no_such_net"))


def test_extraction_is_batch_size_invariant_and_resumes(patched, tmp_path):
    manifest, pdir = patched
    backbone, _ = build_backbone(TINY.teacher, warn_random=False)
    model = EncoderWithTransform(backbone, TINY.teacher).eval()
    m = read_manifest(manifest)
    a = extract_manifest(model, m, pdir, tmp_path / "a", ExtractParams(batch_size=1), {"arch": "t"})
    b = extract_manifest(
        model, m, pdir, tmp_path / "b", ExtractParams(batch_size=64), {"arch": "t"}
    )
    assert all(r["status"] == "ok" for r in a + b)
    for s in m.slides:
        fa, ca = read_features(tmp_path / "a" / "features" / f"{s.slide_id}.h5")
        fb, cb = read_features(tmp_path / "b" / "features" / f"{s.slide_id}.h5")
        assert fa.shape == (len(ca), 64)
        np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)
        assert np.array_equal(ca, cb)
    again = extract_manifest(model, m, pdir, tmp_path / "a", ExtractParams(), {"arch": "t"})
    assert all(r["reason"] == "already done" for r in again)


def test_extraction_with_workers_matches(patched, tmp_path):
    manifest, pdir = patched
    backbone, _ = build_backbone(TINY.teacher, warn_random=False)
    model = EncoderWithTransform(backbone, TINY.teacher).eval()
    m = read_manifest(manifest)
    m1 = type(m)(m.path, m.slides[:1])
    extract_manifest(model, m1, pdir, tmp_path / "w0", ExtractParams(num_workers=0), {})
    extract_manifest(
        model, m1, pdir, tmp_path / "w2", ExtractParams(num_workers=2, batch_size=8), {}
    )
    sid = m.slides[0].slide_id
    np.testing.assert_allclose(
        read_features(tmp_path / "w0" / "features" / f"{sid}.h5")[0],
        read_features(tmp_path / "w2" / "features" / f"{sid}.h5")[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_student_outputs_teacher_space():
    s = build_vfd(EncoderParams(arch="test_resnet"), out_dim=64, warn_random=False)
    s.set_target_stats(torch.full((64,), 3.0), torch.full((64,), 2.0))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(s(x), s.standardised(x) * 2 + 3)


def test_vfd_brings_the_student_closer_to_the_teacher(patched, tmp_path):
    from efcm import stages

    manifest, pdir = patched
    params = params_from_dict(
        {
            **tiny_params_dict(),
            "distill": {"epochs": 3, "batch_size": 16, "lr": 0.003, "val_fraction": 0.34},
        }
    )
    stages.extract(manifest, pdir, tmp_path / "teacher", params)
    m = stages.distill(manifest, pdir, tmp_path / "teacher", tmp_path / "distill", params)
    losses = [h["train_loss"] for h in m["history"]]
    assert losses[-1] < losses[0]
    assert m["val_after"]["val_centered_cosine"] > m["val_before"]["centered_cosine"] + 0.1
    assert set(m["val_slides"]).isdisjoint(m["train_slides"])
    assert Path(tmp_path / "distill" / "student.pt").is_file()

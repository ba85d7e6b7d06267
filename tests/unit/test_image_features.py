"""The image teachers (RETFound, MRM presets) and image feature extraction (efcm.image_features)."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efcm.config import ConfigError, EncoderParams, params_from_dict
from efcm.errors import BatchFailed
from efcm.image_features import extract_images, read_image_features
from efcm.images.reader import ImageReader
from efcm.io.image_manifest import read_image_manifest
from efcm.models.encoders import EncoderWithTransform, build_backbone, create_timm, load_weights
from efcm.stages import extract_images as extract_stage
from tests.conftest import tiny_image_params_dict

PARAMS = params_from_dict(tiny_image_params_dict())


@pytest.mark.parametrize(("preset", "dim"), [("retfound", 1024), ("mrm", 768)])
def test_the_presets_are_vit_l_and_vit_b_with_global_pooled_features(preset, dim):
    spec = EncoderParams(preset=preset)
    assert spec.input_size == 224 and spec.model_kwargs == {"global_pool": "avg"}
    with torch.device("meta"):  # the real architecture, without its memory
        model = create_timm(spec.arch, **spec.model_kwargs)
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, dim) and model.num_features == dim
    assert model.patch_embed.patch_size == (16, 16) and model.global_pool == "avg"


def test_model_kwargs_next_to_a_preset_keep_its_pooling():
    spec = EncoderParams(
        preset="retfound", arch="vit_tiny_patch16_224", model_kwargs={"img_size": 32}
    )
    assert spec.model_kwargs == {"global_pool": "avg", "img_size": 32}
    assert EncoderParams(preset="retfound", model_kwargs={"global_pool": "token"}).model_kwargs == {
        "global_pool": "token"
    }


@pytest.mark.parametrize("preset", ["retfound", "mrm"])
def test_the_features_are_the_mean_patch_token_then_fc_norm(preset):
    """RETFound's fine-tuning code with global_pool=True: blocks -> mean of the patch tokens
    (class token left out) -> LayerNorm fc_norm; the final norm is not applied."""
    spec = EncoderParams(preset=preset, arch="vit_tiny_patch16_224", model_kwargs={"img_size": 32})
    torch.manual_seed(0)
    model, _ = build_backbone(spec, warn_random=False)
    with torch.no_grad():  # a non-trivial fc_norm, so that it is seen to act
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = model.patch_embed(x)
        t = torch.cat([model.cls_token.expand(3, -1, -1), t], 1) + model.pos_embed
        for block in model.blocks:
            t = block(t)
        mean = t[:, 1:].mean(1)  # 4 patch tokens; the class token is t[:, 0]
        want = F.layer_norm(mean, (192,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
        got = model(x)
    assert isinstance(model.norm, nn.Identity)
    assert got.shape == (3, 192)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, F.layer_norm(t[:, 0], (192,), eps=1e-6), atol=1e-2)


def test_a_retfound_style_checkpoint_loads_with_its_prefixes_and_reports_keys(tmp_path, caplog):
    """An MAE-style checkpoint: {"model": ...} with `module.` prefixes, the pretraining's final
    `norm` and decoder (unexpected here), no fc_norm (missing: fresh, as in RETFound's
    fine-tuning)."""
    spec = EncoderParams(
        preset="retfound", arch="vit_tiny_patch16_224", model_kwargs={"img_size": 32}
    )
    torch.manual_seed(1)
    src, _ = build_backbone(spec, warn_random=False)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc_norm.")}
    sd.update({"norm.weight": torch.ones(192), "decoder_embed.weight": torch.zeros(8, 192)})
    torch.save(
        {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 799}, tmp_path / "w.pth"
    )
    torch.manual_seed(2)
    dst, _ = build_backbone(spec, warn_random=False)
    with caplog.at_level(logging.WARNING, logger="efcm.models.encoders"):
        sha = load_weights(dst, str(tmp_path / "w.pth"))
    assert len(sha) == 64
    for k, v in dst.state_dict().items():
        if not k.startswith("fc_norm."):
            assert torch.equal(v, sd[k]), k
    text = caplog.text
    assert "2 missing keys" in text and "fc_norm.weight" in text
    assert "2 unexpected keys" in text and "decoder_embed.weight" in text


# -- extraction -----------------------------------------------------------------------------------


@pytest.fixture
def demo_with_a_bad_file(fundus_demo, tmp_path) -> Path:
    """A copy of the fundus demo whose third image is not an image."""
    root = tmp_path / "demo"
    shutil.copytree(fundus_demo.parent, root)
    m = read_image_manifest(root / "manifest.csv")
    (root / m.images[2].uri).write_bytes(b"this is not an image")
    return root / "manifest.csv"


def _status(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "status.csv") as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


def test_extraction_writes_a_row_per_ok_image_and_a_status_for_a_bad_one(
    demo_with_a_bad_file, tmp_path
):
    out = tmp_path / "teacher"
    params = params_from_dict(_with(extract={"batch_size": 4, "num_workers": 1}))
    rows = extract_stage(demo_with_a_bad_file, out, params)
    m = read_image_manifest(demo_with_a_bad_file)
    bad = m.images[2].image_id
    status = _status(out)
    assert len(rows) == len(status) == 16
    assert status[bad]["status"] == "unreadable" and m.images[2].uri in status[bad]["reason"]
    assert all(r["status"] == "ok" for k, r in status.items() if k != bad)

    feats = read_image_features(out)
    ok = [e for e in m.images if e.image_id != bad]
    assert feats.image_ids == [e.image_id for e in ok]
    assert feats.uris == [e.uri for e in ok]
    assert feats.features.shape == (15, 192)
    assert feats.settings["preprocess"]["crop"] == "fundus"
    assert feats.settings["model_kwargs"]["global_pool"] == "avg"
    # each row is the teacher's feature of that image, read and preprocessed by the reader
    torch.manual_seed(params.seed)
    net, _ = build_backbone(params.teacher, warn_random=False)
    model = EncoderWithTransform(net, params.image.encoder_spec(params.teacher)).eval()
    reader = ImageReader(params.image, m.base_dir)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([reader(ok[0]), reader(ok[-1])]))
        want = model(x).numpy()
    np.testing.assert_allclose(feats.features[[0, -1]], want, atol=1e-4)


def test_a_rerun_reuses_the_features_and_a_changed_setting_redoes_them(
    demo_with_a_bad_file, tmp_path
):
    out = tmp_path / "teacher"
    extract_stage(demo_with_a_bad_file, out, PARAMS)
    before = read_image_features(out)
    mtime = (out / "features.h5").stat().st_mtime_ns
    extract_stage(demo_with_a_bad_file, out, PARAMS)
    status = _status(out)
    reasons = {r["reason"] for r in status.values() if r["status"] == "ok"}
    assert reasons == {"already done"}
    assert sum(r["status"] == "unreadable" for r in status.values()) == 1  # tried again
    again = read_image_features(out)
    assert again.image_ids == before.image_ids
    np.testing.assert_array_equal(again.features, before.features)
    assert (out / "features.h5").stat().st_mtime_ns != mtime  # rewritten, atomically

    half = params_from_dict(_with(extract={"batch_size": 4, "float16": True}))
    extract_stage(demo_with_a_bad_file, out, half)
    assert {r["reason"] for r in _status(out).values() if r["status"] == "ok"} == {""}
    with h5py.File(out / "features.h5") as f:
        assert f["features"].dtype == np.float16


def test_every_image_failing_fails_the_stage_with_the_status_written(tmp_path, fundus_demo):
    m = read_image_manifest(fundus_demo)
    lines = ["image_id,case_id,uri,label"] + [
        f"{e.image_id},{e.case_id},nowhere/{e.image_id}.png," for e in m.images[:3]
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BatchFailed, match="every image failed"):
        extract_stage(tmp_path / "manifest.csv", tmp_path / "out", PARAMS)
    assert {r["status"] for r in _status(tmp_path / "out").values()} == {"missing"}


class _Broken(nn.Module):
    """An encoder with a bug: every forward raises."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyError("a bug")


def test_an_unexpected_error_on_most_images_fails_the_run(fundus_demo, tmp_path):
    m = read_image_manifest(fundus_demo)
    reader = ImageReader(PARAMS.image, m.base_dir)
    with pytest.raises(BatchFailed, match=r"unexpected error on 16 of 16 .*KeyError"):
        extract_images(_Broken(), m, reader, tmp_path, PARAMS.extract, {"encoder": "x"})
    assert {r["status"] for r in _status(tmp_path).values()} == {"error"}


def test_the_image_extraction_refuses_a_bad_encoder_name(fundus_demo, tmp_path):
    with pytest.raises(ConfigError, match="encoder must be"):
        extract_stage(fundus_demo, tmp_path, PARAMS, encoder="teachr")


def _with(**sections) -> dict:
    data = tiny_image_params_dict()
    for k, v in sections.items():
        data[k] = {**data[k], **v}
    return data


def test_the_cli_extracts_images_and_keeps_patches_to_slides(fundus_demo, tmp_path):
    import yaml

    from efcm.cli import EXIT_OK, EXIT_USAGE, main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_image_params_dict()))
    argv = ["extract", "--params", str(tmp_path / "params.yaml"), "--encoder", "teacher"]
    argv += ["--manifest", str(fundus_demo), "--out", str(tmp_path / "o")]
    assert main([*argv, "--kind", "image", "--patches", "p"]) == EXIT_USAGE
    assert main(argv) == EXIT_USAGE  # slides need --patches
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--kind", "image"]) == EXIT_OK
    assert read_image_features(tmp_path / "o").features.shape == (16, 192)

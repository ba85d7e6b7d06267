"""End-to-end fine-tuning of the student with a linear head (efcm.training.image_finetune) on
the synthetic fundus and CXR demos, and the pieces it shares with the slide ETC
(efcm.training.end2end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from efcm.config import ConfigError, FpdParams, params_from_dict
from efcm.images.reader import ImageReader
from efcm.io.image_manifest import LabelSpace, read_image_manifest
from efcm.io.results import VAL_PREDICTIONS, read_folds, read_predictions, read_summary
from efcm.models.encoders import PatchTransform
from efcm.models.image_head import load_head
from efcm.models.students import build_fpd, build_vfd, load_student, save_student
from efcm.training.end2end import augment, freeze_student, two_rate_adamw
from efcm.training.image_finetune import finetune_images
from efcm.training.image_heads import image_splits
from tests.conftest import _merge, tiny_image_params_dict

FAST = {"epochs": 2, "min_epochs": 1, "batch_size": 4, "lr": 1e-2, "num_workers": 0}
FROZEN = ("backbone.conv1", "backbone.bn1", "backbone.layer1.", "backbone.layer2.")


def _params(image: dict | None = None):
    over = {"image": {"finetune": FAST, **(image or {})}}
    return params_from_dict(_merge(tiny_image_params_dict(), over))


def _space(params) -> LabelSpace:
    p = params.image
    return LabelSpace(p.classes, p.multi_label, p.none_label)


def _student(params, path: Path) -> Path:
    """A distilled-student checkpoint as image distillation writes it (random weights)."""
    torch.manual_seed(0)
    student = build_vfd(params.student, 16, warn_random=False)
    save_student(path, student, params.image.encoder_spec(params.student))
    return path


def _run(manifest: Path, params, out: Path, ckpt: Path | None = None) -> tuple[dict, dict, Path]:
    space = _space(params)
    m = read_image_manifest(manifest, space)
    splits = image_splits(m, space, 2, 0.34, seed=0)
    ckpt = ckpt or _student(params, out.parent / "student.pt")
    summary = finetune_images(m, space, ckpt, splits, out, params.image, seed=0)
    return summary, splits, ckpt


def test_fine_tuning_writes_every_fold_in_the_heads_layout(fundus_demo, tmp_path):
    params = _params({"finetune": {**FAST, "num_workers": 1}})  # a worker reads the images
    out = tmp_path / "finetune"
    summary, splits, _ = _run(fundus_demo, params, out)
    classes = params.image.classes
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert summary["feature_dim"] == 16 and not summary["multi_label"]
    assert summary["unlabelled"] == 2 and read_summary(out) == summary
    assert all(1 <= f["best_epoch"] <= 2 and len(f["history"]) == 2 for f in summary["folds"])
    # the reader evaluation uses: every labelled image tested once, validation per fold
    probs, labels, tested = read_predictions(out / "predictions.csv", classes)
    assert sorted(tested) == sorted(s for f in splits["folds"] for s in f["test"])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    truth = read_image_manifest(fundus_demo, _space(params)).targets(_space(params))
    assert [truth[s] for s in tested] == labels.tolist()
    _, _, val_ids = read_predictions(out / VAL_PREDICTIONS, classes)
    val_folds = read_folds(out / VAL_PREDICTIONS)
    for k, f in enumerate(splits["folds"]):
        assert sorted(s for s, g in zip(val_ids, val_folds, strict=True) if g == k) == f["val"]
    # fold k's head on fold k's fine-tuned student gives the predictions written
    m = read_image_manifest(fundus_demo, _space(params))
    reader = ImageReader(params.image, m.base_dir)
    entries = {e.image_id: e for e in m.images}
    for k, f in enumerate(splits["folds"]):
        head = load_head(out / f"fold_{k}.pt")
        student, spec = load_student(out / f"student_fold_{k}.pt")
        assert head.in_dim == student.out_dim == 16 and head.n_classes == 2
        x = torch.from_numpy(np.stack([reader(entries[s]) for s in f["test"]]))
        with torch.no_grad():
            mine = head.probabilities(student(PatchTransform(spec)(x))).numpy()
        rows = [tested.index(s) for s in f["test"]]
        np.testing.assert_allclose(mine, probs[rows], atol=1e-4)


def test_frozen_parameters_stay_and_the_others_train(fundus_demo, tmp_path):
    out = tmp_path / "finetune"
    _, _, ckpt = _run(fundus_demo, _params({"finetune": {**FAST, "min_epochs": 2}}), out)
    before = load_student(ckpt)[0].state_dict()
    for k in range(2):
        after = load_student(out / f"student_fold_{k}.pt")[0].state_dict()
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        frozen = [n for n in before if n.startswith(FROZEN)]
        assert frozen and not changed & set(frozen), sorted(changed & set(frozen))[:5]
        bn_stats = [n for n in before if "running_" in n or "num_batches_tracked" in n]
        assert bn_stats and not changed & set(bn_stats)
        assert any(n.startswith("backbone.layer4.") for n in changed)
        assert any(n.startswith("proj.") for n in changed)


def test_an_fpd_student_trains_its_projection_and_reloads_with_its_own_shapes(
    fundus_demo, tmp_path
):
    """The FPD student's shallow CNN is frozen whatever freeze_stages says; a fine-tuned copy is
    saved with the configuration it was distilled with (not the defaults)."""
    params = _params({"finetune": {**FAST, "epochs": 1}})
    cfg = FpdParams(shallow_stage=2, embed_dim=32, depth=1, heads=2)
    torch.manual_seed(0)
    ckpt = tmp_path / "student.pt"
    student = build_fpd(params.student, 16, cfg, warn_random=False)
    save_student(ckpt, student, params.image.encoder_spec(params.student), fpd=cfg)
    out = tmp_path / "finetune"
    _run(fundus_demo, params, out, ckpt)
    before = student.state_dict()
    tuned, _ = load_student(out / "student_fold_0.pt")
    after = tuned.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("projection.") for n in changed)


def test_the_student_learns_at_the_factor_below_the_head(fundus_demo, tmp_path):
    params = _params({"finetune": {**FAST, "epochs": 1, "backbone_lr_factor": 0.05}})
    summary, _, _ = _run(fundus_demo, params, tmp_path / "finetune")
    for f in summary["folds"]:
        assert f["lr"] == {"head": pytest.approx(1e-2), "student": pytest.approx(5e-4)}
    # the optimiser: the student's trainable parameters (only those) at lr x factor
    student = build_vfd(params.student, 8, warn_random=False)
    trainable = freeze_student(student, 2, "image.finetune.freeze_stages")
    head = torch.nn.Linear(8, 2)
    opt = two_rate_adamw(student, head.parameters(), 0.1, 0.25, 0.0)
    named = {id(p): n for n, p in student.named_parameters()}
    assert [named[id(p)] for p in opt.param_groups[0]["params"]] == trainable
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups[1]["lr"] == 0.1 and len(opt.param_groups[1]["params"]) == 2


def test_freezing_every_stage_of_a_backbone_without_a_projection_is_refused():
    from efcm.models.students import BackboneStudent, build_backbone

    params = _params()

    def student():
        return BackboneStudent(build_backbone(params.student, warn_random=False)[0])

    key = "image.finetune.freeze_stages"
    with pytest.raises(ConfigError, match=rf"{key}: freeze_stages=9: .* has only 4 stages"):
        freeze_student(student(), 9, key)
    with pytest.raises(ConfigError, match=rf"{key}=4 freezes every student parameter"):
        freeze_student(student(), 4, key)
    assert freeze_student(student(), 3, key)


def test_chest_x_rays_are_never_flipped_vertically_or_turned():
    assert _params({"preset": "cxr"}).image.orientation == "upright"
    assert _params({"preset": "fundus"}).image.orientation == "free"
    x = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
    y = augment(x, np.random.default_rng(1), 0.0, "upright")
    mirrored = [np.array_equal(b, a[:, ::-1]) for a, b in zip(x, y, strict=True)]
    same = [np.array_equal(b, a) for a, b in zip(x, y, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 10 < sum(mirrored) < 54  # about half are mirrored left to right
    assert not any(np.array_equal(b, a[::-1]) for a, b in zip(x, y, strict=True))
    # a fundus may be turned: some outputs are neither the image nor its mirror
    z = augment(x, np.random.default_rng(1), 0.0, "free")
    assert any(not np.array_equal(b, a) and not np.array_equal(b, a[:, ::-1])
               for a, b in zip(x, z, strict=True))  # fmt: skip
    assert np.array_equal(augment(x, np.random.default_rng(1), 0.0, "fixed"), x)
    # a grey image stays grey under the jitter of a grey task
    grey = np.repeat(x[..., :1], 3, axis=3)
    g = augment(grey, np.random.default_rng(2), 0.2, "upright", per_channel=False)
    assert not np.array_equal(g, grey) and (g == g[..., :1]).all()


def test_multi_label_fine_tuning_on_a_small_cxr_demo(tmp_path):
    from efcm.stages import demo_data

    params = _params({"preset": "cxr", "demo": {"images": 20, "size": 96, "unlabelled": 2}})
    manifest = demo_data(tmp_path / "cxr", params, kind="cxr")
    summary, _, _ = _run(manifest, params, tmp_path / "finetune")
    classes = params.image.classes
    assert summary["multi_label"] and summary["classes"] == list(classes)
    probs, targets, tested = read_predictions(tmp_path / "finetune" / "predictions.csv", classes,
                                              multi_label=True)  # fmt: skip
    assert probs.shape == targets.shape == (len(tested), 3)
    assert set(np.unique(targets)) <= {0, 1} and ((probs > 0) & (probs < 1)).all()
    assert not np.allclose(probs.sum(1), 1)  # a sigmoid per class, not a softmax
    truth = read_image_manifest(manifest, _space(params)).targets(_space(params))
    assert all(np.array_equal(targets[i], truth[s]) for i, s in enumerate(tested))
    assert all(np.isfinite(h["train_loss"]) for f in summary["folds"] for h in f["history"])

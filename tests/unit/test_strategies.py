"""The EFCM strategies: Reuse CLAM's precondition, ETC's freezing, the stage plumbing."""

import json

import numpy as np
import pytest
import torch

from efcm.config import ConfigError, params_from_dict
from efcm.io.manifest import read_manifest
from efcm.models.freeze import freeze_batchnorm, freeze_stages
from efcm.models.students import build_vfd
from efcm.slides.batch import patch_manifest
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import read_coords
from efcm.training.strategies import augment, augment_draws, train_etc_fold
from tests.conftest import tiny_params_dict


def test_reuse_with_mcm_is_left_out_by_auto_and_an_error_when_listed():
    """An MCM-KD student is not in the teacher's feature space: `auto` leaves Reuse CLAM out
    (saying why); listing it is a config error naming both keys."""
    from efcm.stages import plan_strategies

    run, left_out = plan_strategies(params_from_dict({"distill": {"method": "mcm"}}))
    assert run == ["retrain", "etc"] and "'mcm'" in left_out["reuse"]
    with pytest.raises(ConfigError, match=r"mil\.strategies.*'reuse'.*distill\.method.*'mcm'"):
        params_from_dict({"distill": {"method": "mcm"}, "mil": {"strategies": ["reuse", "etc"]}})
    ok = params_from_dict({"distill": {"method": "mcm"}, "mil": {"strategies": ["retrain", "etc"]}})
    assert ok.mil.strategies == ("retrain", "etc")


def test_augment_keeps_shape_and_changes_pixels():
    x = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    y = augment(x, np.random.default_rng(1), 0.05)
    assert y.shape == x.shape and y.dtype == np.uint8 and not np.array_equal(x, y)


@pytest.mark.parametrize("jitter", [0.0, 0.05])
def test_a_rank_that_skips_a_bag_draws_its_augmentation_and_stays_in_step(jitter):
    """Under DDP a rank leaves other ranks' bags out; drawing their augmentation without the
    pixels leaves its stream where a single process's is, so its own bags get the same flips."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) for n in (5, 7))
    one = np.random.default_rng(3)
    augment(a, one, jitter)
    expected = augment(b, one, jitter)
    skipping = np.random.default_rng(3)
    augment_draws(skipping, len(a), jitter)
    np.testing.assert_array_equal(augment(b, skipping, jitter), expected)


def test_only_etc_runs_on_several_processes_with_an_accumulate_they_divide():
    from efcm.stages import check_strategy_processes

    raw = tiny_params_dict()
    raw["mil"]["etc"]["accumulate"] = 4
    params = params_from_dict(raw)
    check_strategy_processes("etc", params, 2)
    check_strategy_processes("reuse", params, 1)
    with pytest.raises(ConfigError, match="'retrain' runs as one process"):
        check_strategy_processes("retrain", params, 2)
    with pytest.raises(ConfigError, match=r"mil\.etc\.accumulate 4 does not divide by the 3"):
        check_strategy_processes("etc", params, 3)


def test_strategy_cli_refuses_several_processes_before_launching(
    tmp_path, capsys, tiny_params_file
):
    """`efcm strategy --nproc-per-node N` exits 2 naming the problem, and starts nothing."""
    from efcm.cli import main

    argv = ["--manifest", "m.csv", "--splits", "s.json", "--out", str(tmp_path / "o")]
    argv += ["--params", str(tiny_params_file), "--nproc-per-node", "2"]
    assert main(["strategy", "retrain", *argv]) == 2
    assert "'retrain' runs as one process" in capsys.readouterr().err
    assert main(["strategy", "etc", *argv]) == 2  # the tiny params' accumulate is 1
    assert "mil.etc.accumulate 1 does not divide by the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_etc_one_step_updates_only_the_unfrozen_student_layers(tiny_dataset, tmp_path):
    """One ETC epoch on a 2-slide dataset: late stages and the projection change, the stem, the
    first stages and every BatchNorm statistic do not."""
    raw = tiny_params_dict()
    raw["student"] = {"arch": "resnet10t", "input_size": 64}
    raw["mil"]["etc"] = {"epochs": 1, "chunk": 8, "freeze_stages": 2, "lr": 0.01}
    params = params_from_dict(raw)
    m = read_manifest(tiny_dataset)
    two = [s for s in m.slides if s.label == "normal"][:1] + [
        s for s in m.slides if s.label == "tumour"
    ][:1]
    patch_manifest(type(m)(m.path, tuple(two)), tmp_path, params.patch)
    slides = {
        s.slide_id: SlidePatches(
            s.uri, read_coords(tmp_path / "patches" / f"{s.slide_id}.h5"), m.base_dir
        )
        for s in two
    }
    topk = {sid: np.arange(min(6, len(sp))) for sid, sp in slides.items()}
    labels = {s.slide_id: params.dataset.classes.index(s.label) for s in two}
    torch.manual_seed(0)
    student = build_vfd(params.student, 16, warn_random=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trained = train_etc_fold(
        student,
        params.student,
        slides,
        topk,
        labels,
        list(slides),
        params,
        seed=0,
        device=torch.device("cpu"),
    )
    after = trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.layer4.") for k in changed)
    assert any(k.startswith("proj.") for k in changed)
    frozen = [
        k
        for k in before
        if k.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1.", "backbone.layer2."))
    ]
    assert frozen and not changed & set(frozen), sorted(changed & set(frozen))[:5]
    bn_stats = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert bn_stats and not changed & set(bn_stats)


def test_freeze_helpers():
    params = params_from_dict({"student": {"arch": "resnet10t"}})
    s = build_vfd(params.student, 8, warn_random=False)
    names = freeze_stages(s, 2)
    assert names and all(
        n.startswith(("backbone.layer3.", "backbone.layer4.", "proj.")) for n in names
    )
    freeze_batchnorm(s)
    bns = [m for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)


def test_skipped_strategy_leaves_its_row_out(tiny_dataset, tmp_path):
    from efcm import stages
    from efcm.config import for_stage

    params = params_from_dict({**tiny_params_dict(), "mil": {"strategies": ["retrain"]}})
    summary = stages.strategy(
        "reuse",
        tiny_dataset,
        tmp_path / "s.json",
        tmp_path / "reuse",
        for_stage(params, "strategy"),
        teacher_mil=tmp_path / "t",
        student_features=tmp_path / "f",
    )
    assert summary["skipped"] and "mil.strategies" in summary["reason"]
    written = json.loads((tmp_path / "reuse" / "summary.json").read_text())
    assert written["skipped"] and written["strategy"] == "reuse"
    # evaluation, export and the report take no row from it
    assert stages.read_strategy_dirs([tmp_path / "reuse"]) == {}


def test_export_of_an_etc_dir_packs_its_fine_tuned_students(tmp_path):
    """ETC fine-tunes the student per fold: the package pairs fold k's CLAM with fold k's
    fine-tuned student (never the distilled one), and serves their ensemble."""
    from efcm.errors import PackageError
    from efcm.models.package import load_package
    from efcm.models.students import load_student
    from efcm.runtimes import load_runtime
    from efcm.training.export import export_package
    from tests.packages import SLIDES_PER_FOLD, build_package

    params = params_from_dict(tiny_params_dict())
    runtimes = ("onnx", "int8")
    pkg = load_package(
        build_package(tmp_path, params, 16, strategy="etc", folds=2, runtimes=runtimes)
    )
    assert pkg.meta["strategy"] == "etc" and pkg.meta["row"] == "student.vfd.etc"
    assert pkg.meta["ensemble"]["students"] == ["student_fold_0.pt", "student_fold_1.pt"]
    assert pkg.n_members == 2 and pkg.feature_dim == 2 * 16
    distilled, _ = load_student(tmp_path / "student.pt")
    x = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    with torch.no_grad():  # fold k embeds with its fine-tuned student, not the distilled one
        members = []
        for k in range(2):
            tuned, _ = load_student(tmp_path / "strategies" / "etc" / f"student_fold_{k}.pt")
            enc = pkg.member(k).encoder
            members.append(enc(x))
            assert torch.allclose(members[k], tuned.eval()(enc.transform(x)))
            assert not torch.allclose(members[k], distilled.eval()(enc.transform(x)))
        assert torch.allclose(pkg.encoder(x), torch.cat(members, dim=1))
        # the ONNX graph is the same ensemble: the k students side by side
        onnx = load_runtime(pkg.path, "onnx")
        np.testing.assert_allclose(onnx.embed([x.numpy()]), pkg.encoder(x).numpy(), atol=1e-4)
    for name in runtimes:  # measured on every test slide of both folds
        assert pkg.meta["runtimes"][name]["parity"]["slides"] == 2 * SLIDES_PER_FOLD
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "summary.json").write_text(
        json.dumps({"strategy": "etc", "skipped": True, "reason": "r"})
    )
    with pytest.raises(PackageError, match="nothing to export"):
        export_package(
            tmp_path / "student.pt",
            tmp_path / "skip",
            tmp_path / "p2",
            params,
            json.loads((tmp_path / "metrics.json").read_text()),
            tmp_path / "patch",
        )

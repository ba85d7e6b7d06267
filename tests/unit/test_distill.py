"""The three distillation methods: VFD, FPD (+ TransScan), MCM-KD."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from efcm.config import params_from_dict
from efcm.models.mcm import grid_windows, masked_l1, random_mask
from efcm.models.students import BackboneStudent, FPDStudent, load_student, save_student
from efcm.models.transscan import SelectiveKernel, TransScan
from efcm.training.distill import Trainee
from tests.conftest import first_slides, tiny_params_dict

D = 16  # teacher dim of these tests


def _params(method: str, **distill):
    p = tiny_params_dict()
    if method == "mcm":  # an MCM student is not in the teacher's space: no Reuse CLAM
        p["mil"] = {**p["mil"], "strategies": ["retrain", "etc"]}
    p["distill"] = {
        **p["distill"],
        "method": method,
        **distill,
        "fpd": {"shallow_stage": 2, "embed_dim": 32, "depth": 1, "heads": 2},
        "mcm": {"window": 2, "embed_dim": 32, "depth": 1, "heads": 2},
    }
    return params_from_dict(p)


def _batch(method: str, rng: np.random.Generator):
    if method == "mcm":
        patches = torch.from_numpy(rng.integers(0, 255, (3, 4, 64, 64, 3), dtype=np.uint8))
        targets = torch.from_numpy(rng.normal(size=(3, 4, D)).astype(np.float32))
        valid = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
        return [patches, targets, valid]
    x = torch.from_numpy(rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8))
    return [x, torch.from_numpy(rng.normal(size=(6, D)).astype(np.float32))]


@pytest.mark.parametrize("method", ["vfd", "fpd", "mcm"])
def test_each_method_lowers_its_loss_on_a_fixed_batch(method):
    torch.manual_seed(0)
    model = Trainee(_params(method), D)
    batch = _batch(method, np.random.default_rng(0))
    opt = torch.optim.Adam(model.trainable(), lr=3e-3)
    losses = []
    for _ in range(25):
        g = torch.Generator().manual_seed(1)  # the same masks each step
        loss = model.loss(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_fpd_trains_only_the_projection():
    torch.manual_seed(0)
    model = Trainee(_params("fpd"), D)
    assert isinstance(model.student, FPDStudent)
    shallow = {k: v.clone() for k, v in model.student.shallow.state_dict().items()}
    proj = {k: v.clone() for k, v in model.student.projection.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model.loss(_batch("fpd", np.random.default_rng(1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.student.shallow.state_dict().items():  # weights AND BatchNorm statistics
        assert torch.equal(v, shallow[k]), f"frozen {k} changed"
    assert any(
        not torch.equal(v, proj[k]) for k, v in model.student.projection.state_dict().items()
    )
    n_trainable = sum(p.numel() for p in model.trainable())
    assert n_trainable == sum(p.numel() for p in model.student.projection.parameters())


def test_selective_kernel_fuses_two_dilations_by_branch_attention():
    sk = SelectiveKernel(8, reduction=2)
    assert [b[0].dilation for b in sk.branches] == [(1, 1), (2, 2)]
    x = torch.randn(2, 8, 5, 5)
    out, attn = sk.forward_with_attention(x)
    assert out.shape == (2, 8, 5, 5)
    assert torch.allclose(attn.sum(1), torch.ones(2, 8))
    assert torch.equal(sk(x), out)
    assert TransScan(8, 24, embed_dim=16, depth=1, heads=2)(torch.randn(3, 8, 4, 6)).shape == (
        3,
        24,
    )


def test_selective_kernel_keeps_no_per_call_state_on_the_module():
    # one module serves several threads at once (the predictor): a call may write nothing that
    # another call reads
    sk = SelectiveKernel(8, reduction=2).eval()
    before = {k: v for k, v in vars(sk).items() if not k.startswith("_")}
    with torch.inference_mode():
        sk(torch.randn(2, 8, 5, 5))
        sk.forward_with_attention(torch.randn(3, 8, 4, 4))
    after = {k: v for k, v in vars(sk).items() if not k.startswith("_")}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_mcm_masks_the_configured_fraction_of_valid_positions():
    valid = torch.ones(64, 16, dtype=torch.bool)
    valid[:, 12:] = False  # 12 valid positions per window
    mask = random_mask(valid, 0.5, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 6).all()
    assert not (mask & ~valid).any()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # random per window


def test_mcm_loss_ignores_unmasked_positions():
    torch.manual_seed(0)
    model = Trainee(_params("mcm"), D).eval()
    patches, targets, valid = _batch("mcm", np.random.default_rng(2))
    mask = random_mask(valid, 0.5, torch.Generator().manual_seed(3))
    changed = targets.clone()
    changed[~mask] += 100.0  # only the unmasked targets change
    with torch.no_grad():
        pred = model.student(model._windows(patches), valid, mask)
        a = masked_l1(pred, targets, mask)
        b = masked_l1(pred, changed, mask)
        c = masked_l1(pred, targets + 100.0, mask)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mcm_student_exported_alone_has_no_context_model(tmp_path):
    params = _params("mcm")
    model = Trainee(params, D)
    student = model.exported()
    assert isinstance(student, BackboneStudent) and not student.teacher_space
    save_student(tmp_path / "s.pt", student, params.student)
    loaded, _ = load_student(tmp_path / "s.pt")
    keys = set(loaded.state_dict())
    assert not any("encoder" in k or "predictor" in k or "mask_token" in k for k in keys)
    x = torch.randn(2, 3, 64, 64)
    out = loaded(x)
    assert (
        out.shape == (2, loaded.out_dim) and loaded.out_dim == model.student.backbone.num_features
    )
    assert torch.allclose(out, model.student.backbone.eval()(x), atol=1e-6)


def test_grid_windows_group_neighbouring_patches():
    step = 100
    pts = [(x * step, y * step) for y in range(4) for x in range(5) if (x, y) != (1, 1)]
    coords = np.array(pts) + 7
    wins = grid_windows(coords, step, 2, min_valid=0.5)
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    first = wins[0]  # the top-left window: (0,0) (1,0) (0,1) and the hole at (1,1)
    assert first.tolist() == [index[(7, 7)], index[(107, 7)], index[(7, 107)], -1]
    for w in wins:
        pos = coords[w[w >= 0]]
        assert (pos.max(0) - pos.min(0) <= step).all()  # neighbours only
    assert len(grid_windows(coords, step, 2, min_valid=1.0)) < len(wins)


@pytest.mark.parametrize("method", ["fpd", "mcm"])
def test_distill_stage_runs_each_method(method, tiny_dataset, tmp_path):
    """Each method through the demo stages (each seeing only its own params sections): distill,
    the student's features, Retrain CLAM on them, evaluation and the package."""
    import json

    from efcm.config import params_from_dict
    from efcm.inference import predict_features
    from efcm.io.manifest import read_manifest
    from efcm.io.status import ok_slides
    from efcm.runtimes import load_runtime
    from tests.conftest import run_demo_pipeline

    raw = _params(method, epochs=1, batch_size=8).model_dump(mode="json")
    raw["mil"]["strategies"] = ["retrain"]
    w = run_demo_pipeline(tiny_dataset, tmp_path, params_from_dict(raw), ("retrain",))
    m = json.loads((w["distill"] / "metrics.json").read_text())
    assert m["method"] == method and m["val_before"] and m["val_after"]
    student, _ = load_student(w["distill"] / "student.pt")
    assert m["student_in_teacher_space"] == (method == "fpd") == student.teacher_space
    assert m["student_dim"] == student.out_dim
    ids = [s.slide_id for s in read_manifest(tiny_dataset).slides]
    assert sorted(ok_slides(w["extract_student"] / "status.csv")) == sorted(ids)
    # the rest of the chain takes the student's features, whatever their width
    pkg = load_runtime(w["package"], "torch")
    assert pkg.meta["strategy"] == "retrain" and pkg.meta["row"] == f"student.{method}.retrain"
    assert pkg.feature_dim == student.out_dim and pkg.meta["distill_method"] == method
    bag = np.random.default_rng(0).normal(size=(5, student.out_dim)).astype(np.float32)
    want = predict_features(pkg, bag).probabilities
    assert want.shape == (2,)
    # every method's student exports to ONNX (FP32 and INT8), within parity of the torch model
    for name in ("onnx", "int8"):
        parity = pkg.meta["runtimes"][name]["parity"]
        assert parity["slides"] == len(ids) and parity["same_label"] == f"{len(ids)}/{len(ids)}"
        got = predict_features(load_runtime(w["package"], name), bag).probabilities
        np.testing.assert_allclose(got, want, atol=1e-5)  # the same FP32 head


@pytest.mark.integration
def test_a_killed_distillation_resumes_from_its_checkpoint(tiny_dataset, tmp_path):
    from efcm import stages

    params = _params("vfd", epochs=4, batch_size=4)
    stages.patch(tiny_dataset, tmp_path / "p", params)
    stages.extract(tiny_dataset, tmp_path / "p", tmp_path / "t", params)
    raw = tiny_params_dict()
    raw["distill"].update(epochs=4, batch_size=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable,
        "-m",
        "efcm.cli",
        "distill",
        "--manifest",
        str(tiny_dataset),
        "--patches",
        str(tmp_path / "p"),
        "--teacher-features",
        str(tmp_path / "t"),
        "--out",
        str(tmp_path / "d"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = tmp_path / "d" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (tmp_path / "d" / "student.pt").exists():
        pytest.fail("the run finished before it could be killed: make it longer")
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 0 < done < 4
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming after epoch {done}" in out.stderr
    import json

    history = json.loads((tmp_path / "d" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_teacher_identity_tells_apart_foreign_features_of_the_same_shape(tmp_path):
    """Features h5 without efcm's stored settings are told apart by a hash of their values."""
    from efcm.features import write_features
    from efcm.training.distill import teacher_identity

    coords = np.zeros((3, 2), np.int64)
    feats = np.random.default_rng(0).normal(size=(3, D)).astype(np.float32)
    for name, values in (("a", feats), ("b", feats), ("c", feats + 1)):
        write_features(tmp_path / name / "features" / "s.h5", values, coords, {"arch": "x"})
    a, b, c = (teacher_identity(tmp_path / n, ["s"])["s"] for n in "abc")
    assert a == b and a != c
    assert a["shape"] == [3, D] and "features_sha256" in a


@pytest.mark.integration
def test_new_teacher_features_never_resume_an_old_distillation(tiny_dataset, tmp_path, caplog):
    from efcm import stages

    manifest = first_slides(tiny_dataset, 3, tmp_path / "three.csv")
    raw = tiny_params_dict()
    raw["distill"].update(epochs=1, batch_size=8)
    params = params_from_dict(raw)
    p, t, d = tmp_path / "p", tmp_path / "t", tmp_path / "d"
    stages.patch(manifest, p, params)
    stages.extract(manifest, p, t, params)
    stages.distill(manifest, p, t, d, params)
    caplog.set_level("INFO", logger="efcm")

    def resumed() -> bool:
        msgs = [r.getMessage() for r in caplog.records if r.name == "efcm.training.distill"]
        caplog.clear()
        assert any("resuming after epoch 1" in m or "starting over" in m for m in msgs), msgs
        return any("resuming after epoch 1" in m for m in msgs)

    # the same teacher features, rewritten: the checkpoint is still theirs
    stages.extract(manifest, p, t, params, overwrite=True)
    stages.distill(manifest, p, t, d, params)
    assert resumed()
    # another teacher (its input normalisation): same distill configuration, new targets
    raw["teacher"] = {**raw["teacher"], "mean": [0.5, 0.5, 0.5]}
    stages.extract(manifest, p, t, params_from_dict(raw))
    stages.distill(manifest, p, t, d, params)
    assert not resumed()

"""The three distillation methods: VFD, FPD (+ TransScan), MCM-KD."""

import itertools
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


# -- several processes: the epoch plan, the shared mask stream, torchrun's environment -----------


def _plan_items(plan, world):
    """{step: [rank 0's items, rank 1's items, ...]} of an EpochPlan."""
    return {s: [plan.part(s, r).tolist() for r in range(world)] for s in range(plan.steps)}


@pytest.mark.parametrize("n", [96, 100, 7])
def test_epoch_plan_shares_every_global_batch_equally_and_disjointly(n):
    from efcm.training.distributed import plan_epoch

    batch, world = 16, 4
    plan = plan_epoch(n, batch, world, seed=3, epoch=1)
    parts = _plan_items(plan, world)
    seen = [i for step in parts.values() for part in step for i in part]
    assert len(seen) == len(set(seen))  # no item twice, across steps and ranks
    if n >= batch:
        assert plan.steps == n // batch
        assert all(len(p) == batch // world for step in parts.values() for p in step)
        # complete: every item but the tail that does not fill a global batch (as one process)
        assert sorted(seen) == sorted(plan.order[: plan.steps * batch].tolist())
        assert len(set(range(n)) - set(seen)) == n % batch
    else:  # one short batch: all items, in near-equal parts
        assert plan.steps == 1 and sorted(seen) == list(range(n))
        assert sorted(len(p) for p in parts[0]) == [1, 2, 2, 2]


def test_epoch_plan_gives_a_step_the_same_items_in_every_world_size():
    from efcm.training.distributed import plan_epoch

    one = plan_epoch(100, 12, 1, seed=0, epoch=2)
    for world in (2, 3, 4, 6):
        plan = plan_epoch(100, 12, world, seed=0, epoch=2)
        assert plan.steps == one.steps == 8
        for s in range(plan.steps):
            ranks = [plan.part(s, r) for r in range(world)]
            assert np.concatenate(ranks).tolist() == one.part(s, 0).tolist()
            rows = [plan.bounds(s, r) for r in range(world)]
            assert rows[0][0] == 0 and rows[-1][1] == 12
            assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
    # a new order every epoch and seed
    assert plan_epoch(100, 12, 2, 0, 3).order.tolist() != one.order.tolist()
    assert plan_epoch(100, 12, 2, 1, 2).order.tolist() != one.order.tolist()


def test_world_one_plan_is_the_order_the_single_process_loader_used():
    """Earlier versions shuffled with a DataLoader seeded by (seed, epoch): a single process
    keeps that order, so its results do not change."""
    from torch.utils.data import DataLoader

    from efcm.training.distributed import epoch_seed, plan_epoch

    for n, batch in ((50, 8), (8, 8), (5, 8)):
        g = torch.Generator().manual_seed(epoch_seed(4, 1))
        loader = DataLoader(range(n), batch_size=batch, shuffle=True, generator=g,
                            drop_last=n > batch)  # fmt: skip
        want = [b.tolist() for b in loader]
        plan = plan_epoch(n, batch, 1, seed=4, epoch=1)
        assert [plan.part(s, 0).tolist() for s in range(plan.steps)] == want


def test_a_global_batch_that_does_not_divide_by_the_world_is_a_config_error():
    from efcm.config import ConfigError
    from efcm.training.distributed import plan_epoch

    with pytest.raises(ConfigError, match=r"distill.batch_size 10 does not divide by the 4"):
        plan_epoch(100, 10, 4, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="3 training items cannot be shared by 4 processes"):
        plan_epoch(3, 8, 4, seed=0, epoch=0)


def test_map_source_serves_each_rank_its_part_from_any_step():
    from torch.utils.data import TensorDataset

    from efcm.training.distributed import MapSource

    data = TensorDataset(torch.arange(50), torch.arange(50) * 10)
    source = MapSource(data, 8, seed=1)
    assert len(source) == 50 and source.steps_per_epoch(2) == 6
    plan = source.plan(0, 2)
    for rank in (0, 1):
        batches = list(source.epoch_batches(0, rank, 2, start_step=4))
        assert len(batches) == 2
        for step, rb in zip((4, 5), batches, strict=True):
            ids, tens = rb.tensors
            assert ids.tolist() == plan.part(step, rank).tolist()
            assert torch.equal(tens, ids * 10)
            assert (rb.rows_before, rb.rows_after) == ((0, 4) if rank == 0 else (4, 0))


def test_every_rank_draws_its_rows_masks_from_the_one_stream_a_single_process_draws():
    """MCM's masks of a step are those a single process draws for the global batch, whatever the
    world size, and every rank's stream ends the step where a single process's does."""
    from torch.utils.data import TensorDataset

    from efcm.training.distill import _own_rows
    from efcm.training.distributed import MapSource

    positions = 4
    valid = torch.rand(40, positions, generator=torch.Generator().manual_seed(0)) > 0.2
    valid[:, 0] = True
    source = MapSource(TensorDataset(torch.arange(40), valid), 8, seed=2)

    def masks(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out, ends = [], []
        for rank in range(world):
            g = source.mask_generator(0)
            for rb in source.epoch_batches(0, rank, world):
                with _own_rows(g, rb, positions):
                    out.append((rb.tensors[0], random_mask(rb.tensors[1], 0.5, g)))
            ends.append(g.get_state())
        ids = torch.cat([i for i, _ in out])
        return torch.cat([m for _, m in out])[ids.argsort()], ends

    one, (end,) = masks(1)
    for world in (2, 4):
        got, ends = masks(world)
        assert torch.equal(got, one)
        assert all(torch.equal(e, end) for e in ends)


def test_torchrun_environment_is_read_or_refused_naming_the_variable():
    from efcm.config import ConfigError
    from efcm.training.launch import Launch

    assert Launch.from_torchrun({}) is None
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "29500"}
    assert Launch.from_torchrun(env) == Launch(rank=3, local_rank=1, world=4)
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        Launch.from_torchrun({**env, "RANK": "x"})
    with pytest.raises(ConfigError, match="RANK=4, LOCAL_RANK=1, WORLD_SIZE=4 is not a valid"):
        Launch.from_torchrun({**env, "RANK": "4"})


def test_a_process_count_that_does_not_divide_the_batch_exits_2_before_launching(
    tmp_path, capsys, tiny_params_file
):
    from efcm.cli import main

    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["distill"]["batch_size"] = 30
    tiny_params_file.write_text(yaml.safe_dump(raw))
    argv = ["distill", "--manifest", "m.csv", "--patches", "p", "--teacher-features", "t"]
    argv += ["--out", str(tmp_path / "d"), "--params", str(tiny_params_file)]
    assert main([*argv, "--nproc-per-node", "4"]) == 2
    err = capsys.readouterr().err
    assert "distill.batch_size 30 does not divide by the 4 processes" in err
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--nproc-per-node", "0"])
    assert exc.value.code == 2
    assert "--nproc-per-node: must be a whole number of processes >= 1, got '0'" in (
        capsys.readouterr().err
    )


def test_checkpoint_frequency_is_not_part_of_the_resume_fingerprint():
    from efcm.training.distill import _fingerprint

    a, b, c = (_params("vfd", checkpoint_steps=k) for k in (0, 200, 200))
    assert _fingerprint(a, D, ["s"], {}) == _fingerprint(b, D, ["s"], {})
    assert _fingerprint(c, D, ["s"], {}) != _fingerprint(_params("vfd", lr=0.5), D, ["s"], {})

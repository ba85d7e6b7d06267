"""ETC (End2end Train CLAM) for real as 2 torchrun processes (gloo on the CPU) against 1, on the
demo pipeline's patches, teacher features, distilled student and splits, same seed: every
training draw is trained on once per epoch across the ranks, the re-extraction is shared by patch
count with every fold slide extracted exactly once, and the outputs agree.

Every process runs one thread (the distillation DDP test's environment), so that the 1- and the
2-process runs train their IB heads (rank 0 alone) with the same float reductions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from efcm.models.clam import load_clam
from efcm.models.students import load_student
from tests.conftest import tiny_params_dict
from tests.integration.test_distill_ddp import ENV, _max_diff

pytestmark = pytest.mark.integration

EPOCHS = 2
# Measured here (2 folds, 2 epochs): the 2-process predictions differ from the 1-process ones by
# at most 1.3e-6 and the fold CLAMs' weights by 5e-5. The students' fine-tuning (backbone lr
# 2e-5, Adam) moved them by 8e-6 to 1.1e-5 per weight on average, and the two runs' students
# differ by 24-40 % of that move: the summed gradients are the single process's up to float
# rounding (BatchNorm is frozen in ETC), but CLAM's dropout draws differ per rank, and Adam's
# first steps move a weight by about the learning rate whatever the gradient's size, so a
# near-zero gradient whose sign differs moves a weight the other way (the largest difference is
# 2 lr a step). The bounds leave room for another machine's floats.
PROB_TOL = 1e-3
CLAM_TOL = 1e-3
STUDENT_REL_TOL = 0.6  # mean |student_2 - student_1| / mean |student_1 - distilled|


@pytest.fixture(scope="module")
def runs(tiny_dataset, demo_run, tmp_path_factory) -> dict:
    """`efcm strategy etc` with 1 and with --nproc-per-node 2, to the end."""
    root = tmp_path_factory.mktemp("etc_ddp")
    raw = tiny_params_dict()
    raw["mil"] = {**raw["mil"], "strategies": ["reuse", "retrain", "etc"]}
    # a step's 2 bags: one per rank with 2 processes
    raw["mil"]["etc"].update(epochs=EPOCHS, accumulate=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    out, logs = {}, {}
    for n in (1, 2):
        out[n] = root / f"world{n}"
        cmd = [sys.executable, "-m", "efcm.cli", "strategy", "etc"]
        cmd += ["--manifest", str(tiny_dataset), "--splits", str(demo_run["splits"])]
        cmd += ["--patches", str(demo_run["patch"])]
        cmd += ["--teacher-features", str(demo_run["extract_teacher"])]
        cmd += ["--student", str(demo_run["distill"]), "--out", str(out[n])]
        cmd += ["--params", str(root / "params.yaml"), "--nproc-per-node", str(n)]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[n] = done.stderr
    patches = {
        f.stem: h5py.File(f)["features"].shape[0]
        for f in (demo_run["extract_teacher"] / "features").glob("*.h5")
    }
    inputs = {
        "manifest": tiny_dataset,
        "splits_path": demo_run["splits"],
        "patches": demo_run["patch"],
        "teacher_features": demo_run["extract_teacher"],
        "student": demo_run["distill"],
    }
    return {
        "params": root / "params.yaml",
        "inputs": inputs,
        "out": out,
        "log": logs,
        "splits": json.loads(demo_run["splits"].read_text()),
        "patches": patches,
        "distilled": demo_run["distill"] / "student.pt",
    }


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _ranks(out: Path, k: int) -> dict:
    return json.loads((out / f"fold_{k}" / "ranks.json").read_text())


def test_two_processes_train_every_draw_once_and_share_the_reextraction(runs):
    assert "launching 2 processes" in runs["log"][2]
    assert "launching" not in runs["log"][1]
    one, two = (_summary(runs["out"][n]) for n in (1, 2))
    for k, fold in enumerate(runs["splits"]["folds"]):
        n_train = len(fold["train"])
        fold_slides = fold["train"] + fold["val"] + fold["test"]
        for summary, world in ((one, 1), (two, 2)):
            record = summary["folds"][k]["ranks"]
            assert record["world"] == world
            assert [e["epoch"] for e in record["epochs"]] == list(range(1, EPOCHS + 1))
            for e in record["epochs"]:  # the epoch's draws, shared by the ranks
                assert sum(e["bags_per_rank"]) == n_train
                assert max(e["bags_per_rank"]) - min(e["bags_per_rank"]) <= -(-n_train // 2)
            assert sum(record["reextracted_slides_per_rank"]) == len(fold_slides)
        # the same draws, by slide, once per epoch across the ranks
        r1, r2 = _ranks(runs["out"][1], k), _ranks(runs["out"][2], k)
        for e1, e2 in zip(r1["epochs"], r2["epochs"], strict=True):
            assert len(e2["ranks"]) == 2 and all(e2["ranks"])
            assert Counter(e2["ranks"][0] + e2["ranks"][1]) == Counter(e1["ranks"][0])
        # every fold slide re-extracted exactly once, by one rank, balanced by patch count
        shares = r2["reextracted"]
        assert len(shares) == 2 and all(shares)
        union = shares[0] + shares[1]
        assert sorted(union) == sorted(fold_slides) and len(set(union)) == len(union)
        patches = two["folds"][k]["ranks"]["reextracted_patches_per_rank"]
        assert patches == [sum(runs["patches"][s] for s in share) for share in shares]
        assert sum(patches) == one["folds"][k]["ranks"]["reextracted_patches_per_rank"][0]
        assert abs(patches[0] - patches[1]) <= max(runs["patches"][s] for s in fold_slides)
        # rank 0's IB head (the same on 1 and 2 processes): the same top-K
        for s in fold["train"]:
            with (
                h5py.File(runs["out"][1] / f"fold_{k}" / "topk" / f"{s}.h5") as a,
                h5py.File(runs["out"][2] / f"fold_{k}" / "topk" / f"{s}.h5") as b,
            ):
                np.testing.assert_array_equal(a["indices"][:], b["indices"][:])
    # the features were read from disk and removed once each fold was done
    for n in (1, 2):
        assert not list(runs["out"][n].glob("fold_*/features"))


def _mean_diff(a: dict, b: dict) -> float:
    """The mean absolute difference over every float weight of two state dicts."""
    keys = [k for k in a if a[k].is_floating_point() and a[k].numel()]
    return float(np.mean(np.concatenate([(a[k] - b[k]).abs().flatten().numpy() for k in keys])))


def test_two_processes_agree_with_one_within_tolerance(runs):
    out1, out2 = runs["out"][1], runs["out"][2]
    p1, p2 = (pd.read_csv(o / "predictions.csv") for o in (out1, out2))
    assert list(p1["slide_id"]) == list(p2["slide_id"])
    probs = [c for c in p1.columns if c.startswith("prob_")]
    assert np.abs(p1[probs].to_numpy() - p2[probs].to_numpy()).max() < PROB_TOL
    distilled = load_student(runs["distilled"])[0].state_dict()
    for k in range(len(runs["splits"]["folds"])):
        students = [load_student(o / f"student_fold_{k}.pt")[0].state_dict() for o in (out1, out2)]
        # the fine-tuning moved the student, and both runs moved it alike
        moved = _mean_diff(distilled, students[0])
        assert moved > 0
        assert _mean_diff(*students) < STUDENT_REL_TOL * moved
        clams = [load_clam(o / f"fold_{k}.pt").state_dict() for o in (out1, out2)]
        assert _max_diff(*clams) < CLAM_TOL
    s1, s2 = _summary(out1), _summary(out2)
    assert s1["feature_dim"] == s2["feature_dim"]
    for a, b in zip(s1["folds"], s2["folds"], strict=True):
        assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], abs=PROB_TOL)


def test_the_stage_runs_etc_as_several_processes_for_a_pod_with_several_gpus(runs, tmp_path):
    """efcm.stages.strategy(processes=2), what the KFP strategy step calls with
    pipeline.etc_gpus: 2: torchrun with 2 processes, its params written beside the outputs, the
    same run as `efcm strategy etc --nproc-per-node 2`."""
    from efcm import stages
    from efcm.config import for_stage, load_params

    params = for_stage(load_params(runs["params"]), "strategy")
    inputs = dict(runs["inputs"])
    manifest, splits = inputs.pop("manifest"), inputs.pop("splits_path")
    out = tmp_path / "etc"
    summary = stages.strategy("etc", manifest, splits, out, params, processes=2, **inputs)
    assert summary["strategy"] == "etc"
    assert [f["ranks"]["world"] for f in summary["folds"]] == [2, 2]
    assert load_params(out / "strategy-params.yaml").mil == params.mil
    p_cli, p_stage = (pd.read_csv(o / "predictions.csv") for o in (runs["out"][2], out))
    assert list(p_cli["slide_id"]) == list(p_stage["slide_id"])
    probs = [c for c in p_cli.columns if c.startswith("prob_")]
    np.testing.assert_allclose(p_stage[probs], p_cli[probs], rtol=0, atol=1e-6)


def _sum_gradients_worker(rank: int, store: str, out: str) -> None:
    """One of 2 gloo ranks: rank 0 has a gradient for `a` only, rank 1 for `a` and `b`, neither
    for `c`; writes what `sum_gradients` left in each."""
    import torch.distributed as tdist

    from efcm.training.distributed import World, sum_gradients

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 4))
        a.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            b.grad = torch.tensor([5.0, -1.0])
        sum_gradients([a, b, c], World.current())
        torch.save([None if t.grad is None else t.grad for t in (a, b, c)], f"{out}/{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_summed_gradients_count_a_missing_one_as_zero_and_keep_one_missing_everywhere(tmp_path):
    """ETC's all-reduce over 2 real gloo processes: the sum of the ranks' gradients, a rank
    without one (a parameter it left unused) adding zero, and a parameter no rank used left
    without a gradient, so the optimiser skips it as one process would."""
    import torch.multiprocessing as mp

    mp.spawn(_sum_gradients_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        a, b, c = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(a, torch.full((3,), 3.0))
        assert torch.equal(b, torch.tensor([5.0, -1.0]))
        assert c is None

"""Benchmark of slide-level learning: CLAM-SB / CLAM-MB training cost against the bag size, and ETC.

CLAM (per `--models`, at feature width `--dim`, default 768 = the teacher's, 2 classes, the
project's `TrainMilParams()` defaults: hidden 128, attn_dim 64, k_sample 8, CE instance loss): one
"epoch" is `--bags` training steps (default 8), each one `efcm.training.mil.train_fold` step
(forward with the label, bag_weight x CE + (1 - bag_weight) x instance loss, backward, Adam step),
on one random bag of N instances per size in `--sizes` (default 1k, 10k, 50k), reused for every step
so the bags in memory are one N x D float32 tensor. One warm-up step is excluded; `--repeats` epochs
(default 3) are timed and the fastest is reported (the median too), which damps interference from
other load. Every (model, N) runs in a fresh subprocess, so its peak memory is its own:
  seconds_per_epoch, seconds_per_bag, us_per_instance (from the fastest epoch)
  peak_mb        CPU: the process's peak resident set (`resource.getrusage` max RSS: the Python
                 interpreter, torch, the bag itself and training); CUDA:
                 `torch.cuda.max_memory_allocated` (bag, model, activations, optimiser state)
  bag_mb         the bag tensor alone
  fits_4gb       peak_mb <= 4096
Per model: ratio_time = time(largest N) / time(smallest N) against the linear ratio N_max / N_min
(50 for 50k vs 1k) and time(50k) / time(10k) against 5; `near_linear` when both are at most 1.5x
their linear ratio (fixed per-step costs make small bags relatively slower, so the ratios sit at
or below linear when the cost is linear in N).

ETC (`efcm.training.strategies.train_etc_fold`, given only the `strategy` stage's params, as
`efcm strategy etc` runs it): one ETC epoch over `--etc-bags` top-K bags of `--etc-k` patches
(random uint8 pixels of the configured patch size, served by a stand-in for the slide reader, so
no slide I/O is timed), the repo's params.yaml student (randomly initialised VFD,
projecting to `--dim`) and ETC settings (chunked, gradient-checkpointed, early stages and BatchNorm
frozen, AdamW); one warm-up bag excluded. On CPU the default K is small (32) to keep the run short;
the configured `ib.k` (512) is used on CUDA. Reported: seconds_per_bag, seconds_per_patch, peak_mb
(as above), the K used.

Prints one JSON object. Usage:
  python benchmarks/mil.py [--sizes 1000,10000,50000] [--bags 8] [--repeats 3] [--dim 768]
                           [--models clam_sb,clam_mb] [--etc-k K] [--etc-bags 2] [--no-etc]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _timing import sync

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 4096


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _clam_worker(job: dict[str, Any]) -> dict[str, Any]:
    from efcm.config import TrainMilParams
    from efcm.models.clam import build_clam

    dev = _device()
    torch.manual_seed(0)
    n, dim, bags = job["n"], job["dim"], job["bags"]
    cfg = TrainMilParams(model=job["model"])
    bag = torch.randn(n, dim, device=dev)
    model = build_clam(dim, 2, cfg).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = [torch.tensor([y], device=dev) for y in (0, 1)]

    def step(y: int) -> None:  # efcm.training.mil.train_fold's training step
        out = model(bag, label=y)
        bag_loss = F.cross_entropy(out["logits"], targets[y])
        loss = cfg.bag_weight * bag_loss + (1 - cfg.bag_weight) * out["instance_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(1)  # warm-up
    epochs = []
    for _ in range(job["repeats"]):
        sync(dev)
        t0 = time.perf_counter()
        for i in range(bags):
            step(i % 2)
        sync(dev)
        epochs.append(time.perf_counter() - t0)
    dt = min(epochs)
    peak = _peak_mb(dev)
    return {
        "n": n,
        "seconds_per_epoch": round(dt, 4),
        "seconds_per_epoch_median": round(float(np.median(epochs)), 4),
        "seconds_per_bag": round(dt / bags, 5),
        "us_per_instance": round(dt / bags / n * 1e6, 3),
        "peak_mb": round(peak, 1),
        "bag_mb": round(bag.numel() * 4 / 2**20, 1),
        "fits_4gb": peak <= LIMIT_MB,
    }


class _RandomPatches:
    """Stands in for `SlidePatches`: read_batch(indices) -> random uint8 (n, S, S, 3)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)

    def read_batch(self, indices: Any) -> np.ndarray:
        n = len(np.asarray(indices))
        return self.rng.integers(0, 256, (n, self.size, self.size, 3), dtype=np.uint8)


def _etc_worker(job: dict[str, Any]) -> dict[str, Any]:
    from efcm.config import for_stage, load_params, params_from_dict, params_to_dict
    from efcm.models.students import build_vfd
    from efcm.training.strategies import train_etc_fold

    dev = _device()
    data = params_to_dict(load_params(ROOT / "params.yaml"))
    data["mil"]["etc"]["epochs"] = 1
    params = params_from_dict(data)
    k = job["k"] or (params.ib.k if dev.type == "cuda" else 32)
    size = params.patch.patch_size
    ids = [f"s{i}" for i in range(job["bags"] + 1)]
    slides = {s: _RandomPatches(size, i) for i, s in enumerate(ids)}
    topk = {s: np.arange(k) for s in ids}
    labels = {s: i % 2 for i, s in enumerate(ids)}
    student = build_vfd(params.student, job["dim"], warn_random=False)
    spec = params.student
    stage = for_stage(params, "strategy")  # what the strategy stage may read
    train_etc_fold(student, spec, slides, topk, labels, ids[:1], stage, 0, dev)  # warm-up bag
    sync(dev)
    t0 = time.perf_counter()
    train_etc_fold(student, spec, slides, topk, labels, ids[1:], stage, 0, dev)
    sync(dev)
    dt = time.perf_counter() - t0
    peak = _peak_mb(dev)
    return {
        "student": params.student.arch,
        "k": k,
        "configured_k": params.ib.k,
        "patch_size": size,
        "bags": job["bags"],
        "seconds_per_bag": round(dt / job["bags"], 3),
        "seconds_per_patch": round(dt / job["bags"] / k, 5),
        "peak_mb": round(peak, 1),
        "note": "one ETC epoch (train_etc_fold) on random pixels; slide reading not timed",
    }


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One job in a fresh interpreter (its own peak memory); an error is reported, not raised."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _linearity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["n"])
    if len(ok) < 2:
        return {}
    t = {r["n"]: r["seconds_per_epoch"] for r in ok}
    lo, hi = ok[0]["n"], ok[-1]["n"]
    out: dict[str, Any] = {
        "ratio_time": round(t[hi] / t[lo], 2),
        "ratio_linear": round(hi / lo, 2),
        "pairs": f"{hi} vs {lo}",
    }
    checks = [out["ratio_time"] <= 1.5 * out["ratio_linear"]]
    if 10_000 in t and 50_000 in t:
        out["ratio_time_50k_10k"] = round(t[50_000] / t[10_000], 2)
        checks.append(out["ratio_time_50k_10k"] <= 1.5 * 5)
    out["near_linear"] = all(checks)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--bags", type=int, default=8, help="bags per timed epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs (the fastest counts)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--models", default="clam_sb,clam_mb")
    ap.add_argument("--etc-k", type=int, default=0, help="patches per ETC bag (0: per device)")
    ap.add_argument("--etc-bags", type=int, default=2)
    ap.add_argument("--no-etc", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        result = _etc_worker(job) if job["kind"] == "etc" else _clam_worker(job)
        print(json.dumps(result))
        return result

    dev = _device()
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "mil",
        "device": torch.cuda.get_device_name()
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dim": args.dim,
        "bags_per_epoch": args.bags,
        "memory_limit_mb": LIMIT_MB,
        "memory_measure": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "process peak RSS (getrusage), incl. interpreter + torch",
    }
    sizes = [int(s) for s in args.sizes.split(",")]
    for model in args.models.split(","):
        rows = [
            _run(
                {
                    "kind": "clam",
                    "model": model,
                    "n": n,
                    "dim": args.dim,
                    "bags": args.bags,
                    "repeats": args.repeats,
                }
            )
            for n in sizes
        ]
        report[model] = {"per_size": rows, **_linearity(rows)}
    if args.no_etc:
        report["etc"] = "skipped (--no-etc)"
    else:
        report["etc"] = _run(
            {"kind": "etc", "k": args.etc_k, "bags": args.etc_bags, "dim": args.dim}
        )
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

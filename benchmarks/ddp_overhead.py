"""DDP overhead on the CPU: distillation steps/s with 2 gloo processes (torchrun) against 1, on the
same global batch.

Each run is the stage's own training loop (`efcm.training.distill._Loop`: the VFD `Trainee` with
params.yaml's student, resnet18 at 112 px with random weights (nothing can be downloaded; timings do
not depend on them), projecting to a 768-d teacher space (ViT-B), AdamW, DistributedDataParallel
over gloo when there are 2 processes) on in-memory random 128-px patches and teacher features: no
slide is read, so the figure is the training step alone. World 2 is started by torchrun
(`--standalone`) and opens its process group as `efcm distill` does
(`efcm.training.distributed.process_group`); each rank takes half of every global batch.
One thread per process (OMP_NUM_THREADS=1, torchrun's default), so the 2 processes use 2 cores and
the single process 1: `ratio_2_vs_1` is 2.0 when DDP costs nothing (the work is split in two), and
`scaling_efficiency` is ratio / 2. The gradient all-reduced every step is `gradient_mb`.
Absolute figures mean little on a shared 2-core machine; the ratio is the point.

`measure(...)` returns the JSON object (benchmarks/scale.py imports it). Prints one JSON object.
Usage: python benchmarks/ddp_overhead.py [--batch 32] [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEACHER_DIM = 768  # ViT-B/16
PATCH = 128  # params.yaml's patch size; the student centre-crops it to its input size


def _worker(job: dict[str, Any]) -> None:
    """One process of a timed run (under torchrun for world 2): writes rank 0's figures."""
    import torch

    from efcm.config import load_params, params_from_dict
    from efcm.training.distill import Trainee, _Loop, _Optimiser, _Tally
    from efcm.training.distributed import RankBatch, process_group
    from efcm.training.launch import Launch

    torch.set_num_threads(1)
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["distill"].update(method="vfd", epochs=1, batch_size=job["batch"], checkpoint_steps=0)
    params = params_from_dict(raw)
    steps = job["warmup"] + job["steps"]

    class Source:
        """The same random global batch every step, each rank its part."""

        uneven = False

        def __len__(self) -> int:
            return job["batch"] * steps

        def steps_per_epoch(self, world: int) -> int:
            return steps

        def mask_generator(self, epoch: int) -> torch.Generator:
            return torch.Generator().manual_seed(epoch)

        def epoch_batches(
            self, epoch: int, rank: int, world: int, start_step: int = 0
        ) -> Iterator[RankBatch]:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(
                0, 255, (job["batch"], PATCH, PATCH, 3), dtype=torch.uint8, generator=g
            )
            y = torch.randn(job["batch"], TEACHER_DIM, generator=g)
            share = job["batch"] // world
            part = slice(rank * share, (rank + 1) * share)
            for _ in range(start_step, steps):
                yield RankBatch([x[part], y[part]])

    with process_group(Launch.from_torchrun(os.environ)) as world:
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(0)
        model = Trainee(params, TEACHER_DIM)
        cpu = torch.device("cpu")
        optim = _Optimiser.build(model, params.distill, len(Source()), cpu, steps_per_epoch=steps)
        net = DistributedDataParallel(model) if world.size > 1 else model
        loop = _Loop(model, net, Source(), optim, params.distill, world, cpu)
        start: list[float] = []

        def after_step(done: int, _tally: _Tally, _g: torch.Generator) -> None:
            if done == job["warmup"]:
                start.append(time.perf_counter())

        loop.epoch(0, 0, _Tally(), torch.Generator(), after_step)
        seconds = time.perf_counter() - start[0]
        world.barrier()
        if world.main:
            grads = sum(p.numel() for p in model.trainable()) * 4 / 2**20
            Path(job["out"]).write_text(
                json.dumps({"seconds": seconds, "gradient_mb": grads, "world": world.size})
            )


def _run(world: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job = {"batch": batch, "steps": steps, "warmup": warmup, "out": f"{tmp}/out.json"}
        cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
        if world > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"world {world} failed: {done.stderr[-2000:]}")
        return json.loads(Path(job["out"]).read_text())


def measure(batch: int = 32, steps: int = 6, warmup: int = 2) -> dict[str, Any]:
    """Steps/s of the distillation loop with 1 and 2 processes on the same global batch."""
    runs = {w: _run(w, batch, steps, warmup) for w in (1, 2)}
    rate = {w: steps / r["seconds"] for w, r in runs.items()}
    ratio = rate[2] / rate[1]
    return {
        "benchmark": "ddp_overhead",
        "global_batch": batch,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "threads_per_process": 1,
        "gradient_mb": round(runs[1]["gradient_mb"], 2),
        "world_1": {"steps_per_s": round(rate[1], 3), "patches_per_s": round(rate[1] * batch, 1)},
        "world_2": {"steps_per_s": round(rate[2], 3), "patches_per_s": round(rate[2] * batch, 1)},
        "ratio_2_vs_1": round(ratio, 3),
        "scaling_efficiency": round(ratio / 2, 3),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="global batch (even)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return None
    if args.batch % 2 or args.warmup < 1 or args.steps < 1:
        ap.error("--batch must be even, --warmup and --steps at least 1")
    report = measure(args.batch, args.steps, args.warmup)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

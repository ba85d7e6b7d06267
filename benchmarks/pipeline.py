"""Benchmark of the Kubeflow pipeline: kfp.local wall time with 1 vs 2 shards at a time, and the
compiled pipeline's size.

The real pipeline function (`pipelines.pipeline.build_pipeline`) runs under kfp.local's
SubprocessRunner (no venv, caching off, `dry_run` deploy) on a synthetic dataset of `--slides`
slides (default 8, 2048 px) cut into `--shard-size` slides per shard (default 4: 2 shards), with
timm's tiny test models and 1-epoch training so the run is about orchestration and the shard
fan-out rather than model cost. It runs once with ParallelFor parallelism 1 and once with 2
(kfp.local runs at most 2 loop iterations at once). For each run:
  wall_s          the pipeline call, end to end
  shards          per shard: start and end (s from the run's start) of its patch and its teacher
                  extraction, from the artifacts' metadata
  shard_overlap_s the time during which both shards were running (0 when they ran one after the
                  other); with parallelism 2 it must be > 0
Also: `speedup` = wall(parallelism 1) / wall(parallelism 2), and the compiled YAML of the repo's
params.yaml (`pipelines/compile.py`): bytes, lines, and the number of tasks (every DAG, the
ParallelFor and dsl.If sub-DAGs included) and of executors.

Prints one JSON object. Usage:
  python benchmarks/pipeline.py [--slides 8] [--shard-size 4] [--size 2048]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# small models and one epoch everywhere: the benchmark measures the orchestration and fan-out
SMALL = {
    "patch": {"target_mpp": 1.0, "patch_size": 64, "step": 64, "max_upsample": 64},
    "teacher": {"arch": "test_vit", "input_size": 64, "model_kwargs": {"img_size": 64}},
    "student": {"arch": "test_resnet", "input_size": 64},
    "extract": {"batch_size": 32},
    "distill": {"epochs": 1, "batch_size": 32},
    "train_mil": {"folds": 2, "epochs": 2, "min_epochs": 1, "patience": 1, "hidden": 32,
                  "attn_dim": 16, "k_sample": 4, "val_fraction": 0.34},
    "ib": {"k": 16, "epochs": 1, "hidden": 16, "samples": 4},
    "mil": {"etc": {"epochs": 1, "chunk": 16}},
    "evaluate": {"bootstrap": 20},
}  # fmt: skip


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _count_tasks(spec: dict) -> tuple[int, int]:
    """(container tasks over every DAG, executors)."""
    comps = spec["components"]

    def walk(dag: dict) -> int:
        n = 0
        for task in dag["tasks"].values():
            comp = comps[task["componentRef"]["name"]]
            n += walk(comp["dag"]) if "dag" in comp else 1
        return n

    return walk(spec["root"]["dag"]), len(spec["deploymentSpec"]["executors"])


def _shard_times(run_dir: Path, t0: float) -> list[dict[str, Any]]:
    shards = []
    for it in sorted(run_dir.glob("for-loop-*-iteration-*")):
        if not (it / "patch").is_dir():  # an iteration of the strategies' ParallelFor
            continue
        row: dict[str, Any] = {"iteration": it.name}
        for task, out in (("patch", "patches"), ("extract", "features")):
            meta = json.loads((it / task / "executor_output.json").read_text())
            (art,) = meta["artifacts"][out]["artifacts"]
            md = art["metadata"]
            row[task] = [round(md["started"] - t0, 2), round(md["finished"] - t0, 2)]
        row["span"] = [row["patch"][0], row["extract"][1]]
        shards.append(row)
    return shards


def _overlap(shards: list[dict[str, Any]]) -> float:
    if len(shards) < 2:
        return 0.0
    starts = [s["span"][0] for s in shards]
    ends = [s["span"][1] for s in shards]
    return round(max(0.0, min(ends) - max(starts)), 2)


def _run_once(manifest: Path, params: Any, parallelism: int, root: Path) -> dict[str, Any]:
    from kfp import local

    from pipelines.compile import pipeline_arguments
    from pipelines.pipeline import build_pipeline

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=False,
    )
    pipeline = build_pipeline(parallelism=parallelism)
    args = pipeline_arguments(params)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline(manifest_path=str(manifest), dry_run=True, **args)
    wall = time.time() - t0
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    shards = _shard_times(run_dir, t0)
    return {
        "parallelism": parallelism,
        "wall_s": round(wall, 1),
        "shards": shards,
        "shard_overlap_s": _overlap(shards),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048, help="slide side in px")
    args = ap.parse_args()

    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from efcm.config import load_params, params_from_dict
    from efcm.stages import demo_data
    from pipelines.compile import compile_pipeline

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = _merge(raw, SMALL)
    raw = _merge(raw, {
        "demo_data": {"slides": args.slides, "size": args.size, "slides_per_case": 1},
        "pipeline": {"shard_size": args.shard_size},
    })  # fmt: skip
    params = params_from_dict(raw)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = demo_data(tmp / "data", params)
        runs = [_run_once(manifest, params, p, tmp / f"root-{p}") for p in (1, 2)]
        compiled = compile_pipeline(tmp / "efcm_pipeline.yaml", ROOT / "params.yaml")
        text = compiled.read_text()
        tasks, executors = _count_tasks(next(yaml.safe_load_all(text)))
        repo_params = load_params(ROOT / "params.yaml")

    out = {
        "benchmark": "pipeline",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "dataset": {
            "slides": args.slides,
            "size_px": args.size,
            "shard_size": args.shard_size,
            "shards": -(-args.slides // args.shard_size),
        },
        "runs": runs,
        "speedup_parallelism_2": round(runs[0]["wall_s"] / runs[1]["wall_s"], 2),
        "shards_overlap": runs[1]["shard_overlap_s"] > 0,
        "compiled": {
            "bytes": len(text.encode()),
            "lines": text.count("\n"),
            "tasks": tasks,
            "executors": executors,
            "parallelism": repo_params.pipeline.parallelism,
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

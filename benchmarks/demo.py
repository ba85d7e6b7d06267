"""Benchmark of the local pipeline: wall time of every `dvc repro` stage on the demo data.

Copies dvc.yaml and params.yaml into a temporary git + DVC repo, runs each stage in pipeline
order with `dvc repro --single-item`, and prints one JSON object: seconds per stage, total,
patches processed, the machine. Usage: python benchmarks/demo.py [--params params.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="efcm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(
        ROOT / "src" / "efcm",
        work / "src" / "efcm",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(args.params, work / "params.yaml")
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, text=True)

    if not (work / ".git").exists():
        run("git", "init", "-q")
    if not (work / ".dvc").exists():
        run("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    seconds = {}
    for stage in stages:
        t0 = time.perf_counter()
        run("dvc", "repro", "--single-item", "--force", stage)
        seconds[stage] = round(time.perf_counter() - t0, 2)
    with open(work / "runs/patch/status.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads((work / "runs/evaluate/metrics.json").read_text())
    out = {
        "benchmark": "demo_dvc_repro",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "stage_seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 2),
        "slides": len(rows),
        "patches": sum(int(r["n_patches"]) for r in rows),
        "auc": {k: v["auc"] for k, v in metrics.items() if isinstance(v, dict) and "auc" in v},
        "teacher_localisation_auroc": metrics["teacher"].get("localisation_auroc"),
        "student_teacher_speedup": metrics.get("efficiency", {}).get("student_teacher_speedup"),
    }
    print(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark of the images: sizes, build times (cold, cached, after a source change), and the
serving container's time from start to ready against `efcm serve` on the host, in one run.

  sizes     each image's size (serving, serving-cpu, component), the torch-free serving-cpu's
            against the CUDA serving image's (`serving_cpu_size_gb`, `serving_cpu_vs_serving_size`),
            and the bytes two images share (their common layers: serving and component share the
            base and the torch dependency layer, serving-cpu only the base), from the engine's own
            records
  build     every image with an empty layer cache (podman: in a throwaway storage, where the
            stand-in base is made too and timed apart as base_made_s; docker: --no-cache),
            then `scripts/images.sh` again with nothing changed (the layer cache), then a copy
            of the build context with one line added to src/efcm/__init__.py (only the package
            layers rebuild), seconds per image
  ready     `--repeats` times each, alternating: the serving image started read-only as uid 10001
            with the package mounted at /mnt/models, and `efcm serve PACKAGE` on the host, each
            timed from the start command to the first 200 of /v2/health/ready; medians and their
            ratio (container / host)

The package is the demo's (`runs/package`, from ./scripts/demo.sh) unless `--package` names one.
Absolute times mean little on a shared 2-core CPU; the ratios are the point. Prints one JSON object.
Usage: python benchmarks/images.py [--package DIR] [--repeats N] [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.containers: the engine as scripts/images.sh picks it
from tests import containers  # noqa: E402
from tests.integration.test_serving import serve_subprocess  # noqa: E402


def images_sh(context: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """scripts/images.sh of `context` with `args` (and `env` over this process's); its record."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "images.json"
        proc = subprocess.run(
            [
                "bash",
                str(context / "scripts" / "images.sh"),
                "--local-base-if-offline",
                "--json",
                str(record),
                *args,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if proc.returncode != 0:
            sys.exit(f"images.sh failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(record.read_text())


def cold_build() -> dict:
    """Every image built with an empty layer cache: with podman, in a storage of their own (a
    throwaway graph root, so this machine's cache is left alone; the stand-in base is made there
    too, and timed apart); with docker, `--no-cache` (component then reuses the dependency stage
    serving has just built)."""
    if containers.engine() != "podman":
        return {"build_s": build_seconds(images_sh(ROOT, "--no-cache")), "how": "--no-cache"}
    store = Path(tempfile.mkdtemp(prefix="efcm-cold-store-", dir="/var/tmp"))
    conf = store / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/graph"\nrunroot = "{store}/run"\n'
    )
    env = {"CONTAINERS_STORAGE_CONF": str(conf)}
    try:
        record = images_sh(ROOT, env=env)
        return {
            "build_s": build_seconds(record),
            "base_made_s": record.get("base_made_s"),
            "how": "an empty podman storage",
        }
    finally:
        subprocess.run(
            ["podman", "rmi", "--all", "--force"],  # of that storage only (no system reset)
            env={**containers.engine_env(), **env},
            capture_output=True,
        )
        shutil.rmtree(store, ignore_errors=True)


def build_seconds(record: dict) -> dict[str, float]:
    return {i["target"]: i["build_s"] for i in record["images"]}


def history(image: str) -> list[tuple[str, str, int]]:
    """(step id, command, bytes) of each build step of `image`, oldest first (podman's JSON)."""
    steps = json.loads(containers.cli("history", "--format", "json", image).stdout)
    return [(s["id"], s.get("CreatedBy", ""), int(s["size"])) for s in reversed(steps)]


def shared_bytes(a: str, b: str) -> int | None:
    """Bytes of the build steps `a` and `b` have in common (the base and the dependency layer):
    stored, pushed and pulled once for both. None where the engine's history is not podman's."""
    try:
        ha, hb = history(a), history(b)
    except (KeyError, TypeError, ValueError):
        return None
    common = 0
    for x, y in zip(ha, hb, strict=False):
        if x != y:
            break
        common += x[2]
    return common


def source_change_build(tag: str) -> dict[str, float]:
    """The images built from a copy of the build context with one source line added."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp)
        for name in ("pyproject.toml", "constraints.txt", "README.md", ".dockerignore"):
            shutil.copy2(ROOT / name, ctx / name)
        for name in ("src", "docker", "scripts"):
            shutil.copytree(ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
        init = ctx / "src" / "efcm" / "__init__.py"
        init.write_text(init.read_text() + f"# benchmark {time.time()}\n")
        record = images_sh(ctx, "--tag", tag)
    for i in record["images"]:
        containers.cli("rmi", i["image"], check=False)
    return build_seconds(record)


def container_ready_s(image: str, package: Path, log: Path) -> float:
    """Seconds from `run` to ready: the serving image, read-only as uid 10001, the package at
    /mnt/models."""
    start = time.monotonic()
    opts = ["--read-only", "--user", "10001:10001", "-v", f"{package}:/mnt/models:ro"]
    with containers.running(image, [*opts, "-p", "127.0.0.1::8080"], [], log) as box:
        box.wait_http(f"http://127.0.0.1:{box.port(8080)}/v2/health/ready")
        return time.monotonic() - start


def host_ready_s(package: Path, log: Path) -> float:
    """Seconds from starting `efcm serve package` on the host (the tests' own launcher) to ready."""
    start = time.monotonic()
    with serve_subprocess(package, log):
        return time.monotonic() - start


def size_summary(record: dict) -> dict:
    """The sizes of the images of an images.sh `record`: bytes per target, the bytes serving shares
    with component and with serving-cpu, and serving-cpu's size in GB and as a fraction of
    serving's."""
    tags = {i["target"]: i["image"] for i in record["images"]}
    sizes: dict = {i["target"]: i["bytes"] for i in record["images"]}
    sizes["shared"] = shared_bytes(tags["serving"], tags["component"])
    sizes["shared_serving_serving_cpu"] = shared_bytes(tags["serving"], tags["serving-cpu"])
    return {
        "bytes": sizes,
        "serving_size_gb": round(sizes["serving"] / 1e9, 3),
        "serving_cpu_size_gb": round(sizes["serving-cpu"] / 1e9, 3),
        "serving_cpu_vs_serving_size": round(sizes["serving-cpu"] / sizes["serving"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", type=Path, default=ROOT / "runs" / "package")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true", help="no build from an empty cache")
    args = ap.parse_args()
    if not (args.package / "model.json").is_file():
        sys.exit(f"no package at {args.package}: run ./scripts/demo.sh first, or pass --package")

    cpu = platform.processor() or platform.machine()
    out: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu}}
    if not args.skip_cold:
        out["build_cold"] = cold_build()
    cached = images_sh(ROOT)
    out["engine"], out["base"], out["stand_in_base"] = (
        cached["engine"],
        cached["base"],
        cached["stand_in_base"],
    )
    out["build_cached_s"] = build_seconds(cached)
    out["build_after_source_change_s"] = source_change_build("bench-source-change")
    tags = {i["target"]: i["image"] for i in cached["images"]}
    out.update(size_summary(cached))

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package"
        shutil.copytree(args.package, package)
        containers.readable(Path(tmp))
        runs: dict[str, list[float]] = {"container": [], "host": []}
        for i in range(args.repeats):
            log = Path(tmp) / f"container-{i}.log"
            runs["container"].append(container_ready_s(tags["serving"], package, log))
            runs["host"].append(host_ready_s(package, Path(tmp) / f"host-{i}.log"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    out["ready_s"] = {
        "container_median": round(med["container"], 2),
        "host_median": round(med["host"], 2),
        "container_runs": [round(x, 2) for x in runs["container"]],
        "host_runs": [round(x, 2) for x in runs["host"]],
        "ratio_container_over_host": round(med["container"] / med["host"], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

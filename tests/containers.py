"""The container engine for the image tests: docker when its engine runs, else podman.

The images come from `scripts/images.sh` (the one build path users run too), which installs podman
in CI when no engine is here; the tests never skip for a missing engine. With podman, every call
goes through `docker/podman-containers.conf` (CONTAINERS_CONF), the machine-specific settings of
this repository, never the machine's /etc.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests import processes

ROOT = Path(__file__).resolve().parents[1]
IMAGES_SH = ROOT / "scripts" / "images.sh"
PODMAN_CONF = ROOT / "docker" / "podman-containers.conf"


@functools.cache
def engine() -> str:
    """The engine `scripts/images.sh` picks, asked with `--print-engine` (EFCM_CONTAINER_ENGINE,
    else docker if its engine answers, else podman, installed in CI)."""
    proc = subprocess.run(
        ["bash", str(IMAGES_SH), "--print-engine"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/images.sh --print-engine failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(PODMAN_CONF))
    return env


def cli(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`<engine> args...`; raises with its stderr when it fails and `check`."""
    proc = subprocess.run(
        [engine(), *args], capture_output=True, text=True, timeout=timeout, env=engine_env()
    )
    if check and proc.returncode != 0:
        command = " ".join([engine(), *args])
        raise RuntimeError(f"{command} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def build_images(log: Path) -> dict:
    """Every image (serving, serving-cpu, component), built (or found in the layer cache) by
    scripts/images.sh on the upstream base, or on the stand-in base where no registry is
    reachable. Returns its JSON record:
    {"engine", "base", "stand_in_base", "images": [{"target", "image", "bytes", "build_s"}]}."""
    record = log.with_suffix(".json")
    with log.open("w") as out:
        proc = subprocess.run(
            ["bash", str(IMAGES_SH), "--local-base-if-offline", "--json", str(record)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"scripts/images.sh failed ({proc.returncode}):\n{tail}")
    return json.loads(record.read_text())


def image_config(image: str) -> dict:
    """The image's config (User, Env, Entrypoint, Cmd, Labels, ...)."""
    (info,) = json.loads(cli("image", "inspect", image).stdout)
    return info.get("Config") or info["config"]


def readable(tree: Path) -> Path:
    """`tree` made world-readable, to be mounted into a container (pytest's temporary folders are
    root's, 0700; the images' user is 10001)."""
    for p in [tree, *tree.rglob("*")]:
        extra = stat.S_IRGRP | stat.S_IROTH
        if p.is_dir():
            extra |= stat.S_IXGRP | stat.S_IXOTH
        p.chmod(p.stat().st_mode | extra)
    return tree


@dataclass
class Container:
    name: str
    log: Path

    def port(self, container_port: int) -> int:
        """The host port published for `container_port`/tcp."""
        out = cli("port", self.name, f"{container_port}/tcp").stdout.strip().splitlines()[0]
        return int(out.rsplit(":", 1)[1])

    def logs(self) -> str:
        proc = cli("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def running(self) -> bool:
        out = cli("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return out.returncode == 0 and out.stdout.strip() == "true"

    def exec(self, *argv: str) -> str:
        return cli("exec", self.name, *argv).stdout

    def wait_http(self, url: str, timeout: float = 180) -> float:
        """Seconds until GET `url` answers 200; fails with the log if the container stops."""
        start = time.monotonic()
        while True:
            if not self.running():
                raise RuntimeError(f"container {self.name} stopped:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{url} not ready after {timeout} s:\n{self.logs()[-4000:]}")
            time.sleep(0.25)

    def stop(self, timeout: int = 20) -> int:
        """Stops it (SIGTERM, then SIGKILL after `timeout` s), saves its log; its exit code."""
        cli("stop", "--time", str(timeout), self.name, timeout=timeout + 60)
        code = int(cli("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())
        self.log.write_text(self.logs())
        return code


@contextlib.contextmanager
def running(image: str, run_args: list[str], argv: list[str], log: Path) -> Iterator[Container]:
    """`<engine> run -d run_args image argv` for the block; removed after it (its log kept)."""
    name = f"efcm-test-{os.getpid()}-{time.monotonic_ns()}"
    cli("run", "-d", "--name", name, *run_args, image, *argv)
    box = Container(name, log)
    try:
        yield box
    finally:
        if not log.exists():
            log.write_text(box.logs())
        cli("rm", "-f", name, check=False)


@contextlib.contextmanager
def docker_api() -> Iterator[str]:
    """A Docker-compatible API for docker-py (kfp.local's DockerRunner): podman's own service on a
    private socket for the block (`podman system service`), or docker's daemon. Yields the
    DOCKER_HOST URL."""
    if engine() == "docker":
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    folder = Path(tempfile.mkdtemp(prefix="efcm-podman-api-"))
    sock = folder / "podman.sock"
    url = f"unix://{sock}"
    log = (folder / "service.log").open("w")
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=engine_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not start: {proc.returncode}")
            time.sleep(0.1)
        yield url
    finally:
        processes.stop(proc)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)

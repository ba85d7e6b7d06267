"""kfp.local for one test, leaving no process-wide state behind for the tests after it.

kfp.local (2.17) keeps its configuration (`local.init`) in a process-global singleton, and every
task it runs swaps two more process globals in save/replace/restore context managers
(kfp/local/task_dispatcher.py, `dispatch_task`):

- `logging_utils.local_logger_context()`: the root logger's handlers (replaced by one
  `StreamHandler(sys.stdout)`) and its level (INFO);
- `logging_utils.indented_print()`: `builtins.print`, replaced by a wrapper that first calls the
  saved print with `' ' * 4, end=''` and no `file=`, so every `print(..., file=sys.stderr)` also
  writes four spaces to sys.stdout.

A DAG with a ParallelFor runs its tasks in a ThreadPoolExecutor
(kfp/local/orchestrator/enhanced_dag_orchestrator.py). Two tasks that overlap restore in the order
they finish, not the reverse of the order they started: the one that finishes last puts back what
it saved, which is the other task's replacement. After the run `builtins.print` is the indenting
wrapper and the root logger keeps a handler on the sys.stdout of that moment, at INFO, for the
rest of the process. Which task finishes last is a race, so a later test that prints an error to
stderr and checks that stdout is empty (tests/unit/test_submit.py) failed after some runs of
tests/integration/test_kfp_local.py and not others.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def local_pipeline_runs(pipeline_root: Path, cache_root: Path, runner=None) -> Iterator[None]:
    """`kfp.local.init` (`runner`, default SubprocessRunner in this environment; caching on) for
    the `with` block; then the configuration is reset and `builtins.print` and the root logger's
    handlers and level are put back as they were before it, whatever the pipeline's task threads
    left there."""
    from kfp import local

    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    local.init(
        runner=runner or local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=True,
        cache_root=str(cache_root),
    )
    try:
        yield
    finally:
        local.config.LocalExecutionConfig.instance = None
        builtins.print = saved_print
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)


@dataclass
class ContainerRun:
    """One task's container, as kfp.local's DockerRunner started it."""

    image: str
    command: list[str]
    user: str
    exit_code: int
    log: str

    def executor_input(self) -> dict:
        return json.loads(self.command[self.command.index("--executor_input") + 1])


@contextlib.contextmanager
def docker_runner_on_podman(docker_host: str) -> Iterator[list[ContainerRun]]:
    """`docker.from_env()`, as kfp.local's DockerRunner calls it for each task, connected to
    `docker_host` and with one change that podman's Docker-compatible API needs; yields the list
    of the containers the block ran (image, command, user, exit code, log).

    kfp 2.17 (kfp/local/docker_task_handler.py, `run_docker_container`) starts every task with
    `auto_remove=True`, streams its log, then calls `container.wait()`, and reads a NotFound there
    as exit code 0 ("the container exited successfully"). Podman removes the container as soon as
    it exits and answers the inspect that docker-py's wait makes with HTTP 500 ("no such
    container"), not 404: kfp raised docker.errors.APIError on about one run in two (seen here),
    and with a 404 it would have called a failed task a success. So the containers are created
    without auto-removal, `wait()` returns the real exit code, and the container is removed after
    it. The record of each run is what the test checks: which image ran which task, as whom.
    """
    import docker  # docker-py (its package imports docker.models)

    runs: list[ContainerRun] = []

    class _Kept:
        def __init__(self, container, image: str, command: list[str]) -> None:
            self._c, self._image, self._command = container, image, command

        def logs(self, **kwargs):
            return self._c.logs(**kwargs)

        def wait(self, **kwargs):
            result = self._c.wait(**kwargs)
            self._c.reload()
            runs.append(
                ContainerRun(
                    image=self._image,
                    command=list(self._command),
                    user=self._c.attrs["Config"].get("User", ""),
                    exit_code=int(result["StatusCode"]),
                    log=self._c.logs().decode(errors="replace"),
                )
            )
            self._c.remove(force=True)
            return result

    class _Containers(docker.models.containers.ContainerCollection):
        def run(self, image, command=None, stdout=True, stderr=False, remove=False, **kwargs):
            kwargs["auto_remove"] = False
            container = super().run(image, command, stdout, stderr, remove, **kwargs)
            return _Kept(container, image, command or [])

    class _Client(docker.DockerClient):
        @property
        def containers(self):
            return _Containers(client=self)

    saved = docker.from_env
    docker.from_env = lambda *a, **kw: _Client(base_url=docker_host, timeout=600)
    try:
        yield runs
    finally:
        docker.from_env = saved

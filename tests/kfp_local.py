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
import logging
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_pipeline_runs(pipeline_root: Path, cache_root: Path) -> Iterator[None]:
    """`kfp.local.init` (SubprocessRunner in this environment, caching on) for the `with` block;
    then the configuration is reset and `builtins.print` and the root logger's handlers and level
    are put back as they were before it, whatever the pipeline's task threads left there."""
    from kfp import local

    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
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

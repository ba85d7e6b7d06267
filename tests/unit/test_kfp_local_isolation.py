"""tests/kfp_local.py: a kfp.local test leaves no process-wide state to the tests after it."""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys

from tests.kfp_local import local_pipeline_runs


def _overlapping_tasks() -> None:
    """What kfp.local's `dispatch_task` does around two tasks of a ParallelFor that its thread pool
    runs at once (the logger context, then the indented print, per task): A and B both start, A
    finishes first, B last."""
    from kfp.local import logging_utils

    a, b = contextlib.ExitStack(), contextlib.ExitStack()
    for task in (a, b):
        task.enter_context(logging_utils.local_logger_context())
        task.enter_context(logging_utils.indented_print())
    a.close()
    b.close()


def test_overlapping_tasks_leave_print_and_the_root_logger_as_they_were(tmp_path, capsys, caplog):
    from kfp import local

    caplog.set_level(logging.ERROR)  # not kfp's INFO (caplog puts the root level back)
    root = logging.getLogger()
    before = (builtins.print, root.handlers[:], root.level)
    with local_pipeline_runs(tmp_path / "pipeline_root", tmp_path / "cache"):
        assert local.config.LocalExecutionConfig.instance is not None
        _overlapping_tasks()
        # the hazard is real: kfp.local itself leaves its replacements behind
        assert builtins.print is not before[0]
        assert root.handlers != before[1]
        assert root.level == logging.INFO

    assert (builtins.print, root.handlers, root.level) == before
    assert local.config.LocalExecutionConfig.instance is None
    capsys.readouterr()
    print("efcm: an error", file=sys.stderr)  # what pipelines/submit.py does on a failed submit
    out, err = capsys.readouterr()
    assert (out, err) == ("", "efcm: an error\n")

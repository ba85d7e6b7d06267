"""The one place the pipeline relies on kfp internals: each shim is a named function, checked
against the kfp version below.

`tests/unit/test_kfp_shim.py` fails when another kfp is installed (re-check every shim here against
it, then update `KFP_CHECKED`) and when the behaviour a shim relies on changes.
"""

from __future__ import annotations

from kfp import dsl

# The kfp release every shim below was read and tested against (`pip show kfp`).
KFP_CHECKED = "2.17.0"


def declare_channel_input(task: dsl.PipelineTask, channel: dsl.PipelineParameterChannel) -> None:
    """Make the pipeline parameter `channel` an input of `task`, as if it were an argument.

    kfp 2.17.0 leaves a parameter used only as a task's accelerator type
    (`set_accelerator_type(param)`) out of the inputs of an enclosing ParallelFor's sub-DAG, so
    the task inside cannot resolve it. The compiler builds those inputs from the task's private
    `_channel_inputs` list (exposed read-only as `channel_inputs`, marked `:meta private:`);
    `register_pipeline_channels` is the method kfp 2.17.0 gives to add to it (deduplicated by the
    channel's pattern).
    """
    task.register_pipeline_channels([channel])

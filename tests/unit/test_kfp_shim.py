"""The kfp shims of pipelines/kfp_shim.py hold with the installed kfp: its version is the one they
were checked against, and the behaviour each one relies on is still there."""

from importlib.metadata import version
from pathlib import Path

import yaml
from kfp import compiler, dsl

from pipelines.kfp_shim import KFP_CHECKED, declare_channel_input

ACCELERATOR_INPUT = "pipelinechannel--accelerator"


def test_installed_kfp_is_the_one_the_shims_were_checked_against():
    installed = version("kfp")
    assert installed == KFP_CHECKED, (
        f"kfp {installed} is installed, but pipelines/kfp_shim.py was checked against kfp "
        f"{KFP_CHECKED}: re-check every shim there against kfp {installed} (and the tests here), "
        "then set KFP_CHECKED"
    )


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _echo(x: int) -> int:
    return x


def _loop_inputs(tmp_path: Path, shim: bool) -> set[str]:
    """The inputs of the ParallelFor sub-DAG of a pipeline whose task inside the loop takes its
    accelerator type from a pipeline parameter (as the GPU stages do), with or without the shim."""

    @dsl.pipeline(name="shim")
    def pipeline(items: list, accelerator: str):
        with dsl.ParallelFor(items, name="loop") as item:
            task = _echo(x=item)
            task.set_accelerator_type(accelerator).set_accelerator_limit(1)
            if shim:
                declare_channel_input(task, accelerator)

    path = tmp_path / f"shim_{shim}.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    components = next(yaml.safe_load_all(path.read_text()))["components"]
    (loop,) = [c for name, c in components.items() if name.startswith("comp-for-loop")]
    return set(loop["inputDefinitions"]["parameters"])


def test_declare_channel_input_puts_the_parameter_into_the_parallelfor_inputs(tmp_path):
    assert ACCELERATOR_INPUT in _loop_inputs(tmp_path, shim=True)


def test_kfp_still_needs_the_shim(tmp_path):
    """When kfp passes the accelerator parameter into the loop by itself, the shim can go."""
    assert ACCELERATOR_INPUT not in _loop_inputs(tmp_path, shim=False), (
        "kfp now passes a parameter used only as an accelerator type into a ParallelFor: "
        "drop `declare_channel_input` from pipelines/pipeline.py and pipelines/kfp_shim.py"
    )


def test_declare_channel_input_adds_the_channel_to_the_tasks_channel_inputs_once():
    """What the compiler reads (`PipelineTask.channel_inputs`, the private `_channel_inputs`)
    gains the channel, once however often it is declared."""
    seen = {}

    @dsl.pipeline(name="shim")
    def pipeline(accelerator: str):
        task = _echo(x=1)
        declare_channel_input(task, accelerator)
        declare_channel_input(task, accelerator)
        seen["channels"] = list(task.channel_inputs)
        seen["private"] = list(task._channel_inputs)

    assert [c.name for c in seen["channels"]] == ["accelerator"]
    assert seen["private"] == seen["channels"]

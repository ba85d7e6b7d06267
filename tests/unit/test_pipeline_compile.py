"""The compiled pipeline: committed and fresh, strictly valid IR, GPUs where they belong,
params.yaml as the defaults."""

import re

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

import efcm
from components.image import IMAGE, SERVING_CPU_IMAGE, SERVING_IMAGE
from efcm import registry
from efcm.config import load_params, params_from_dict
from pipelines.compile import compile_pipeline, main, pipeline_arguments
from pipelines.pipeline import PIPELINE_KEYS, SECTIONS
from tests.conftest import ROOT

COMMITTED = ROOT / "pipelines" / "efcm_pipeline.yaml"
# evaluate measures teacher vs student patches/s: on the device that extracts; one `strategy`
# task spec serves every strategy of the ParallelFor, so it gets the GPU some of them need
GPU_STAGES = {"extract", "distill", "train-mil", "strategy", "evaluate"}
CPU_STAGES = {
    "resolve-version",
    "resolve-dataset",
    "plan-shards",
    "patch",
    "gather",
    "splits",
    "plan-strategies",
    "report",
    "gate",
    "export",
    "deploy",
}
# strategy: ETC reads the slides from GCS
GCS_READERS = {"resolve-version", "resolve-dataset", "patch", "extract", "strategy"}
UNCACHED = {"resolve-version", "deploy"}
ACCELERATOR = "{{$.inputs.parameters['pipelinechannel--gpu_accelerator_type']}}"


def _parse(path):
    pipeline_doc, platform_doc = yaml.safe_load_all(path.read_text())
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    k8s = {
        label: json_format.ParseDict(
            json_format.MessageToDict(cfg), k8s_pb2.KubernetesExecutorConfig()
        )
        for label, cfg in platform.platforms["kubernetes"].deployment_spec.executors.items()
    }
    return spec, k8s


def _tasks(spec, dag=None, groups=()):
    """[(stage, task name, task spec, executor label, container, enclosing groups)] over every
    DAG, the ParallelFor and dsl.If sub-DAGs included."""
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    out = []
    for name, task in (dag or spec.root.dag).tasks.items():
        comp = spec.components[task.component_ref.name]
        if comp.HasField("dag"):
            out += _tasks(spec, comp.dag, (*groups, name))
            continue
        container = json_format.ParseDict(
            executors[comp.executor_label]["container"],
            pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec(),
        )
        stage = re.sub(r"-\d+$", "", task.component_ref.name.removeprefix("comp-"))
        out.append((stage, name, task, comp.executor_label, container, groups))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "efcm_pipeline.yaml"
    return compile_pipeline(path)


def test_committed_pipeline_is_up_to_date(compiled):
    assert COMMITTED.is_file(), (
        "pipelines/efcm_pipeline.yaml is missing: run python pipelines/compile.py"
    )
    assert COMMITTED.read_text() == compiled.read_text(), (
        "pipelines/efcm_pipeline.yaml is stale (components, pipeline or params.yaml changed): "
        "run `python pipelines/compile.py` and commit the result"
    )


def test_compiling_twice_gives_the_same_bytes(compiled, tmp_path):
    assert compile_pipeline(tmp_path / "again.yaml").read_bytes() == compiled.read_bytes()


def test_every_stage_is_a_task_and_the_gpu_policy_holds(compiled):
    spec, k8s = _parse(compiled)
    tasks = _tasks(spec)
    stages = sorted(stage for stage, *_ in tasks)
    # train-mil once: the teacher's baseline (Retrain CLAM on the student runs as a strategy)
    gpu = ["extract", "extract", "distill", "train-mil", "strategy", "evaluate"]
    # gather three times: patches, teacher features, student features
    assert stages == sorted([*CPU_STAGES, "gather", "gather", *gpu])
    for stage, name, task, label, container, _ in tasks:
        res = container.resources
        cfg = k8s[label]
        # every stage: CPU and memory requests and a timeout
        assert res.resource_cpu_request and res.resource_memory_request, name
        assert cfg.active_deadline_seconds > 0, name
        if stage in GPU_STAGES:
            assert res.accelerator.resource_type == ACCELERATOR, name
            assert res.accelerator.resource_count == "1", name
            # the accelerator type and the node selector are pipeline parameters
            param = task.inputs.parameters["pipelinechannel--gpu_accelerator_type"]
            assert param.component_input_parameter.endswith("gpu_accelerator_type"), name
            selector = cfg.node_selector.node_selector_json.component_input_parameter
            assert selector.endswith("gpu_node_selector"), name
            assert [(t.key, t.operator, t.effect) for t in cfg.tolerations] == [
                ("nvidia.com/gpu", "Exists", "NoSchedule")
            ], name
            assert [(m.mount_path, m.medium) for m in cfg.empty_dir_mounts] == [
                ("/dev/shm", "Memory")
            ], name
        else:
            assert stage in CPU_STAGES, name
            assert not res.HasField("accelerator"), name
            assert not cfg.HasField("node_selector") and not cfg.tolerations, name
            assert not cfg.empty_dir_mounts, name


def test_caching_retries_shards_and_the_gate(compiled):
    spec, _ = _parse(compiled)
    tasks = _tasks(spec)
    for stage, name, task, *_ in tasks:
        assert task.caching_options.enable_cache is (stage not in UNCACHED), name
        assert (task.retry_policy.max_retry_count == 3) is (stage in GCS_READERS), name
    groups = {name: g for _, name, *_, g in tasks}
    # patch and the teacher extraction run per shard, in one ParallelFor, `parallelism` at a time;
    # the student's extraction per shard too, over the same shards, in a second one
    parallelism = load_params(ROOT / "params.yaml").pipeline.parallelism
    assert groups["patch"] == groups["extract"] == ("for-loop-1",)
    assert groups["extract-2"] == ("for-loop-2",)
    for loop_name in ("for-loop-1", "for-loop-2"):
        loop = spec.root.dag.tasks[loop_name]
        items = loop.parameter_iterator.items.input_parameter
        assert items == "pipelinechannel--plan-shards-Output", loop_name
        assert loop.iterator_policy.parallelism_limit == parallelism, loop_name
    gathered = {
        spec.root.dag.tasks[name].inputs.artifacts["shards"].task_output_artifact.producer_task
        for stage, name, *_ in tasks
        if stage == "gather"
    }
    assert gathered == {"for-loop-1", "for-loop-2"}
    # deploy only under the promotion gate's condition
    (cond,) = groups["deploy"]
    trigger = spec.root.dag.tasks[cond].trigger_policy.condition
    assert "gate-Output" in trigger and "== true" in trigger, trigger
    # the strategies run in a second ParallelFor, over what plan_strategies resolved, all at once
    loop = spec.root.dag.tasks["for-loop-3"]
    assert groups["strategy"] == ("for-loop-3",)
    items = loop.parameter_iterator.items.input_parameter
    assert items == "pipelinechannel--plan-strategies-Output"
    assert loop.iterator_policy.parallelism_limit == len(registry.STRATEGIES)
    # evaluate, export and the report each collect every strategy's output (dsl.Collected)
    for consumer in ("evaluate", "export", "report"):
        src = spec.root.dag.tasks[consumer].inputs.artifacts["strategies"].task_output_artifact
        assert src.producer_task == "for-loop-3", consumer
        assert src.output_artifact_key == "pipelinechannel--strategy-strategy", consumer
    nested = {"patch", "extract", "strategy", "deploy"}
    assert [name for stage, name, *_, g in tasks if g and stage not in nested] == []


def test_images_are_pinned_to_the_efcm_version(compiled):
    spec, _ = _parse(compiled)
    images = {container.image for *_, container, _ in _tasks(spec)}
    assert images == {IMAGE}
    for image in (IMAGE, SERVING_IMAGE):
        assert not image.endswith(":latest")
        assert image.rsplit(":", 1)[1] == efcm.__version__
    defaults = spec.root.input_definitions.parameters
    assert defaults["serving_image"].default_value.string_value == SERVING_IMAGE
    assert defaults["serving_cpu_image"].default_value.string_value == SERVING_CPU_IMAGE


def test_parameter_defaults_are_the_params_yaml_sections(compiled):
    spec, _ = _parse(compiled)
    params_path = ROOT / "params.yaml"
    params = load_params(params_path)
    raw = yaml.safe_load(params_path.read_text())
    inputs = spec.root.input_definitions.parameters
    names = ("seed", *SECTIONS, *PIPELINE_KEYS)
    defaults = {name: json_format.MessageToDict(inputs[name].default_value) for name in names}
    # the same configuration once validated...
    sections = {k: v for k, v in defaults.items() if k not in PIPELINE_KEYS}
    assert params_from_dict(sections).model_dump(include=set(sections)) == params.model_dump(
        include=set(sections)
    )
    for key in PIPELINE_KEYS:
        assert defaults[key] == raw["pipeline"][key], key
    # ...every value written in params.yaml is there as written (KFP carries no nulls: a null key is
    # left out, and takes its null default back)
    for name in SECTIONS:
        for key, value in raw[name].items():
            if value is None:
                assert key not in defaults[name], f"{name}.{key}"
            else:
                assert defaults[name][key] == value, f"{name}.{key}"
    assert defaults["seed"] == raw["seed"]
    assert defaults == pipeline_arguments(params)
    assert inputs["dry_run"].default_value.bool_value is False  # a run deploys, unless asked not to
    assert not inputs["manifest_path"].HasField("default_value")


def test_image_and_parallelism_overrides(tmp_path):
    out = tmp_path / "p.yaml"
    args = ["--image", "europe-docker.pkg.dev/p/r/efcm:1.2.3", "--parallelism", "7"]
    assert main([*args, "--out", str(out)]) == 0
    spec, _ = _parse(out)
    assert {c.image for *_, c, _ in _tasks(spec)} == {"europe-docker.pkg.dev/p/r/efcm:1.2.3"}
    assert spec.root.dag.tasks["for-loop-1"].iterator_policy.parallelism_limit == 7
    # building another pipeline did not change the components' own image
    spec, _ = _parse(compile_pipeline(tmp_path / "default.yaml"))
    assert {c.image for *_, c, _ in _tasks(spec)} == {IMAGE}


@pytest.mark.parametrize("image", ["ghcr.io/efcm/efcm:latest", "ghcr.io/efcm/efcm"])
def test_unpinned_image_is_refused(tmp_path, image, capsys):
    assert main(["--image", image, "--out", str(tmp_path / "p.yaml")]) == 2
    assert "explicit tag" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_invalid_params_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("teacher:\n  archh: vit\n")
    assert main(["--params", str(bad), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "teacher.archh" in capsys.readouterr().err


# dvc.yaml stage -> the KFP task (display name) that runs the same `efcm.stages` function: each
# dvc stage strategy_<name> is an iteration of the one `strategy` task in the ParallelFor
DVC_TWIN = {
    "patch": "patch",
    "extract_teacher": "extract-teacher",
    "distill": "distill",
    "extract_student": "extract-student",
    "splits": "splits",
    "train_mil_teacher": "train-mil-teacher",
    **{f"strategy_{name}": "strategy" for name in registry.NAMES},
    "evaluate": "evaluate",
    "report": "report",
    "gate": "gate",
    "export": "export",
}


def _given_parameters(task) -> set[str]:
    """The pipeline parameters a compiled task takes (by their names in the pipeline)."""
    return {
        k.removeprefix("pipelinechannel--")
        for k, v in task.inputs.parameters.items()
        if v.component_input_parameter
    }


def test_dvc_yaml_is_the_local_twin_of_the_pipeline(compiled):
    """Same stages (demo_data is local only; resolve, shards, gather and deploy are cluster
    only) and every params.yaml section a DVC stage depends on reaches its KFP task."""
    spec, _ = _parse(compiled)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) - {"demo_data"} == set(DVC_TWIN)
    by_display = {}
    for _, name, task, *_ in _tasks(spec):
        by_display[task.task_info.name or name] = (name, task)
    for stage, display in DVC_TWIN.items():
        assert display in by_display, f"dvc stage {stage}: no KFP task {display}"
        _, task = by_display[display]
        sections = {p.split(".")[0] for p in stages[stage].get("params", [])}
        assert sections, f"dvc stage {stage} depends on no params section"
        given = _given_parameters(task)
        missing = sections - given
        assert not missing, f"{stage}: KFP task {display} lacks params {sorted(missing)}"
        if display == "strategy":  # strategy_<name>: the iteration whose item is <name>
            item = task.inputs.parameters["name"].component_input_parameter
            assert item == "pipelinechannel--plan-strategies-Output-loop-item", stage


def test_distillation_on_several_gpus_or_nodes_is_a_compile_time_choice(tmp_path):
    """pipeline.distill_gpus: the distill pod asks for that many GPUs and runs that many DDP
    processes; pipeline.distill_nodes > 1: a CPU step submits a Kubeflow Trainer TrainJob
    instead (kfp.local cannot run dsl.OneOf, so the choice is made when compiling)."""
    from kfp import compiler

    from pipelines.pipeline import build_pipeline

    def compiled(**kw):
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
        compiler.Compiler().compile(build_pipeline(parallelism=2, **kw), str(path))
        return _parse(path)

    spec, _ = compiled(distill_gpus=4)
    ((_name, task, container),) = [
        (n, t, c) for stage, n, t, _, c, _ in _tasks(spec) if stage == "distill"
    ]
    assert container.resources.accelerator.resource_count == "4"
    assert container.resources.resource_cpu_request == "24"
    assert task.inputs.parameters["gpus"].runtime_value.constant.number_value == 4
    spec, _k8s = compiled(distill_nodes=3, distill_gpus=2)
    stages = {stage: (t, label, c) for stage, _, t, label, c, _ in _tasks(spec)}
    assert "distill" not in stages
    task, _label, container = stages["distill-job"]
    assert not container.resources.HasField("accelerator")  # the job's pods hold the GPUs
    assert task.inputs.parameters["nodes"].runtime_value.constant.number_value == 3
    assert task.inputs.parameters["gpus_per_node"].runtime_value.constant.number_value == 2
    with pytest.raises(ValueError, match="distill_nodes must be >= 1"):
        build_pipeline(distill_nodes=0)


def test_etc_on_several_gpus_asks_for_them_in_every_strategy_pod(tmp_path):
    """pipeline.etc_gpus: one task spec serves every strategy of the ParallelFor, so each
    strategy pod asks for that many GPUs (and CPUs and memory per GPU); the component runs ETC as
    that many processes and the others as one (`efcm.stages.strategy_processes`)."""
    from kfp import compiler

    from efcm.config import params_from_dict
    from efcm.stages import strategy_processes
    from pipelines.pipeline import build_pipeline

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_pipeline(parallelism=2, etc_gpus=4), str(path))
    spec, _ = _parse(path)
    ((task, container),) = [(t, c) for stage, _, t, _, c, _ in _tasks(spec) if stage == "strategy"]
    assert container.resources.accelerator.resource_count == "4"
    assert container.resources.resource_cpu_request == "24"
    assert task.inputs.parameters["gpus"].runtime_value.constant.number_value == 4
    assert [strategy_processes(n, 4) for n in ("reuse", "retrain", "etc")] == [1, 1, 4]
    with pytest.raises(ValueError, match="etc_gpus must be >= 1"):
        build_pipeline(etc_gpus=0)
    with pytest.raises(ValueError, match=r"mil\.etc\.accumulate 2 does not divide by pipeline"):
        params_from_dict({"mil": {"etc": {"accumulate": 2}}, "pipeline": {"etc_gpus": 4}})
    params_from_dict({"mil": {"etc": {"accumulate": 8}}, "pipeline": {"etc_gpus": 4}})


# -- the image pipeline (pipelines/image_pipeline.py, issue 16) ----------------------------------

IMAGE_DIR = ROOT / "pipelines" / "image"
IMAGE_COMMITTED = IMAGE_DIR / "efcm_image_pipeline.yaml"
# pipelines/image/dvc.yaml stage -> the KFP task (display name) that runs the same efcm.stages
# function; strategy_<name> is an iteration of the one `strategy` task of the ParallelFor
# (the slide pipeline's names, less patch and report, which images do not have)
IMAGE_DVC_TWIN = {
    **{
        k: v
        for k, v in DVC_TWIN.items()
        if k not in {"patch", "report"} and not k.startswith("strategy_")
    },
    **{f"strategy_{name}": "strategy" for name in registry.IMAGE_NAMES},
}
# cluster only: the manifest import, the strategies' plan, and deploy
IMAGE_CLUSTER_ONLY = {"resolve-version", "resolve-dataset", "plan-strategies", "deploy"}
IMAGE_GPU_TASKS = {
    "extract-teacher",
    "extract-student",
    "distill",
    "train-mil-teacher",
    "strategy",
    "evaluate",
}


@pytest.fixture(scope="module")
def image_compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "efcm_image_pipeline.yaml"
    assert main(["--kind", "image", "--out", str(path)]) == 0
    return path


def _by_display(spec) -> dict:
    """{task display name: (task, container, k8s executor label, groups)} of a compiled spec."""
    return {t.task_info.name or n: (t, c, label, g) for _, n, t, label, c, g in _tasks(spec)}


def test_committed_image_pipeline_is_up_to_date(image_compiled):
    assert IMAGE_COMMITTED.read_text() == image_compiled.read_text(), (
        "pipelines/image/efcm_image_pipeline.yaml is stale (components, pipeline or "
        "pipelines/image/params.yaml changed): run `python pipelines/compile.py --kind image` "
        "and commit the result"
    )
    spec, _ = _parse(image_compiled)
    assert spec.pipeline_info.name == "efcm-image"


def test_image_pipeline_tasks_are_the_image_dvc_stages(image_compiled):
    """Every image DVC stage but demo_data is a task of the same name, given every params
    section the stage depends on; the rest are cluster only."""
    spec, _ = _parse(image_compiled)
    tasks = _by_display(spec)
    stages = yaml.safe_load((IMAGE_DIR / "dvc.yaml").read_text())["stages"]
    assert set(stages) - {"demo_data"} == set(IMAGE_DVC_TWIN)
    assert set(tasks) == set(IMAGE_DVC_TWIN.values()) | IMAGE_CLUSTER_ONLY
    for stage, display in IMAGE_DVC_TWIN.items():
        task = tasks[display][0]
        sections = {p.split(".")[0] for p in stages[stage]["params"]}
        given = _given_parameters(task)
        assert not sections - given, f"{stage}: task {display} lacks {sorted(sections - given)}"
    # one strategy task per strategy the run compares, all at once; deploy under the gate
    strategy_task, *_, groups = tasks["strategy"]
    (loop_name,) = groups
    loop = spec.root.dag.tasks[loop_name]
    items = loop.parameter_iterator.items.input_parameter
    assert items == "pipelinechannel--plan-image-strategies-Output"
    assert loop.iterator_policy.parallelism_limit == len(registry.IMAGE_STRATEGIES)
    name = strategy_task.inputs.parameters["name"].component_input_parameter
    assert name == "pipelinechannel--plan-image-strategies-Output-loop-item"
    (cond,) = tasks["deploy"][3]
    assert "gate-Output" in spec.root.dag.tasks[cond].trigger_policy.condition


def test_image_pipeline_gpu_policy_images_and_defaults(image_compiled):
    spec, k8s = _parse(image_compiled)
    for display, (task, container, label, _) in _by_display(spec).items():
        res, cfg = container.resources, k8s[label]
        assert container.image == IMAGE, display
        assert res.resource_cpu_request and cfg.active_deadline_seconds > 0, display
        assert task.caching_options.enable_cache is (display not in UNCACHED), display
        if display in IMAGE_GPU_TASKS:
            assert res.accelerator.resource_type == ACCELERATOR, display
            assert [(t.key, t.effect) for t in cfg.tolerations] == [
                ("nvidia.com/gpu", "NoSchedule")
            ], display
            assert cfg.node_selector.node_selector_json.component_input_parameter, display
        else:
            assert not res.HasField("accelerator") and not cfg.tolerations, display
    params = load_params(IMAGE_DIR / "params.yaml")
    inputs = spec.root.input_definitions.parameters
    args = pipeline_arguments(params, "image")
    assert {k: json_format.MessageToDict(inputs[k].default_value) for k in args} == args
    assert args["image"]["preset"] == params.image.preset
    assert not inputs["manifest_path"].HasField("default_value")


def test_image_pipeline_has_no_shards(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["--kind", "image", "--parallelism", "3", "--out", str(out)]) == 2
    assert "--parallelism is for the slide pipeline" in capsys.readouterr().err
    assert not out.exists()

"""The compiled pipeline: committed and fresh, strictly valid IR, GPUs where they belong,
params.yaml as the defaults."""

import re

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

import efcm
from components.image import IMAGE, SERVING_IMAGE
from efcm.config import load_params, params_from_dict
from pipelines.compile import compile_pipeline, main, pipeline_arguments
from pipelines.pipeline import SECTIONS
from tests.conftest import ROOT

COMMITTED = ROOT / "pipelines" / "efcm_pipeline.yaml"
# evaluate measures teacher vs student patches/s: on the device that extracts
GPU_STAGES = {"extract", "distill", "train-mil", "etc", "evaluate"}
CPU_STAGES = {"load-manifest", "patch", "splits", "reuse", "export", "deploy"}


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


def _executors_by_stage(spec):
    """[(stage, task name, executor label, PipelineContainerSpec)] over the root DAG's tasks."""
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    out = []
    for name, task in spec.root.dag.tasks.items():
        comp = task.component_ref.name
        label = spec.components[comp].executor_label
        container = json_format.ParseDict(
            executors[label]["container"],
            pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec(),
        )
        out.append((re.sub(r"-\d+$", "", comp.removeprefix("comp-")), name, label, container))
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


def test_every_stage_is_a_task_and_gpu_stages_alone_get_an_accelerator(compiled):
    spec, k8s = _parse(compiled)
    tasks = _executors_by_stage(spec)
    stages = sorted(stage for stage, *_ in tasks)
    assert stages == sorted(
        [*CPU_STAGES, "extract", "extract", "distill", "train-mil", "train-mil", "etc", "evaluate"]
    )
    for stage, name, label, container in tasks:
        accelerator = container.resources.accelerator
        if stage in GPU_STAGES:
            assert accelerator.resource_type == "nvidia.com/gpu", name
            assert accelerator.resource_count == "1", name
            cfg = k8s[label]
            assert [(t.key, t.operator, t.effect) for t in cfg.tolerations] == [
                ("nvidia.com/gpu", "Exists", "NoSchedule")
            ], name
            assert [(m.mount_path, m.medium) for m in cfg.empty_dir_mounts] == [
                ("/dev/shm", "Memory")
            ], name
        else:
            assert stage in CPU_STAGES, name
            assert not container.resources.HasField("accelerator"), name
            assert not accelerator.resource_type and not accelerator.type, name
            assert label not in k8s, name


def test_images_are_pinned_to_the_efcm_version(compiled):
    spec, _ = _parse(compiled)
    images = {container.image for *_, container in _executors_by_stage(spec)}
    assert images == {IMAGE}
    for image in (IMAGE, SERVING_IMAGE):
        assert not image.endswith(":latest")
        assert image.rsplit(":", 1)[1] == efcm.__version__
    default = spec.root.input_definitions.parameters["serving_image"].default_value
    assert default.string_value == SERVING_IMAGE


def test_parameter_defaults_are_the_params_yaml_sections(compiled):
    spec, _ = _parse(compiled)
    params_path = ROOT / "params.yaml"
    params = load_params(params_path)
    raw = yaml.safe_load(params_path.read_text())
    inputs = spec.root.input_definitions.parameters
    defaults = {
        name: json_format.MessageToDict(inputs[name].default_value) for name in ("seed", *SECTIONS)
    }
    # the same configuration once validated...
    assert params_from_dict(defaults) == params
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
    assert inputs["dry_run"].default_value.bool_value is True
    assert not inputs["manifest_uri"].HasField("default_value")


def test_image_override_and_gpu_node_selector(tmp_path):
    out = tmp_path / "p.yaml"
    assert (
        main(
            [
                "--image",
                "europe-docker.pkg.dev/p/r/efcm:1.2.3",
                "--out",
                str(out),
                "--gpu-node-selector",
                "cloud.google.com/gke-accelerator=nvidia-l4",
            ]
        )
        == 0
    )
    spec, k8s = _parse(out)
    tasks = _executors_by_stage(spec)
    assert {c.image for *_, c in tasks} == {"europe-docker.pkg.dev/p/r/efcm:1.2.3"}
    for stage, name, label, _ in tasks:
        selector = dict(k8s[label].node_selector.labels) if label in k8s else {}
        expected = {"cloud.google.com/gke-accelerator": "nvidia-l4"} if stage in GPU_STAGES else {}
        assert selector == expected, name
    # building another pipeline did not change the components' own image
    spec, _ = _parse(compile_pipeline(tmp_path / "default.yaml"))
    assert {c.image for *_, c in _executors_by_stage(spec)} == {IMAGE}


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

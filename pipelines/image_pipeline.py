"""The EFCM image-level Kubeflow pipeline (issue 16): the stages of pipelines/image/dvc.yaml.

    resolve_version -> resolve_dataset (the image manifest, URIs made absolute)
      -> extract (teacher) -> distill -> extract (student)
      -> splits -> train_mil (teacher: its linear probe)
      -> plan_strategies -> ParallelFor strategy: one task per image strategy the run compares
         (efcm.registry: `image.strategies`, `auto` resolved against `distill.method`)
      -> evaluate (dsl.Collected strategies) -> export (image.export_strategy's package)
      -> gate (reads the package), [if promoted] deploy

The tasks show the image DVC stages' names (extract-teacher, distill, extract-student, splits,
train-mil-teacher, strategy, evaluate, export, gate); their components are the `image_*` variants
of the slide pipeline's, each calling one `efcm.stages` function. Data: `manifest_path`, a plain
image manifest (local path or gs:// URI; no DVC repository resolution, unlike the slide
pipeline). Parameters: `seed`, one `dict` per pipelines/image/params.yaml section the stages need,
the `pipeline` section's `gpu_accelerator_type` and `gpu_node_selector`, and the deploy step's
(as in the slide pipeline); `pipelines/compile.py --kind image` sets their defaults from
pipelines/image/params.yaml. No shards: an image set is extracted in one task.

Scheduling, caching and retries are the slide pipeline's (`pipelines.pipeline`: `RESOURCES`,
`_Schedule`), by the same stage names.
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from kfp import dsl
from kfp.dsl import graph_component

import components as c
from components.image import IMAGE, SERVING_CPU_IMAGE, SERVING_IMAGE
from efcm import registry
from efcm.config import STAGE_SECTIONS
from pipelines.pipeline import _collected, _per_gpu, _Schedule, deploy_if_promoted

IMAGE_PIPELINE_NAME = "efcm-image"
# pipelines/image/params.yaml sections that are `dict` pipeline parameters (`seed` is an int)
IMAGE_SECTIONS = (
    "image",
    "teacher",
    "student",
    "extract",
    "distill",
    "evaluate",
    "export",
    "deploy",
)
# pipeline.* keys that are pipeline parameters of their own
IMAGE_PIPELINE_KEYS = ("gpu_accelerator_type", "gpu_node_selector")


def _sections(p: Any, stage: str) -> dict[str, Any]:
    """The params sections (`seed` included) that `stage`'s component takes, as keyword
    arguments: exactly `efcm.config.STAGE_SECTIONS[stage]`, which a test checks against the
    components' signatures."""
    return {name: getattr(p, name) for name in STAGE_SECTIONS[stage]}


@dataclass(frozen=True)
class _ImageData:
    """The artifacts the image strategies, the evaluation and the export read."""

    manifest: Any
    teacher_features: Any
    student_model: Any
    student_features: Any
    folds: Any
    teacher_heads: Any


def _image_manifest(run: _Schedule, p: Any) -> Any:
    """resolve_version (the manifest's md5, uncached) -> resolve_dataset: the checked image
    manifest, cached on that md5."""
    version = run(
        c.resolve_version(repo_url="", revision="", manifest_path=p.manifest_path),
        "resolve-version",
    ).set_caching_options(False)
    return run(
        c.image_resolve_dataset(
            manifest_path=p.manifest_path,
            version=version.output,
            **_sections(p, "image_resolve_dataset"),
        ).set_display_name("resolve-dataset"),
        "resolve-dataset",
    ).outputs["manifest"]


def _extract(run: _Schedule, p: Any, manifest: Any, **student: Any) -> Any:
    """The teacher's image features, or with `student_model` the student's."""
    encoder = "student" if student else "teacher"
    return run(
        c.image_extract(
            manifest=manifest, encoder=encoder, **_sections(p, "image_extract"), **student
        ).set_display_name(f"extract-{encoder}"),
        "extract",
    ).outputs["features"]


def _features_and_student(
    run: _Schedule, p: Any, manifest: Any, distill_gpus: int
) -> tuple[Any, Any, Any]:
    """extract (teacher) -> distill (`distill_gpus` DDP processes in one pod) -> extract
    (student): the teacher's features, the student and its features."""
    teacher_features = _extract(run, p, manifest)
    task = run(
        c.image_distill(
            manifest=manifest,
            teacher_features=teacher_features,
            gpus=distill_gpus,
            **_sections(p, "image_distill"),
        ).set_display_name("distill"),
        "distill",
    )
    student_model = _per_gpu(task, "distill", distill_gpus).outputs["student_model"]
    student_features = _extract(run, p, manifest, student_model=student_model)
    return teacher_features, student_model, student_features


def _teacher_probe(run: _Schedule, p: Any, manifest: Any, teacher_features: Any) -> tuple[Any, Any]:
    """splits -> train_mil (teacher): the patient-level folds and the teacher's linear probe."""
    folds = run(
        c.image_splits(
            manifest=manifest, features=teacher_features, **_sections(p, "image_splits")
        ).set_display_name("splits"),
        "splits",
    ).outputs["splits"]
    heads = run(
        c.image_train_mil(
            manifest=manifest,
            features=teacher_features,
            splits=folds,
            **_sections(p, "image_train_mil"),
        ).set_display_name("train-mil-teacher"),
        "train-mil",
    ).outputs["heads"]
    return folds, heads


def _compare_image_strategies(run: _Schedule, p: Any, data: _ImageData) -> Any:
    """plan_strategies -> ParallelFor strategy: one task per image strategy this run compares,
    each with every input (an entry reads only those it names)."""
    planned = run(
        c.plan_image_strategies(**_sections(p, "plan_image_strategies")).set_display_name(
            "plan-strategies"
        ),
        "plan-strategies",
    )
    with dsl.ParallelFor(
        planned.output, parallelism=len(registry.IMAGE_STRATEGIES), name="strategies"
    ) as name:
        return run(
            c.image_strategy(
                name=name,
                manifest=data.manifest,
                splits=data.folds,
                teacher_heads=data.teacher_heads,
                student_model=data.student_model,
                student_features=data.student_features,
                **_sections(p, "image_strategy"),
            ).set_display_name("strategy"),
            "strategy",
        )


def _evaluate_export_gate(run: _Schedule, p: Any, data: _ImageData, outcome: Any) -> None:
    """evaluate -> export -> gate (on the package), and deploy when the gate promotes it."""
    evaluation = run(
        c.image_evaluate(
            manifest=data.manifest,
            teacher_heads=data.teacher_heads,
            strategies=_collected(outcome),
            student_model=data.student_model,
            **_sections(p, "image_evaluate"),
        ).set_display_name("evaluate"),
        "evaluate",
    ).outputs["evaluation"]
    package = run(
        c.image_export(
            student_model=data.student_model,
            strategies=_collected(outcome),
            evaluation=evaluation,
            student_features=data.student_features,
            manifest=data.manifest,
            splits=data.folds,
            **_sections(p, "image_export"),
        ).set_display_name("export"),
        "export",
    ).outputs["package"]
    promote = run(c.gate(package=package, **_sections(p, "gate")), "gate")
    deploy_if_promoted(run, p, promote, package)


def build_image_pipeline(
    image: str = IMAGE, *, distill_gpus: int = 1
) -> graph_component.GraphComponent:
    """The image pipeline, every component running `image`, the distillation on `distill_gpus`
    GPUs (one pod, torchrun). The image strategies run as one process each (no multi-GPU
    fine-tuning), and there is no multi-node distillation (the TrainJob runs the slide
    `efcm distill`)."""
    if distill_gpus < 1:
        raise ValueError(f"distill_gpus must be >= 1, got {distill_gpus}")
    component_image = image  # the pipeline's `image` parameter is the params section

    @dsl.pipeline(name=IMAGE_PIPELINE_NAME, description=__doc__.splitlines()[0])
    def efcm_image_pipeline(
        manifest_path: str,
        seed: int,
        image: dict,
        teacher: dict,
        student: dict,
        extract: dict,
        distill: dict,
        evaluate: dict,
        export: dict,
        deploy: dict,
        gpu_accelerator_type: str,
        gpu_node_selector: dict,
        namespace: str = "efcm",
        serving_image: str = SERVING_IMAGE,
        serving_cpu_image: str = SERVING_CPU_IMAGE,
        serving_service_account: str = "efcm-serving",
        serve_on_gpu: bool = False,
        canary_traffic_percent: int = 100,
        ready_timeout_s: int = 600,
        dry_run: bool = False,
    ):
        # every parameter by name (the deploy step's under the names `deploy_if_promoted` reads);
        # an image endpoint reads no slides by URI
        p = SimpleNamespace(**locals(), slide_uri_prefixes="")
        run = _Schedule(component_image, gpu_accelerator_type, gpu_node_selector)
        manifest = _image_manifest(run, p)
        teacher_features, student_model, student_features = _features_and_student(
            run, p, manifest, distill_gpus
        )
        folds, heads = _teacher_probe(run, p, manifest, teacher_features)
        data = _ImageData(manifest, teacher_features, student_model, student_features, folds, heads)
        outcome = _compare_image_strategies(run, p, data)
        _evaluate_export_gate(run, p, data, outcome)

    return efcm_image_pipeline

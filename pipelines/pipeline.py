"""The EFCM Kubeflow pipeline: the same stages as dvc.yaml, one component each, wired by artifacts.

    load_manifest -> patch -> extract (teacher) -> distill -> extract (student) -> splits
      -> train_mil (teacher), train_mil (student = Retrain CLAM), reuse, etc
      -> evaluate -> export -> deploy

Parameters: `manifest_uri` (a local path or gs:// URI of the slide manifest; the slides are
referenced, never copied), `seed` and one `dict` per params.yaml section the stages need (the
defaults are set from params.yaml by `pipelines/compile.py`, so the KFP UI shows them and a run can
override them), and the deploy settings. `dry_run` (default True) only renders the InferenceService.

GPU stages (extract, distill, train_mil, etc, and evaluate, which measures teacher vs student
patches/s and should do so on the device that extracts) ask for one `nvidia.com/gpu` (the resource
name the KFP backend puts in the pod's limits), tolerate the `nvidia.com/gpu` taint, get a
memory-backed /dev/shm for DataLoader workers, and take the node selector given at compile time.
The other stages (load_manifest, patch, splits, reuse, export, deploy) run on CPU.
load_manifest and deploy are never cached: the first reads a URI whose content may change, the
second acts on the cluster.
"""

from collections.abc import Mapping

from kfp import dsl, kubernetes
from kfp.dsl import graph_component

import components as c
from components.image import IMAGE, SERVING_IMAGE

PIPELINE_NAME = "efcm"
GPU_ACCELERATOR = "nvidia.com/gpu"
GPU_STAGES = ("extract", "distill", "train_mil", "etc", "evaluate")
# The params.yaml sections that are pipeline parameters (`seed` too, as an int).
SECTIONS = (
    "dataset",
    "patch",
    "teacher",
    "student",
    "extract",
    "distill",
    "train_mil",
    "ib",
    "mil",
    "evaluate",
    "export",
)


def _on_gpu(task: dsl.PipelineTask, node_selector: Mapping[str, str]) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_ACCELERATOR).set_accelerator_limit(1)
    kubernetes.add_toleration(task, key=GPU_ACCELERATOR, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    for key, value in sorted(node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task


def build_pipeline(
    image: str = IMAGE, gpu_node_selector: Mapping[str, str] | None = None
) -> graph_component.GraphComponent:
    """The pipeline, every component running `image`, GPU stages on `gpu_node_selector` nodes.

    The graph is traced when it is built, so the image is set on each task here (components keep
    the `IMAGE` they were declared with).
    """
    selector = dict(gpu_node_selector or {})

    def run(task: dsl.PipelineTask, *, gpu: bool = False) -> dsl.PipelineTask:
        task.set_container_image(image)
        return _on_gpu(task, selector) if gpu else task

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def efcm_pipeline(
        manifest_uri: str,
        seed: int,
        dataset: dict,
        patch: dict,
        teacher: dict,
        student: dict,
        extract: dict,
        distill: dict,
        train_mil: dict,
        ib: dict,
        mil: dict,
        evaluate: dict,
        export: dict,
        namespace: str = "efcm",
        serving_image: str = SERVING_IMAGE,
        serving_service_account: str = "efcm-serving",
        serve_on_gpu: bool = False,
        dry_run: bool = True,
    ):
        manifest_task = run(c.load_manifest(manifest_uri=manifest_uri, dataset=dataset))
        manifest_task.set_caching_options(False)
        manifest = manifest_task.outputs["manifest"]

        patches = run(c.patch(manifest=manifest, dataset=dataset, patch=patch)).outputs["patches"]

        extract_teacher = c.extract(
            manifest=manifest,
            patches=patches,
            dataset=dataset,
            teacher=teacher,
            extract=extract,
            encoder="teacher",
        )
        teacher_features = run(
            extract_teacher.set_display_name("extract-teacher"), gpu=True
        ).outputs["features"]

        distill_task = c.distill(
            manifest=manifest,
            patches=patches,
            teacher_features=teacher_features,
            seed=seed,
            dataset=dataset,
            student=student,
            distill=distill,
        )
        student_model = run(distill_task, gpu=True).outputs["student_model"]

        extract_student = c.extract(
            manifest=manifest,
            patches=patches,
            dataset=dataset,
            teacher=teacher,
            extract=extract,
            encoder="student",
            student_model=student_model,
        )
        student_features = run(
            extract_student.set_display_name("extract-student"), gpu=True
        ).outputs["features"]

        splits_task = c.splits(
            manifest=manifest,
            features=teacher_features,
            seed=seed,
            dataset=dataset,
            train_mil=train_mil,
        )
        folds = run(splits_task).outputs["splits"]

        mil_outputs = {}
        for name, features in (("teacher", teacher_features), ("student", student_features)):
            task = c.train_mil(
                manifest=manifest,
                features=features,
                splits=folds,
                seed=seed,
                dataset=dataset,
                train_mil=train_mil,
            )
            task.set_display_name(f"train-mil-{name}")
            mil_outputs[name] = run(task, gpu=True).outputs["mil"]

        reuse_task = c.reuse(
            manifest=manifest,
            teacher_mil=mil_outputs["teacher"],
            student_features=student_features,
            splits=folds,
            seed=seed,
            dataset=dataset,
            distill=distill,
            mil=mil,
        )
        reused = run(reuse_task).outputs["strategy"]

        etc_task = c.etc(
            manifest=manifest,
            patches=patches,
            teacher_features=teacher_features,
            student_model=student_model,
            splits=folds,
            seed=seed,
            dataset=dataset,
            distill=distill,
            train_mil=train_mil,
            ib=ib,
            mil=mil,
            extract=extract,
        )
        end2end = run(etc_task, gpu=True).outputs["strategy"]

        evaluate_task = c.evaluate(
            teacher_mil=mil_outputs["teacher"],
            reuse_mil=reused,
            retrain_mil=mil_outputs["student"],
            etc_mil=end2end,
            student_model=student_model,
            seed=seed,
            dataset=dataset,
            teacher=teacher,
            distill=distill,
            mil=mil,
            extract=extract,
            evaluate=evaluate,
        )
        evaluation = run(evaluate_task, gpu=True).outputs["evaluation"]

        export_task = c.export(
            student_model=student_model,
            student_mil=mil_outputs["student"],
            evaluation=evaluation,
            dataset=dataset,
            patch=patch,
            teacher=teacher,
            distill=distill,
            export=export,
        )
        package = run(export_task).outputs["package"]

        deploy_task = c.deploy(
            package=package,
            export=export,
            namespace=namespace,
            serving_image=serving_image,
            service_account=serving_service_account,
            gpu=serve_on_gpu,
            dry_run=dry_run,
        )
        run(deploy_task).set_caching_options(False)

    return efcm_pipeline


efcm_pipeline = build_pipeline()

"""The EFCM Kubeflow pipeline: the stages of dvc.yaml, one component each, wired by artifacts.

    resolve_version -> resolve_dataset -> plan_shards
      -> ParallelFor shard: patch -> extract (teacher)          (`shard_size` slides per shard)
      -> gather (patches), gather (teacher features)            (dsl.Collected)
      -> distill -> extract (student) -> splits -> train_mil (teacher)
      -> plan_strategies -> ParallelFor strategy: one task per strategy the run compares
         (efcm.registry; `mil.strategies: auto` resolved against `distill.method`)
      -> evaluate (dsl.Collected strategies) -> export (export.strategy's fold models)
      -> gate (reads the package) -> report, [if promoted] deploy

Data: `repo_url` + `revision` + `manifest_path` name a DVC-tracked manifest in a git repository
(the slides are read from the DVC gs:// remote by URI, never copied); with `repo_url` empty,
`manifest_path` is a plain manifest (local path or gs:// URI). Parameters: `seed` and one `dict` per
params.yaml section the stages need, and the `pipeline` section's `shard_size`,
`gpu_accelerator_type` and `gpu_node_selector`; `pipelines/compile.py` sets their defaults from
params.yaml, so the Kubeflow UI shows them and a run can override them. The shards' parallelism is
fixed at compile time (KFP writes it into the compiled pipeline): `pipeline.parallelism`, or
`compile.py --parallelism`.

Scheduling (kfp-kubernetes): the GPU stages (extract, distill, train_mil, strategy, and evaluate,
which measures teacher vs student patches/s on the device that extracts) get one accelerator of
`gpu_accelerator_type`, the `gpu_node_selector` labels, a toleration of the `nvidia.com/gpu` taint,
a memory-backed /dev/shm for DataLoader workers, and CPU/memory requests and a timeout from
`RESOURCES`; the CPU stages get requests and a timeout and no GPU. The stages that read slides or
the dataset from GCS retry. Every step is cached except resolve_version (it must see where a branch
points now) and deploy (it acts on the cluster).
"""

from collections.abc import Mapping
from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import graph_component

import components as c
from components.image import IMAGE, SERVING_IMAGE
from efcm import registry
from efcm.config import PipelineParams
from pipelines.kfp_shim import declare_channel_input

PIPELINE_NAME = "efcm"
GPU_TAINT = "nvidia.com/gpu"
# params.yaml sections that are `dict` pipeline parameters (`seed` is an int parameter).
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
    "deploy",
)
# pipeline.* keys that are pipeline parameters of their own (`parallelism` is compile-time).
PIPELINE_KEYS = ("shard_size", "gpu_accelerator_type", "gpu_node_selector")


@dataclass(frozen=True)
class Res:
    """CPU / memory requests and a timeout (the pod's active deadline) of a stage."""

    cpu: str
    memory: str
    hours: float
    gpu: bool = False
    retry: bool = False

    @property
    def timeout_s(self) -> int:
        return int(self.hours * 3600)


# Requests that fit an 8-vCPU / 32 GB GPU node (e.g. GKE g2-standard-8 with one L4) after the
# system reservations; `retry`: reads slides or the dataset from GCS (transient errors happen).
RESOURCES: dict[str, Res] = {
    "resolve-version": Res("500m", "1Gi", 0.5, retry=True),
    "resolve-dataset": Res("1", "2Gi", 2, retry=True),
    "plan-shards": Res("500m", "1Gi", 0.5),
    "patch": Res("4", "8Gi", 12, retry=True),
    "extract": Res("6", "24Gi", 24, gpu=True, retry=True),
    "gather": Res("1", "4Gi", 6),
    "distill": Res("6", "24Gi", 48, gpu=True),
    "splits": Res("500m", "1Gi", 0.5),
    "train-mil": Res("4", "16Gi", 12, gpu=True),
    "plan-strategies": Res("500m", "1Gi", 0.5),
    # one task spec serves every strategy of the ParallelFor: sized for the largest (ETC reads
    # slides from GCS, fine-tunes the student and re-extracts every patch)
    "strategy": Res(
        "6", "24Gi", 48, gpu=any(s.gpu for s in registry.STRATEGIES.values()), retry=True
    ),
    "evaluate": Res("4", "16Gi", 6, gpu=True),
    "report": Res("1", "4Gi", 2),
    "gate": Res("500m", "1Gi", 0.5),
    "export": Res("1", "4Gi", 1),
    "deploy": Res("500m", "1Gi", 1),
}
GPU_STAGES = tuple(name for name, r in RESOURCES.items() if r.gpu)


def build_pipeline(
    image: str = IMAGE, parallelism: int = PipelineParams().parallelism
) -> graph_component.GraphComponent:
    """The pipeline, every component running `image`, `parallelism` shards at a time.

    The graph is traced when it is built, so the image is set on each task here (components keep
    the `IMAGE` they were declared with).
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, got {parallelism}")

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def efcm_pipeline(
        manifest_path: str,
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
        deploy: dict,
        shard_size: int,
        gpu_accelerator_type: str,
        gpu_node_selector: dict,
        repo_url: str = "",
        revision: str = "main",
        namespace: str = "efcm",
        serving_image: str = SERVING_IMAGE,
        serving_service_account: str = "efcm-serving",
        serve_on_gpu: bool = False,
        canary_traffic_percent: int = 100,
        ready_timeout_s: int = 600,
        slide_uri_prefixes: str = "",
        dry_run: bool = False,
    ):
        def run(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
            res = RESOURCES[stage]
            task.set_container_image(image)
            task.set_cpu_request(res.cpu).set_memory_request(res.memory)
            kubernetes.set_timeout(task, res.timeout_s)
            if res.retry:
                task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2)
            if res.gpu:
                task.set_accelerator_type(gpu_accelerator_type).set_accelerator_limit(1)
                # kfp leaves a parameter used only as the accelerator type out of the inputs
                # of a ParallelFor's sub-DAG: see the shim
                declare_channel_input(task, gpu_accelerator_type)
                kubernetes.add_node_selector_json(task, gpu_node_selector)
                kubernetes.add_toleration(
                    task, key=GPU_TAINT, operator="Exists", effect="NoSchedule"
                )
                kubernetes.empty_dir_mount(
                    task, volume_name="dshm", mount_path="/dev/shm", medium="Memory"
                )
            return task

        version = run(
            c.resolve_version(repo_url=repo_url, revision=revision, manifest_path=manifest_path),
            "resolve-version",
        ).set_caching_options(False)
        manifest = run(
            c.resolve_dataset(
                repo_url=repo_url,
                revision=revision,
                manifest_path=manifest_path,
                version=version.output,
                dataset=dataset,
            ),
            "resolve-dataset",
        ).outputs["manifest"]

        shards = run(c.plan_shards(manifest=manifest, shard_size=shard_size), "plan-shards")
        with dsl.ParallelFor(shards.output, parallelism=parallelism, name="shards") as shard:
            shard_patch = run(
                c.patch(
                    manifest=manifest,
                    dataset=dataset,
                    patch=patch,
                    shard=shard,
                    shard_size=shard_size,
                ),
                "patch",
            )
            shard_extract = run(
                c.extract(
                    manifest=manifest,
                    patches=shard_patch.outputs["patches"],
                    dataset=dataset,
                    teacher=teacher,
                    extract=extract,
                    encoder="teacher",
                    seed=seed,
                    shard=shard,
                    shard_size=shard_size,
                ).set_display_name("extract-teacher"),
                "extract",
            )
        patches = run(
            c.gather(
                shards=dsl.Collected(shard_patch.outputs["patches"]),
                stage="patch",
                dataset=dataset,
                patch=patch,
            ).set_display_name("gather-patches"),
            "gather",
        ).outputs["merged"]
        teacher_features = run(
            c.gather(
                shards=dsl.Collected(shard_extract.outputs["features"]),
                stage="extract",
                dataset=dataset,
                patch=patch,
            ).set_display_name("gather-teacher-features"),
            "gather",
        ).outputs["merged"]

        student_model = run(
            c.distill(
                manifest=manifest,
                patches=patches,
                teacher_features=teacher_features,
                seed=seed,
                dataset=dataset,
                student=student,
                distill=distill,
            ),
            "distill",
        ).outputs["student_model"]

        student_features = run(
            c.extract(
                manifest=manifest,
                patches=patches,
                dataset=dataset,
                teacher=teacher,
                extract=extract,
                encoder="student",
                seed=seed,
                student_model=student_model,
            ).set_display_name("extract-student"),
            "extract",
        ).outputs["features"]

        folds = run(
            c.splits(
                manifest=manifest,
                features=teacher_features,
                seed=seed,
                dataset=dataset,
                train_mil=train_mil,
            ),
            "splits",
        ).outputs["splits"]

        teacher_mil = run(
            c.train_mil(
                manifest=manifest,
                features=teacher_features,
                splits=folds,
                seed=seed,
                dataset=dataset,
                train_mil=train_mil,
            ).set_display_name("train-mil-teacher"),
            "train-mil",
        ).outputs["mil"]

        # one task per strategy this run compares (efcm.registry: `mil.strategies`, `auto`
        # resolved against `distill.method` at run time), each with every input: an entry reads
        # only those it names
        planned = run(c.plan_strategies(distill=distill, mil=mil), "plan-strategies")
        with dsl.ParallelFor(
            planned.output, parallelism=len(registry.STRATEGIES), name="strategies"
        ) as name:
            outcome = run(
                c.strategy(
                    name=name,
                    manifest=manifest,
                    splits=folds,
                    patches=patches,
                    teacher_features=teacher_features,
                    teacher_mil=teacher_mil,
                    student_model=student_model,
                    student_features=student_features,
                    seed=seed,
                    dataset=dataset,
                    distill=distill,
                    train_mil=train_mil,
                    ib=ib,
                    mil=mil,
                    extract=extract,
                ),
                "strategy",
            )

        def strategies() -> dsl.Collected:  # one per consumer: kfp 2.17 cannot share one
            return dsl.Collected(outcome.outputs["strategy"])

        evaluation = run(
            c.evaluate(
                manifest=manifest,
                teacher_mil=teacher_mil,
                strategies=strategies(),
                student_model=student_model,
                seed=seed,
                dataset=dataset,
                teacher=teacher,
                distill=distill,
                mil=mil,
                extract=extract,
                evaluate=evaluate,
            ),
            "evaluate",
        ).outputs["evaluation"]

        package = run(
            c.export(
                student_model=student_model,
                strategies=strategies(),
                evaluation=evaluation,
                patches=patches,
                dataset=dataset,
                patch=patch,
                teacher=teacher,
                distill=distill,
                mil=mil,
                export=export,
            ),
            "export",
        ).outputs["package"]

        promote = run(c.gate(package=package, deploy=deploy), "gate")
        run(
            c.report(
                patches=patches,
                strategies=strategies(),
                package=package,
                evaluation=evaluation,
                verdict=promote.outputs["verdict"],
                dataset=dataset,
            ),
            "report",
        )
        with dsl.If(promote.outputs["Output"] == True, name="promoted"):  # noqa: E712
            run(
                c.deploy(
                    package=package,
                    export=export,
                    namespace=namespace,
                    serving_image=serving_image,
                    service_account=serving_service_account,
                    gpu=serve_on_gpu,
                    dry_run=dry_run,
                    canary_traffic_percent=canary_traffic_percent,
                    ready_timeout_s=ready_timeout_s,
                    slide_uri_prefixes=slide_uri_prefixes,
                    gpu_node_selector=gpu_node_selector,
                ),
                "deploy",
            ).set_caching_options(False)

    return efcm_pipeline


def pipeline_keys(section: Mapping) -> dict:
    """The `pipeline` section's keys that are pipeline parameters."""
    return {k: section[k] for k in PIPELINE_KEYS}


efcm_pipeline = build_pipeline()

"""The EFCM Kubeflow pipeline: the stages of dvc.yaml, one component each, wired by artifacts.

    resolve_version -> resolve_dataset -> plan_shards
      -> ParallelFor shard: patch -> extract (teacher)          (`shard_size` slides per shard)
      -> gather (patches), gather (teacher features)            (dsl.Collected)
      -> distill -> ParallelFor shard: extract (student) -> gather (student features)
      -> splits -> train_mil (teacher)
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

from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import graph_component

import components as c
from components.image import IMAGE, SERVING_CPU_IMAGE, SERVING_IMAGE
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
    "store",
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
    "distill": Res("6", "24Gi", 48, gpu=True),  # per GPU (pipeline.distill_gpus)
    # pipeline.distill_nodes > 1: a CPU step that submits the Kubeflow Trainer TrainJob and waits
    # past its 48 h deadline plus an hour of queueing
    "distill-job": Res("500m", "1Gi", 49.5),
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


@dataclass(frozen=True)
class _Inputs:
    """The pipeline's parameters: KFP channels while the graph is traced."""

    manifest_path: Any
    seed: Any
    dataset: Any
    patch: Any
    teacher: Any
    student: Any
    extract: Any
    store: Any
    distill: Any
    train_mil: Any
    ib: Any
    mil: Any
    evaluate: Any
    export: Any
    deploy: Any
    shard_size: Any
    gpu_accelerator_type: Any
    gpu_node_selector: Any
    repo_url: Any
    revision: Any
    namespace: Any
    serving_image: Any
    serving_cpu_image: Any
    serving_service_account: Any
    serve_on_gpu: Any
    canary_traffic_percent: Any
    ready_timeout_s: Any
    slide_uri_prefixes: Any
    dry_run: Any


@dataclass(frozen=True)
class _Schedule:
    """Puts a stage's task on its node: the image, `RESOURCES`, and on the GPU stages the
    accelerator, node selector, GPU toleration and a memory-backed /dev/shm."""

    image: str
    accelerator: Any  # the gpu_accelerator_type parameter
    node_selector: Any  # the gpu_node_selector parameter

    def __call__(self, task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
        res = RESOURCES[stage]
        task.set_container_image(self.image)
        task.set_cpu_request(res.cpu).set_memory_request(res.memory)
        kubernetes.set_timeout(task, res.timeout_s)
        if res.retry:
            task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2)
        if res.gpu:
            task.set_accelerator_type(self.accelerator).set_accelerator_limit(1)
            # kfp leaves a parameter used only as the accelerator type out of the inputs of a
            # ParallelFor's sub-DAG: see the shim
            declare_channel_input(task, self.accelerator)
            kubernetes.add_node_selector_json(task, self.node_selector)
            kubernetes.add_toleration(task, key=GPU_TAINT, operator="Exists", effect="NoSchedule")
            kubernetes.empty_dir_mount(
                task, volume_name="dshm", mount_path="/dev/shm", medium="Memory"
            )
        return task


@dataclass(frozen=True)
class _Data:
    """The artifacts the slide-level strategies, the evaluation and the report read."""

    manifest: Any
    patches: Any
    teacher_features: Any
    student_model: Any
    student_features: Any
    folds: Any
    teacher_mil: Any


def _manifest(run: _Schedule, p: _Inputs) -> Any:
    """resolve_version -> resolve_dataset: the run's manifest, its slide URIs resolved."""
    version = run(
        c.resolve_version(repo_url=p.repo_url, revision=p.revision, manifest_path=p.manifest_path),
        "resolve-version",
    ).set_caching_options(False)
    return run(
        c.resolve_dataset(
            repo_url=p.repo_url,
            revision=p.revision,
            manifest_path=p.manifest_path,
            version=version.output,
            dataset=p.dataset,
        ),
        "resolve-dataset",
    ).outputs["manifest"]


def _gather(run: _Schedule, p: _Inputs, shard_outputs: Any, stage: str, name: str) -> Any:
    """The shards' `stage` outputs merged into one folder (fail_on applied to the whole batch)."""
    return run(
        c.gather(
            shards=dsl.Collected(shard_outputs),
            stage=stage,
            dataset=p.dataset,
            patch=p.patch,
        ).set_display_name(name),
        "gather",
    ).outputs["merged"]


def _patch_and_extract_shards(
    run: _Schedule, p: _Inputs, manifest: Any, shards: Any, parallelism: int
) -> tuple[Any, Any]:
    """ParallelFor shard: patch -> extract (teacher) -> gather both: the patches and the teacher
    features of every slide (with `store.enabled`, and the patch-shard store)."""
    with dsl.ParallelFor(shards, parallelism=parallelism, name="shards") as shard:
        shard_patch = run(
            c.patch(
                manifest=manifest,
                dataset=p.dataset,
                patch=p.patch,
                shard=shard,
                shard_size=p.shard_size,
            ),
            "patch",
        )
        shard_extract = run(
            c.extract(
                manifest=manifest,
                patches=shard_patch.outputs["patches"],
                dataset=p.dataset,
                teacher=p.teacher,
                extract=p.extract,
                store=p.store,
                encoder="teacher",
                seed=p.seed,
                shard=shard,
                shard_size=p.shard_size,
            ).set_display_name("extract-teacher"),
            "extract",
        )
    patches = _gather(run, p, shard_patch.outputs["patches"], "patch", "gather-patches")
    teacher_features = _gather(
        run, p, shard_extract.outputs["features"], "extract", "gather-teacher-features"
    )
    return patches, teacher_features


@dataclass(frozen=True)
class Distill:
    """How distillation is scheduled (compile time: pipeline.distill_gpus, distill_nodes)."""

    gpus: int = 1
    nodes: int = 1


def _per_gpu(task: dsl.PipelineTask, stage: str, gpus: int) -> dsl.PipelineTask:
    """A pod of `gpus` GPUs (torchrun, one process per GPU): the accelerator limit, and the
    stage's CPU and memory requests (`RESOURCES`, per GPU) times `gpus`."""
    if gpus > 1:
        res = RESOURCES[stage]
        task.set_accelerator_limit(gpus)
        task.set_cpu_request(str(int(res.cpu) * gpus))
        task.set_memory_request(f"{int(res.memory[:-2]) * gpus}Gi")
    return task


def _distil_student(
    run: _Schedule,
    p: _Inputs,
    manifest: Any,
    patches: Any,
    teacher_features: Any,
    shards: Any,
    parallelism: int,
    distill: Distill,
) -> tuple[Any, Any]:
    """distill -> ParallelFor shard: extract (student) -> gather: the student model and its
    features of every slide, extracted over the same shards as the teacher's (with
    `store.enabled` read from the patch-shard store, not the slides). Distillation runs as
    `distill.gpus` DDP processes in one pod, or with `distill.nodes` > 1 as a Kubeflow Trainer
    TrainJob on that many nodes (a CPU step submits it and waits)."""
    inputs = dict(
        manifest=manifest,
        patches=patches,
        teacher_features=teacher_features,
        seed=p.seed,
        dataset=p.dataset,
        student=p.student,
        distill=p.distill,
        store=p.store,
    )
    if distill.nodes > 1:
        task = run(
            c.distill_job(
                **inputs,
                nodes=distill.nodes,
                gpus_per_node=distill.gpus,
                job_image=run.image,
                namespace=p.namespace,
                gpu_node_selector=p.gpu_node_selector,
            ),
            "distill-job",
        )
    else:
        task = run(c.distill(**inputs, gpus=distill.gpus), "distill")
        _per_gpu(task, "distill", distill.gpus)  # one pod, torchrun with one process per GPU
    student_model = task.outputs["student_model"]
    with dsl.ParallelFor(shards, parallelism=parallelism, name="student-shards") as shard:
        shard_extract = run(
            c.extract(
                manifest=manifest,
                patches=patches,
                dataset=p.dataset,
                teacher=p.teacher,
                extract=p.extract,
                store=p.store,
                encoder="student",
                seed=p.seed,
                student_model=student_model,
                teacher_features=teacher_features,
                shard=shard,
                shard_size=p.shard_size,
            ).set_display_name("extract-student"),
            "extract",
        )
    student_features = _gather(
        run, p, shard_extract.outputs["features"], "extract", "gather-student-features"
    )
    return student_model, student_features


def _train_teacher_mil(
    run: _Schedule, p: _Inputs, manifest: Any, teacher_features: Any
) -> tuple[Any, Any]:
    """splits -> train_mil (teacher): the patient-level folds and the teacher-feature CLAM."""
    folds = run(
        c.splits(
            manifest=manifest,
            features=teacher_features,
            seed=p.seed,
            dataset=p.dataset,
            train_mil=p.train_mil,
        ),
        "splits",
    ).outputs["splits"]
    teacher_mil = run(
        c.train_mil(
            manifest=manifest,
            features=teacher_features,
            splits=folds,
            seed=p.seed,
            dataset=p.dataset,
            train_mil=p.train_mil,
        ).set_display_name("train-mil-teacher"),
        "train-mil",
    ).outputs["mil"]
    return folds, teacher_mil


def _compare_strategies(run: _Schedule, p: _Inputs, data: _Data, etc_gpus: int) -> dsl.PipelineTask:
    """plan_strategies -> ParallelFor strategy: the task run once per strategy, each pod with
    `etc_gpus` GPUs (one task spec serves every strategy: ETC runs one process per GPU, Reuse and
    Retrain one process)."""
    # one task per strategy this run compares (efcm.registry: `mil.strategies`, `auto` resolved
    # against `distill.method` at run time), each with every input: an entry reads only those it
    # names
    planned = run(c.plan_strategies(distill=p.distill, mil=p.mil), "plan-strategies")
    with dsl.ParallelFor(
        planned.output, parallelism=len(registry.STRATEGIES), name="strategies"
    ) as name:
        return _per_gpu(
            run(
                c.strategy(
                    name=name,
                    manifest=data.manifest,
                    splits=data.folds,
                    patches=data.patches,
                    teacher_features=data.teacher_features,
                    teacher_mil=data.teacher_mil,
                    student_model=data.student_model,
                    student_features=data.student_features,
                    seed=p.seed,
                    dataset=p.dataset,
                    distill=p.distill,
                    train_mil=p.train_mil,
                    ib=p.ib,
                    mil=p.mil,
                    extract=p.extract,
                    store=p.store,
                    gpus=etc_gpus,
                ),
                "strategy",
            ),
            "strategy",
            etc_gpus,
        )


def _collected(outcome: dsl.PipelineTask) -> dsl.Collected:
    """The strategies' outputs, fanned in: one per consumer (kfp 2.17 cannot share one)."""
    return dsl.Collected(outcome.outputs["strategy"])


def _evaluate_and_export(
    run: _Schedule, p: _Inputs, data: _Data, outcome: dsl.PipelineTask
) -> tuple[Any, Any]:
    """evaluate -> export: the evaluation table and the deployable package."""
    evaluation = run(
        c.evaluate(
            manifest=data.manifest,
            teacher_mil=data.teacher_mil,
            strategies=_collected(outcome),
            student_model=data.student_model,
            seed=p.seed,
            dataset=p.dataset,
            teacher=p.teacher,
            distill=p.distill,
            mil=p.mil,
            extract=p.extract,
            evaluate=p.evaluate,
        ),
        "evaluate",
    ).outputs["evaluation"]
    package = run(
        c.export(
            student_model=data.student_model,
            strategies=_collected(outcome),
            evaluation=evaluation,
            patches=data.patches,
            manifest=data.manifest,
            teacher_features=data.teacher_features,
            dataset=p.dataset,
            patch=p.patch,
            teacher=p.teacher,
            distill=p.distill,
            mil=p.mil,
            export=p.export,
            store=p.store,
        ),
        "export",
    ).outputs["package"]
    return evaluation, package


def _gate_report_and_deploy(
    run: _Schedule,
    p: _Inputs,
    data: _Data,
    outcome: dsl.PipelineTask,
    evaluation: Any,
    package: Any,
) -> None:
    """gate -> report, and deploy when the gate promotes the package."""
    promote = run(c.gate(package=package, deploy=p.deploy), "gate")
    run(
        c.report(
            patches=data.patches,
            strategies=_collected(outcome),
            package=package,
            evaluation=evaluation,
            verdict=promote.outputs["verdict"],
            dataset=p.dataset,
        ),
        "report",
    )
    deploy_if_promoted(run, p, promote, package)


def deploy_if_promoted(run: _Schedule, p: Any, promote: dsl.PipelineTask, package: Any) -> None:
    """deploy, under the gate task `promote`'s condition: `package` served with KServe (`p`: the
    pipeline's parameters, those of `_Inputs` from `export` on; the image pipeline's too)."""
    with dsl.If(promote.outputs["Output"] == True, name="promoted"):  # noqa: E712
        run(
            c.deploy(
                package=package,
                export=p.export,
                namespace=p.namespace,
                serving_image=p.serving_image,
                serving_cpu_image=p.serving_cpu_image,
                service_account=p.serving_service_account,
                gpu=p.serve_on_gpu,
                dry_run=p.dry_run,
                canary_traffic_percent=p.canary_traffic_percent,
                ready_timeout_s=p.ready_timeout_s,
                slide_uri_prefixes=p.slide_uri_prefixes,
                gpu_node_selector=p.gpu_node_selector,
            ),
            "deploy",
        ).set_caching_options(False)


def build_pipeline(
    image: str = IMAGE,
    parallelism: int = PipelineParams().parallelism,
    *,
    distill_gpus: int = 1,
    distill_nodes: int = 1,
    etc_gpus: int = 1,
) -> graph_component.GraphComponent:
    """The pipeline, every component running `image`, `parallelism` shards at a time, the
    distillation on `distill_gpus` GPUs per node on `distill_nodes` nodes, each strategy pod with
    `etc_gpus` GPUs (ETC's processes).

    The graph is traced when it is built, so the image is set on each task here (components keep
    the `IMAGE` they were declared with).
    """
    for name, value in (
        ("parallelism", parallelism),
        ("distill_gpus", distill_gpus),
        ("distill_nodes", distill_nodes),
        ("etc_gpus", etc_gpus),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    how_distill = Distill(distill_gpus, distill_nodes)

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def efcm_pipeline(
        manifest_path: str,
        seed: int,
        dataset: dict,
        patch: dict,
        teacher: dict,
        student: dict,
        extract: dict,
        store: dict,
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
        serving_cpu_image: str = SERVING_CPU_IMAGE,
        serving_service_account: str = "efcm-serving",
        serve_on_gpu: bool = False,
        canary_traffic_percent: int = 100,
        ready_timeout_s: int = 600,
        slide_uri_prefixes: str = "",
        dry_run: bool = False,
    ):
        p = _Inputs(
            manifest_path=manifest_path,
            seed=seed,
            dataset=dataset,
            patch=patch,
            teacher=teacher,
            student=student,
            extract=extract,
            store=store,
            distill=distill,
            train_mil=train_mil,
            ib=ib,
            mil=mil,
            evaluate=evaluate,
            export=export,
            deploy=deploy,
            shard_size=shard_size,
            gpu_accelerator_type=gpu_accelerator_type,
            gpu_node_selector=gpu_node_selector,
            repo_url=repo_url,
            revision=revision,
            namespace=namespace,
            serving_image=serving_image,
            serving_cpu_image=serving_cpu_image,
            serving_service_account=serving_service_account,
            serve_on_gpu=serve_on_gpu,
            canary_traffic_percent=canary_traffic_percent,
            ready_timeout_s=ready_timeout_s,
            slide_uri_prefixes=slide_uri_prefixes,
            dry_run=dry_run,
        )
        run = _Schedule(image, gpu_accelerator_type, gpu_node_selector)
        manifest = _manifest(run, p)
        shards = run(
            c.plan_shards(manifest=manifest, shard_size=p.shard_size), "plan-shards"
        ).output
        patches, teacher_features = _patch_and_extract_shards(run, p, manifest, shards, parallelism)
        student_model, student_features = _distil_student(
            run, p, manifest, patches, teacher_features, shards, parallelism, how_distill
        )
        folds, teacher_mil = _train_teacher_mil(run, p, manifest, teacher_features)
        data = _Data(
            manifest, patches, teacher_features, student_model, student_features, folds, teacher_mil
        )
        outcome = _compare_strategies(run, p, data, etc_gpus)
        evaluation, package = _evaluate_and_export(run, p, data, outcome)
        _gate_report_and_deploy(run, p, data, outcome, evaluation, package)

    return efcm_pipeline


efcm_pipeline = build_pipeline()

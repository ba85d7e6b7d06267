"""distill_job: distil the student on several GPU nodes as a Kubeflow Trainer TrainJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill_job(
    manifest: Input[Dataset],
    patches: Input[Dataset],
    teacher_features: Input[Dataset],
    seed: int,
    dataset: dict,
    student: dict,
    distill: dict,
    store: dict,
    student_model: Output[Model],
    nodes: int = 2,
    gpus_per_node: int = 1,
    job_image: str = IMAGE,
    namespace: str = "efcm",
    service_account: str = "efcm-trainer",
    gpu_node_selector: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
    runtime: str = "torch-distributed",
    deadline_s: int = 172800,
    cache_gib: int = 50,
) -> str:
    """`student.pt` and the distillation `metrics.json` in `student_model`, as `distill` writes
    them, from a TrainJob of `nodes` x `gpus_per_node` GPUs running `efcm distill` under
    torchrun in `job_image`; returns the TrainJob's name.

    This step's pod only submits and waits (no GPU): the job's pods read the input artifacts and
    write their outputs by gs:// URI, so the pipeline root must be on GCS. The job runs in
    `namespace` as `service_account` on the `runtime` ClusterTrainingRuntime, on nodes with the
    `gpu_node_selector` labels (empty: the default GPU nodes); it is failed by the Trainer after
    `deadline_s`. Each node stages the inputs onto a volume of `cache_gib` GiB.
    """
    from efcm import config
    from efcm.deploy.training_run import in_cluster_api, run_distill_job

    params = config.params_for_stage(
        "distill",
        {
            "seed": seed,
            "dataset": dataset,
            "student": student,
            "distill": distill,
            "store": store,
        },
    )
    return run_distill_job(
        in_cluster_api,
        params,
        output_uri=student_model.uri,
        output_dir=student_model.path,
        manifest=manifest.uri,
        patches=patches.uri,
        teacher_features=teacher_features.uri,
        image=job_image,
        namespace=namespace,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        deadline_s=deadline_s,
        service_account=service_account,
        node_selector=gpu_node_selector or None,
        runtime=runtime,
        cache_gib=cache_gib,
    )

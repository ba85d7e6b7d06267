"""deploy: render the KServe InferenceService for the package; create or patch it unless dry_run."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(
    package: Input[Model],
    export: dict,
    namespace: str,
    serving_image: str,
    serving_cpu_image: str,
    service_account: str,
    gpu: bool,
    dry_run: bool,
    inference_service: Output[Artifact],
    canary_traffic_percent: int = 100,
    ready_timeout_s: int = 600,
    slide_uri_prefixes: str = "",
    gpu_node_selector: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
) -> str:
    """Serve the package with KServe; returns the InferenceService URL ("" on a dry run).

    The model and InferenceService name is `export.model_name`; the package is served from its
    artifact URI (the pipeline root must be on storage KServe downloads from, e.g. gs://). Not
    `dry_run`: creates the service, or patches it with `canary_traffic_percent` of the traffic
    for the new package, and waits up to `ready_timeout_s` for it to be Ready (the step fails
    past that). `inference_service` gets the YAML of the object applied (or only rendered).
    With `gpu`, the service runs `serving_image` (torch on the GPU); without, `serving_cpu_image`
    with the package's INT8 runtime (`efcm.deploy.render.serving_variant`).
    """
    import kserve

    from efcm import config
    from efcm.deploy.render import serving_variant
    from efcm.deploy.rollout import deploy as run

    params = config.params_for_stage("deploy", {"export": export})
    image, runtime = serving_variant(gpu, serving_image, serving_cpu_image)
    return run(
        package.uri,
        inference_service.path,
        params.export.model_name,
        namespace=namespace,
        image=image,
        runtime=runtime,
        gpu=gpu,
        dry_run=dry_run,
        client_factory=kserve.KServeClient,
        canary_traffic_percent=canary_traffic_percent,
        ready_timeout_s=ready_timeout_s,
        service_account=service_account,
        slide_uri_prefixes=slide_uri_prefixes,
        node_selector=gpu_node_selector or None,
    )

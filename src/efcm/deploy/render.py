"""The `serving.kserve.io/v1beta1` InferenceService that serves an exported model package.

`inference_service` renders it as a plain dict: a custom predictor container named
`kserve-container` running `efcm serve /mnt/models`, with the package URI in its `STORAGE_URI` env
var (KServe's storage initializer downloads it to /mnt/models before the server starts). The same
renderer makes the pipeline's deploy step (`efcm.deploy.rollout`), the static manifests
(`pipelines/render_manifests.py` writes manifests/base and the GPU/CPU overlays from it) and the
tests' objects, so they cannot drift. Each part of the object has its own function below, and
`inference_service` puts them together in the order the committed manifests have.

What it renders, and why:

- Deployment mode **Standard** (KServe >= 0.16's name for RawDeployment: a Deployment, a Service
  and an HPA), set explicitly with the `serving.kserve.io/deploymentMode` annotation so the result
  does not depend on the cluster's default. A slide classifier on a GPU gains little from Knative's
  scale-to-zero (every cold start stages the package and loads the model), and Standard needs
  neither Knative nor Istio. `Knative` stays available (`deployment_mode`).
- Probes on kserve's Open Inference Protocol routes: readiness `/v2/health/ready`, liveness
  `/v2/health/live`, and a startup probe on the latter that gives the model 5 minutes to load
  before liveness counts. Only the REST port (8080) is declared (Knative accepts one port); the
  gRPC server listens on 8081 in the pod.
- Autoscaling between `min_replicas` and `max_replicas`: Standard mode's HPA on CPU utilisation
  (70 %; a plain HPA offers only cpu and memory), Knative's on concurrent requests (2 per pod:
  one slide request keeps a GPU busy).
- The serving policy as env vars, named by `efcm.limits` (which the server reads back with
  `ServingLimits.from_env`, and `SlideAccessPolicy.from_env` for the prefixes): the allowed slide
  URI prefixes (empty: slide input is off, features requests are always served), the request,
  patch, slide-size and time limits, and the slide cache directory and its cap.
- `securityContext`: non-root (the images' uid 10001), no privilege escalation, every capability
  dropped, RuntimeDefault seccomp, and a read-only root filesystem. What the server must write
  goes to two emptyDir volumes: the slide cache (`EFCM_CACHE_DIR`, sized for the cache cap plus
  one slide being staged per slide worker) and /tmp.
- `gpu=True`: one `nvidia.com/gpu` (request and limit), a node selector for GPU nodes and a
  toleration of the `nvidia.com/gpu` taint.
- `runtime`: the model runtime `efcm serve` runs the package with, as `EFCM_RUNTIME` (unset: the
  server's own choice). The CPU deployment sets `int8` (`CPU_RUNTIME`, the package's INT8 ONNX
  student) on the torch-free image (docker/Dockerfile, target `serving-cpu`), which sets the same
  default itself.
- A Standard-mode canary (`canary_spec`, used by the rollout) is the predictor under the name
  `canary` with fixed replicas: KServe allows no autoscaling on a canary.

This module imports neither kserve nor the server: rendering needs no cluster and no SDK.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from efcm.config import PipelineParams
from efcm.limits import (
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
    RUNTIME_CHOICES,
    RUNTIME_ENV,
    SLIDE_URI_PREFIXES_ENV,
    ServingLimits,
    parse_slide_uri_prefixes,
)

API_VERSION = "serving.kserve.io/v1beta1"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
DEPLOYMENT_MODES = ("Standard", "Knative", "RawDeployment", "Serverless")  # last two: legacy
_KNATIVE_MODES = ("Knative", "Serverless")
CONTAINER_NAME = "kserve-container"  # the container KServe's storage initializer serves
CANARY_NAME = "canary"  # the predictor name of the Standard-mode canary
MODEL_DIR = "/mnt/models"
STORAGE_URI_ENV = "STORAGE_URI"  # KServe's storage initializer downloads it to MODEL_DIR
HTTP_PORT, GRPC_PORT = 8080, 8081
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"
GPU_RESOURCE = "nvidia.com/gpu"
# GKE labels its GPU nodes with the accelerator type (the project runs on GKE: see manifests/);
# elsewhere pass e.g. {"nvidia.com/gpu.present": "true"} (NVIDIA's GPU feature discovery). The
# default is params.yaml's `pipeline.gpu_node_selector` default: the pipeline's GPU stages'.
DEFAULT_GPU_NODE_SELECTOR: Mapping[str, str] = PipelineParams().gpu_node_selector
RUN_AS_USER = 10001  # the unprivileged user of the images (docker/)
CACHE_VOLUME, CACHE_MOUNT = "efcm-cache", "/var/cache/efcm"
TMP_VOLUME, TMP_MOUNT, TMP_SIZE = "tmp", "/tmp", "1Gi"
# (scaleMetric, scaleTarget) by deployment mode: see the module docstring.
DEFAULT_SCALING = {"Standard": ("cpu", 70), "Knative": ("concurrency", 2)}
# Predictor fields KServe refuses on a Standard-mode canary (a canary has fixed replicas).
_CANARY_DROPPED = ("maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget", "autoScaling")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GiB = 1 << 30
CPU_RUNTIME = "int8"  # what the torch-free serving-cpu image (and the CPU overlay) runs


def serving_variant(gpu: bool, gpu_image: str, cpu_image: str) -> tuple[str, str | None]:
    """The image and runtime of a deployment (the deploy step and the overlays): on a GPU node
    the CUDA image, whose server picks torch itself; on a CPU node the torch-free `serving-cpu`
    image with the package's INT8 runtime (`CPU_RUNTIME`)."""
    return (gpu_image, None) if gpu else (cpu_image, CPU_RUNTIME)


# -- arguments ------------------------------------------------------------------------------------


def check_image_tag(image: str, what: str = "image") -> str:
    """`image` when it names an explicit tag other than `:latest` (a digest also pins it);
    raises ValueError naming `what` otherwise."""
    last = image.rsplit("/", 1)[-1] if image else ""
    if not image or image.endswith(":latest") or (":" not in last and "@" not in last):
        raise ValueError(f"{what} {image!r} must carry an explicit tag other than :latest")
    return image


def serving_mode(deployment_mode: str) -> str:
    """`Standard` or `Knative`: what a deployment mode, legacy names included, means."""
    return "Knative" if deployment_mode in _KNATIVE_MODES else "Standard"


def _check_arguments(
    name: str,
    namespace: str,
    storage_uri: str,
    image: str,
    deployment_mode: str,
    min_replicas: int,
    max_replicas: int,
    runtime: str | None,
) -> None:
    """Raise ValueError naming the first argument of `inference_service` Kubernetes, KServe or
    `efcm serve` would refuse."""
    if not _DNS1035.match(name) or len(name) > 45:
        raise ValueError(
            f"InferenceService name {name!r} must be a DNS-1035 label (lower-case letters, digits "
            "and '-', starting with a letter) of at most 45 characters"
        )
    if not _DNS1123.match(namespace) or len(namespace) > 63:
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    if deployment_mode not in DEPLOYMENT_MODES:
        raise ValueError(
            f"deployment_mode must be one of {DEPLOYMENT_MODES}, got {deployment_mode!r}"
        )
    if not storage_uri:
        raise ValueError("storage_uri is empty: nothing to serve")
    check_image_tag(image, "serving image")
    if runtime is not None and runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {RUNTIME_CHOICES} or None, got {runtime!r}")
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(
            f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1; "
            f"got {min_replicas}, {max_replicas}"
        )


# -- the environment ------------------------------------------------------------------------------


def serving_env(limits: ServingLimits, slide_uri_prefixes: str = "") -> dict[str, str]:
    """The serving policy as the env vars `efcm serve` reads (names from `efcm.limits`).

    Args:
        limits: the per-request limits and the slide cache cap (`ServingLimits.to_env`).
        slide_uri_prefixes: comma-separated gs:// prefixes (or local directories) that slide
            requests may name; empty turns slide input off.

    Raises:
        ValueError: a prefix the server would refuse (another scheme, a gs:// URI with no bucket).
    """
    parse_slide_uri_prefixes(slide_uri_prefixes.split(","))  # the server's own check, at deploy
    env = {SLIDE_URI_PREFIXES_ENV: slide_uri_prefixes, **limits.to_env()}
    # The cache directory is on the writable emptyDir (the root filesystem is read-only); it goes
    # next to the cache's cap, where the committed manifests have it.
    cap = env.pop(CACHE_MAX_BYTES_ENV)
    return {**env, CACHE_DIR_ENV: CACHE_MOUNT, CACHE_MAX_BYTES_ENV: cap}


def container_env(
    storage_uri: str,
    limits: ServingLimits,
    slide_uri_prefixes: str,
    extra: Mapping[str, str] | None,
    runtime: str | None = None,
) -> list[dict[str, str]]:
    """The server's env: the package (`STORAGE_URI`), the serving policy, the runtime
    (`RUNTIME_ENV`, when given), then `extra`.

    Raises:
        ValueError: `extra` names a variable the other arguments set, or a bad prefix.
    """
    variables = {STORAGE_URI_ENV: storage_uri, **serving_env(limits, slide_uri_prefixes)}
    if runtime is not None:
        variables[RUNTIME_ENV] = runtime
    clash = sorted(set(extra or {}) & set(variables))
    if clash:
        raise ValueError(f"env must not set {clash}: they come from the other arguments")
    variables.update(extra or {})
    return [{"name": k, "value": v} for k, v in variables.items()]


# -- the predictor container ----------------------------------------------------------------------


def serve_args(model_name: str) -> list[str]:
    """The arguments of `efcm serve` (the container's command) for the package in MODEL_DIR."""
    return [
        "serve",
        MODEL_DIR,
        "--http-port",
        str(HTTP_PORT),
        "--grpc-port",
        str(GRPC_PORT),
        "--model-name",
        model_name,
    ]


def health_probes() -> dict[str, Any]:
    """Startup (5 minutes to load the model), readiness and liveness on kserve's v2 routes."""
    return {
        "startupProbe": {
            "httpGet": {"path": LIVE_PATH, "port": HTTP_PORT},
            "periodSeconds": 10,
            "failureThreshold": 30,
        },
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": HTTP_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": LIVE_PATH, "port": HTTP_PORT},
            "periodSeconds": 30,
            "timeoutSeconds": 5,
            "failureThreshold": 5,
        },
    }


def container_resources(cpu: str, memory: str, gpu: bool) -> dict[str, Any]:
    """CPU and memory requests, memory as the limit too, and one GPU (request = limit) if `gpu`."""
    resources: dict[str, Any] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"memory": memory},
    }
    if gpu:
        resources["requests"][GPU_RESOURCE] = "1"
        resources["limits"][GPU_RESOURCE] = "1"
    return resources


def writable_mounts() -> list[dict[str, str]]:
    """Where the server may write: the slide cache and /tmp (the root filesystem is read-only)."""
    return [
        {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
        {"name": TMP_VOLUME, "mountPath": TMP_MOUNT},
    ]


def security_context() -> dict[str, Any]:
    """Non-root (the images' user), no privilege escalation, no capability, read-only root."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def predictor_container(
    model_name: str,
    image: str,
    env: list[dict[str, str]],
    resources: dict[str, Any],
) -> dict[str, Any]:
    """The `kserve-container` running `efcm serve` on the downloaded package."""
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "command": ["efcm"],
        "args": serve_args(model_name),
        "env": env,
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        **health_probes(),
        "resources": resources,
        "volumeMounts": writable_mounts(),
        "securityContext": security_context(),
    }


# -- the predictor --------------------------------------------------------------------------------


def cache_volume_gib(limits: ServingLimits) -> int:
    """GiB of the slide cache's emptyDir: the capped cache plus a slide staged by each slide
    worker at once (staging makes room before it downloads, but a slide in use is never
    evicted); past it the kubelet evicts the pod."""
    staging = limits.max_concurrent_slides * limits.max_slide_bytes
    return math.ceil((limits.cache_max_bytes + staging) / _GiB)


def pod_volumes(limits: ServingLimits) -> list[dict[str, Any]]:
    """The emptyDir volumes behind `writable_mounts`, with size limits."""
    return [
        {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": f"{cache_volume_gib(limits)}Gi"}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]


def scaling(
    deployment_mode: str, min_replicas: int, max_replicas: int, scale_target: int | None
) -> dict[str, Any]:
    """The autoscaling fields of the predictor: the metric the mode's autoscaler offers and its
    target (`DEFAULT_SCALING` unless `scale_target` is given)."""
    metric, default_target = DEFAULT_SCALING[serving_mode(deployment_mode)]
    return {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "scaleMetric": metric,
        "scaleTarget": default_target if scale_target is None else scale_target,
    }


def gpu_placement(node_selector: Mapping[str, str] | None) -> dict[str, Any]:
    """Schedule on GPU nodes (`DEFAULT_GPU_NODE_SELECTOR` unless given) tolerating their taint."""
    selector = DEFAULT_GPU_NODE_SELECTOR if node_selector is None else node_selector
    return {
        "nodeSelector": dict(selector),
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }


def canary_spec(predictor: Mapping[str, Any], traffic_percent: int) -> dict[str, Any]:
    """A Standard-mode `spec.canary` entry (KServe >= 0.20): `predictor` named `canary`, without
    the autoscaling fields KServe refuses on a canary, taking `traffic_percent` of the traffic."""
    fixed = {k: v for k, v in predictor.items() if k not in _CANARY_DROPPED}
    return {"trafficPercent": traffic_percent, "predictor": {"name": CANARY_NAME, **fixed}}


def service_metadata(name: str, namespace: str, deployment_mode: str) -> dict[str, Any]:
    """Name, namespace, the app labels and the explicit deployment mode annotation."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": "efcm",
            "app.kubernetes.io/component": "predictor",
        },
        "annotations": {DEPLOYMENT_MODE_ANNOTATION: deployment_mode},
    }


def inference_service(
    name: str,
    namespace: str,
    storage_uri: str,
    image: str,
    *,
    gpu: bool,
    deployment_mode: str = "Standard",
    service_account: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    slide_uri_prefixes: str = "",
    limits: ServingLimits | None = None,
    env: Mapping[str, str] | None = None,
    cpu: str = "2",
    memory: str = "8Gi",
    min_replicas: int = 1,
    max_replicas: int = 3,
    scale_target: int | None = None,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Render the InferenceService serving the package at `storage_uri` as model `name`.

    Args:
        name: InferenceService and model name (a DNS-1035 label: the v2 route is
            `/v2/models/<name>/infer`).
        namespace: Kubernetes namespace.
        storage_uri: the exported package (gs://, s3://, pvc://...), given to the container as
            `STORAGE_URI` and downloaded by KServe to /mnt/models.
        image: the serving image (docker/Dockerfile, target `serving`, or `serving-cpu` for the
            torch-free CPU runtimes), with an explicit tag.
        gpu: request one `nvidia.com/gpu` and schedule on GPU nodes.
        deployment_mode: `Standard` (default, see the module docstring) or `Knative`.
        service_account: the predictor's service account (one that may read the package bucket,
            e.g. through GKE Workload Identity); None or "" uses the namespace default.
        node_selector: node labels for the GPU case; default `DEFAULT_GPU_NODE_SELECTOR`.
        slide_uri_prefixes: where slide requests may read from (see `serving_env`).
        limits: the serving limits; default `ServingLimits()` (the server's own defaults).
        env: more environment variables of the server; they may not replace the ones above.
        cpu, memory: requests (memory is also the limit).
        min_replicas, max_replicas: the autoscaling range.
        scale_target: the autoscaler's target (CPU % in Standard mode, concurrent requests per
            pod in Knative mode); default from `DEFAULT_SCALING`.
        runtime: the model runtime of `efcm serve` (one of `efcm.limits.RUNTIME_CHOICES`), set
            as `RUNTIME_ENV`; None leaves it to the server (and the image).

    Raises:
        ValueError: a bad name, namespace, mode, replica range, prefix, runtime, a clashing env
            var, or an empty URI or image.
    """
    _check_arguments(
        name, namespace, storage_uri, image, deployment_mode, min_replicas, max_replicas, runtime
    )
    limits = limits or ServingLimits()
    container = predictor_container(
        name,
        image,
        container_env(storage_uri, limits, slide_uri_prefixes, env, runtime),
        container_resources(cpu, memory, gpu),
    )
    predictor: dict[str, Any] = {
        **scaling(deployment_mode, min_replicas, max_replicas, scale_target),
        "containers": [container],
        "volumes": pod_volumes(limits),
    }
    if service_account:
        predictor["serviceAccountName"] = service_account
    if gpu:
        predictor.update(gpu_placement(node_selector))
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": service_metadata(name, namespace, deployment_mode),
        "spec": {"predictor": predictor},
    }

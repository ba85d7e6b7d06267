"""The KServe InferenceService that serves an exported model package, and its rollout.

`inference_service` renders a `serving.kserve.io/v1beta1` InferenceService as a plain dict: a
custom predictor container named `kserve-container` running `efcm serve /mnt/models`, with the
package URI in its `STORAGE_URI` env var (KServe's storage initializer downloads it to /mnt/models
before the server starts). The same renderer makes the pipeline's deploy step, the static
manifests (`pipelines/render_manifests.py` writes manifests/base and the GPU/CPU overlays from it)
and the tests' objects, so they cannot drift.

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
- The serving policy as env vars, named by `efcm.serving.policy` (which the server reads back with
  `ServingLimits.from_env` / `SlideAccessPolicy.from_env`): the allowed slide URI prefixes (empty:
  slide input is off, features requests are always served), the request, patch, slide-size and
  time limits, and the slide cache directory and its cap.
- `securityContext`: non-root (the images' uid 10001), no privilege escalation, every capability
  dropped, RuntimeDefault seccomp, and a read-only root filesystem. What the server must write
  goes to two emptyDir volumes: the slide cache (`EFCM_CACHE_DIR`, sized for the cache cap plus
  one slide being staged) and /tmp.
- `gpu=True`: one `nvidia.com/gpu` (request and limit), a node selector for GPU nodes and a
  toleration of the `nvidia.com/gpu` taint.

Rollout (`apply_inference_service`, with a `kserve.KServeClient`): `get` the service; absent
(404): `create` it; present: `patch` it (JSON merge patch, which is what the SDK sends) so that its
spec becomes exactly the target spec: keys the target lacks (a node selector from a former GPU
deployment, an old canary) are sent as null and so removed. `canary_traffic_percent` < 100 on an
existing service keeps the current predictor serving the rest of the traffic:

- Standard mode: the new predictor goes into `spec.canary` (KServe >= 0.20) as the canary named
  `canary`, with `trafficPercent` and fixed replicas (KServe allows no autoscaling on a canary);
  the stable predictor is left as it is. Deploying again at 100 makes the new predictor the stable
  one and removes the canary (a rolling update of the stable Deployment).
- Knative mode: the predictor is replaced and `canaryTrafficPercent` set; Knative routes the rest
  to the previous revision. At 100 the field is removed.

A new service has nothing to split traffic with, so it gets all of it whatever the percentage.
Then it waits (polling `get`, no watch: see manifests/base/rbac.yaml) until the service is Ready
for the generation just written, and returns its URL; after `ready_timeout_s` it raises
`TimeoutError`. The service account that does this needs exactly `get`, `create` and `patch` on
`inferenceservices` in the namespace.

This module never imports kserve itself (the client is handed in by the KFP deploy component);
the env var names come from `efcm.serving.policy`.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from efcm.config import PipelineParams
from efcm.limits import (
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
    MAX_CONCURRENT_SLIDES_ENV,
    MAX_PATCHES_ENV,
    MAX_REQUEST_BYTES_ENV,
    MAX_SLIDE_BYTES_ENV,
    REQUEST_TIMEOUT_ENV,
    SLIDE_URI_PREFIXES_ENV,
    ServingLimits,
)
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)

API_VERSION = "serving.kserve.io/v1beta1"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
DEPLOYMENT_MODES = ("Standard", "Knative", "RawDeployment", "Serverless")  # last two: legacy
_KNATIVE_MODES = ("Knative", "Serverless")
CONTAINER_NAME = "kserve-container"  # the container KServe's storage initializer serves
CANARY_NAME = "canary"  # the predictor name of the Standard-mode canary
MODEL_DIR = "/mnt/models"
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
# Schemes KServe's storage initializer downloads (a local path only makes sense for a dry run).
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://")
# Predictor fields KServe refuses on a Standard-mode canary (a canary has fixed replicas).
_CANARY_DROPPED = ("maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget", "autoScaling")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GiB = 1 << 30


def check_image_tag(image: str, what: str = "image") -> str:
    """`image` when it names an explicit tag other than `:latest` (a digest also pins it);
    raises ValueError naming `what` otherwise."""
    last = image.rsplit("/", 1)[-1] if image else ""
    if not image or image.endswith(":latest") or (":" not in last and "@" not in last):
        raise ValueError(f"{what} {image!r} must carry an explicit tag other than :latest")
    return image


def _mode(deployment_mode: str) -> str:
    return "Knative" if deployment_mode in _KNATIVE_MODES else "Standard"


def serving_env(limits: ServingLimits, slide_uri_prefixes: str = "") -> dict[str, str]:
    """The serving policy as the env vars `efcm serve` reads (`efcm.serving.policy`).

    Args:
        limits: the per-request limits and the slide cache cap.
        slide_uri_prefixes: comma-separated gs:// prefixes (or local directories) that slide
            requests may name; empty turns slide input off.

    Raises:
        ValueError: a prefix the server would refuse (another scheme, a gs:// URI with no bucket).
    """
    SlideAccessPolicy.of(slide_uri_prefixes.split(","))  # the server's own check, at deploy time
    timeout = limits.request_timeout_s
    return {
        SLIDE_URI_PREFIXES_ENV: slide_uri_prefixes,
        MAX_REQUEST_BYTES_ENV: str(limits.max_request_bytes),
        MAX_PATCHES_ENV: str(limits.max_patches),
        MAX_SLIDE_BYTES_ENV: str(limits.max_slide_bytes),
        MAX_CONCURRENT_SLIDES_ENV: str(limits.max_concurrent_slides),
        REQUEST_TIMEOUT_ENV: str(int(timeout)) if timeout == int(timeout) else str(timeout),
        CACHE_DIR_ENV: CACHE_MOUNT,  # on the writable emptyDir: the root filesystem is read-only
        CACHE_MAX_BYTES_ENV: str(limits.cache_max_bytes),
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
) -> dict[str, Any]:
    """Render the InferenceService serving the package at `storage_uri` as model `name`.

    Args:
        name: InferenceService and model name (a DNS-1035 label: the v2 route is
            `/v2/models/<name>/infer`).
        namespace: Kubernetes namespace.
        storage_uri: the exported package (gs://, s3://, pvc://...), given to the container as
            `STORAGE_URI` and downloaded by KServe to /mnt/models.
        image: the serving image (docker/Dockerfile.serving), with an explicit tag.
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

    Raises:
        ValueError: a bad name, namespace, mode, replica range, prefix, a clashing env var, or
            an empty URI or image.
    """
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
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(
            f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1; "
            f"got {min_replicas}, {max_replicas}"
        )
    limits = limits or ServingLimits()
    variables = {"STORAGE_URI": storage_uri, **serving_env(limits, slide_uri_prefixes)}
    clash = sorted(set(env or {}) & set(variables))
    if clash:
        raise ValueError(f"env must not set {clash}: they come from the other arguments")
    variables.update(env or {})
    metric, default_target = DEFAULT_SCALING[_mode(deployment_mode)]
    # Room for the capped cache plus a slide staged by each slide worker at once (staging makes
    # room before it downloads, but a slide in use is never evicted); past it the kubelet evicts
    # the pod.
    staging = limits.max_concurrent_slides * limits.max_slide_bytes
    cache_size = math.ceil((limits.cache_max_bytes + staging) / _GiB)

    resources: dict[str, Any] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"memory": memory},
    }
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": ["efcm"],
        "args": [
            "serve",
            MODEL_DIR,
            "--http-port",
            str(HTTP_PORT),
            "--grpc-port",
            str(GRPC_PORT),
            "--model-name",
            name,
        ],
        "env": [{"name": k, "value": v} for k, v in variables.items()],
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
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
        "resources": resources,
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
            {"name": TMP_VOLUME, "mountPath": TMP_MOUNT},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "scaleMetric": metric,
        "scaleTarget": default_target if scale_target is None else scale_target,
        "containers": [container],
        "volumes": [
            {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": f"{cache_size}Gi"}},
            {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}},
        ],
    }
    if service_account:
        predictor["serviceAccountName"] = service_account
    if gpu:
        resources["requests"][GPU_RESOURCE] = "1"
        resources["limits"][GPU_RESOURCE] = "1"
        predictor["nodeSelector"] = dict(
            DEFAULT_GPU_NODE_SELECTOR if node_selector is None else node_selector
        )
        predictor["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "efcm",
                "app.kubernetes.io/component": "predictor",
            },
            "annotations": {DEPLOYMENT_MODE_ANNOTATION: deployment_mode},
        },
        "spec": {"predictor": predictor},
    }


def rollout_target(
    desired: Mapping[str, Any],
    existing: Mapping[str, Any] | None,
    canary_traffic_percent: int = 100,
) -> dict[str, Any]:
    """The InferenceService to converge to: `desired`, or a canary of it next to `existing`.

    Args:
        desired: a rendered InferenceService (`inference_service`).
        existing: the one in the cluster (as `get` returns it), or None when there is none.
        canary_traffic_percent: the share of traffic for `desired` (0-100); below 100, and only
            when `existing` is given, the existing predictor keeps the rest (module docstring).

    Raises:
        ValueError: a percentage outside 0-100, or an existing service of another deployment
            mode (KServe cannot switch a service's mode in place).
    """
    if not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent must be in 0-100, got {canary_traffic_percent}")
    target = copy.deepcopy(dict(desired))
    if existing is None:
        if canary_traffic_percent < 100:
            log.warning("new InferenceService: no previous version to split traffic with")
        return target
    mode = target["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION]
    current = ((existing.get("metadata") or {}).get("annotations") or {}).get(
        DEPLOYMENT_MODE_ANNOTATION
    )
    if current is not None and _mode(current) != _mode(mode):
        name = target["metadata"]["name"]
        raise ValueError(
            f"InferenceService {name!r} runs in {current} mode, the new one asks for {mode}: "
            "KServe cannot change the mode of a service; delete it first or keep its mode"
        )
    if canary_traffic_percent == 100:
        return target
    if _mode(mode) == "Knative":
        target["spec"]["predictor"]["canaryTrafficPercent"] = canary_traffic_percent
        return target
    canary = {k: v for k, v in target["spec"]["predictor"].items() if k not in _CANARY_DROPPED}
    target["spec"] = {
        **copy.deepcopy(dict(existing["spec"])),
        "canary": [
            {
                "trafficPercent": canary_traffic_percent,
                "predictor": {"name": CANARY_NAME, **canary},
            }
        ],
    }
    return target


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: keys of `old` that `new`
    lacks are null (removed); lists are replaced whole."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        patch[k] = merge_patch(old[k], v) if k in old else copy.deepcopy(v)
    return patch


class _Body(dict):
    """The rendered dict, shaped like the kserve SDK's generated model where the SDK looks.

    `KServeClient.create/patch` read `.api_version` (and `.metadata.namespace` when no namespace is
    given), then hand the object to the Kubernetes client, which sends a dict as it is.
    """

    @property
    def api_version(self) -> str:
        return self["apiVersion"]

    @property
    def metadata(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(namespace=self["metadata"].get("namespace"))


def _status(err: BaseException) -> int | None:
    # KServeClient wraps the Kubernetes ApiException in a RuntimeError: the status is on the
    # exception itself or on its cause / context, or only in the message ("(404)").
    for e in (err, err.__cause__, err.__context__):
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status
    found = re.search(r"\((\d{3})\)", str(err))
    return int(found.group(1)) if found else None


def apply_inference_service(
    client: Any,
    isvc: Mapping[str, Any],
    *,
    canary_traffic_percent: int = 100,
    ready_timeout_s: int = 600,
) -> tuple[dict[str, Any], str]:
    """Create the InferenceService, or patch it when one of that name exists; then wait for it.

    Args:
        client: a `kserve.KServeClient` (anything with its `get`, `create`, `patch` and
            `wait_isvc_ready`).
        isvc: a rendered InferenceService (`inference_service`).
        canary_traffic_percent: see `rollout_target`.
        ready_timeout_s: wait up to this long for the written generation to be Ready (0: do not
            wait, the URL is then whatever the status already says).

    Returns:
        The object converged to (`rollout_target`), and the service's URL ("" if it has none yet).

    Raises:
        TimeoutError: not Ready within `ready_timeout_s`.
        RuntimeError: an API error (the SDK's), e.g. 403 when the service account lacks a verb.
        ValueError: see `rollout_target`.
    """
    if ready_timeout_s < 0:
        raise ValueError(f"ready_timeout_s must be >= 0, got {ready_timeout_s}")
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    try:
        existing = client.get(name, namespace=namespace)
    except RuntimeError as err:
        if _status(err) != 404:
            raise
        existing = None
    target = rollout_target(isvc, existing, canary_traffic_percent)
    if existing is None:
        log.info("creating InferenceService %s/%s", namespace, name)
        result = client.create(_Body(target), namespace=namespace)
    else:
        log.info(
            "patching InferenceService %s/%s (%d%% to the new predictor)",
            namespace,
            name,
            canary_traffic_percent,
        )
        body = {
            "apiVersion": target["apiVersion"],
            "kind": target["kind"],
            "metadata": {k: target["metadata"][k] for k in ("name", "namespace", "labels")},
            "spec": merge_patch(existing.get("spec") or {}, target["spec"]),
        }
        body["metadata"]["annotations"] = target["metadata"]["annotations"]
        result = client.patch(name, _Body(body), namespace=namespace)
    if ready_timeout_s > 0:
        generation = ((result or {}).get("metadata") or {}).get("generation")
        try:
            client.wait_isvc_ready(
                name,
                namespace=namespace,
                timeout_seconds=ready_timeout_s,
                polling_interval=max(1, min(10, ready_timeout_s // 10)),
                expected_generation=generation,
            )
        except RuntimeError as err:
            if "Timeout" not in str(err):
                raise
            raise TimeoutError(
                f"InferenceService {namespace}/{name} (generation {generation}) is not Ready "
                f"after {ready_timeout_s} s; `kubectl describe isvc -n {namespace} {name}` "
                "tells why"
            ) from err
        log.info("InferenceService %s/%s is ready", namespace, name)
    current = client.get(name, namespace=namespace) or {}
    return target, str((current.get("status") or {}).get("url") or "")


def deploy(
    storage_uri: str,
    out_path: str | Path,
    name: str,
    *,
    namespace: str,
    image: str,
    gpu: bool,
    dry_run: bool,
    client_factory: Callable[[], Any] | None = None,
    canary_traffic_percent: int = 100,
    ready_timeout_s: int = 600,
    **options: Any,
) -> str:
    """Render the InferenceService for a package, apply it unless `dry_run`, and write it as YAML.

    Args:
        storage_uri: where the exported package is (see `inference_service`).
        out_path: the YAML file to write: the object converged to (`rollout_target`), or on a
            dry run the rendered one.
        name, namespace, image, gpu, options: see `inference_service`.
        dry_run: only render and write; nothing is contacted.
        client_factory: makes the client for `apply_inference_service` (e.g. `kserve.KServeClient`,
            which reads the in-cluster or kubeconfig credentials); called only when not `dry_run`.
        canary_traffic_percent: see `rollout_target`.
        ready_timeout_s: how long to wait for the applied InferenceService to be Ready.

    Returns:
        The InferenceService's URL (`status.url`); "" on a dry run, where nothing was deployed
        and the URL, which the cluster's ingress domain decides, is not known.

    Raises:
        ValueError: bad values (see `inference_service`), or a URI KServe cannot download from
            when not `dry_run`.
        TimeoutError, RuntimeError: see `apply_inference_service`.
    """
    isvc = inference_service(name, namespace, storage_uri, image, gpu=gpu, **options)
    if not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent must be in 0-100, got {canary_traffic_percent}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if dry_run:
        out.write_text(yaml.safe_dump(isvc, sort_keys=False))
        log.info("dry run: rendered InferenceService %s/%s to %s", namespace, name, out)
        return ""
    if not storage_uri.startswith(STORAGE_SCHEMES):
        raise ValueError(
            f"KServe cannot download the package from {storage_uri!r}: use a pipeline root on "
            f"one of {', '.join(STORAGE_SCHEMES)}"
        )
    if client_factory is None:
        raise ValueError("deploy without dry_run needs a client_factory (e.g. kserve.KServeClient)")
    target, url = apply_inference_service(
        client_factory(),
        isvc,
        canary_traffic_percent=canary_traffic_percent,
        ready_timeout_s=ready_timeout_s,
    )
    out.write_text(yaml.safe_dump(target, sort_keys=False))
    return url

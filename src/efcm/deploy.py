"""The KServe InferenceService that serves an exported model package, and its create-or-patch.

`inference_service` renders a `serving.kserve.io/v1beta1` InferenceService as a plain dict: a
custom predictor container named `kserve-container` running `efcm serve /mnt/models`, with the
package URI in its `STORAGE_URI` env var (KServe's storage initializer downloads it to /mnt/models
before the server starts), a readiness probe on the Open Inference Protocol `/v2/health/ready`, and
GPU resources, node selector and toleration when asked for.

Deployment mode: **Standard** (KServe >= 0.16's name for the former RawDeployment: a plain
Deployment + Service + HPA), set explicitly with the `serving.kserve.io/deploymentMode` annotation,
so the result does not depend on the cluster's default. Chosen because a slide classifier on a GPU
gains little from Knative's scale-to-zero (every cold start stages the package and loads the model
onto the GPU), Standard needs neither Knative nor Istio, and KServe recommends it for GPU
predictors. `Knative` (formerly Serverless) remains available through `deployment_mode`; the legacy
names are accepted for older clusters. Only the REST port (8080) is declared on the container:
Knative accepts one port, and both modes route it; the gRPC server listens on 8081 inside the pod.

The container runs as a non-root user with no privileges (like manifests/inferenceservice.yaml), and
`EFCM_CACHE_DIR` points the slide cache at /tmp (the user has no writable home).

This module never imports kserve (only `efcm.serving` does): `apply_inference_service` works with a
`kserve.KServeClient` handed in by the caller (the KFP deploy component).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

API_VERSION = "serving.kserve.io/v1beta1"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
DEPLOYMENT_MODES = ("Standard", "Knative", "RawDeployment", "Serverless")  # last two: legacy
CONTAINER_NAME = "kserve-container"  # the container KServe's storage initializer serves
MODEL_DIR = "/mnt/models"
HTTP_PORT, GRPC_PORT = 8080, 8081
GPU_RESOURCE = "nvidia.com/gpu"
# GKE labels its GPU nodes with the accelerator type (the project runs on GKE: see manifests/);
# elsewhere pass e.g. {"nvidia.com/gpu.present": "true"} (NVIDIA's GPU feature discovery).
DEFAULT_GPU_NODE_SELECTOR: Mapping[str, str] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
RUN_AS_USER = 10001  # the unprivileged user of the images (docker/)
# Schemes KServe's storage initializer downloads (a local path only makes sense for a dry run).
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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
    env: Mapping[str, str] | None = None,
    cpu: str = "1",
    memory: str = "4Gi",
    min_replicas: int = 1,
    max_replicas: int = 1,
) -> dict[str, Any]:
    """Render the InferenceService serving the package at `storage_uri` as model `name`.

    Args:
        name: InferenceService and model name (a DNS-1035 label: the v2 route is
            `/v2/models/<name>/infer`).
        namespace: Kubernetes namespace.
        storage_uri: the exported package (gs://, s3://, pvc://...), given to the container as
            `STORAGE_URI` and downloaded by KServe to /mnt/models.
        image: the serving image; it must provide the `efcm` command with the [serve] extra.
        gpu: request one `nvidia.com/gpu` and schedule on GPU nodes.
        deployment_mode: `Standard` (default, see the module docstring) or `Knative`.
        service_account: the predictor's service account (e.g. bound to a GCP service account
            that can read the package bucket); None or "" uses the namespace default.
        node_selector: node labels for the GPU case; default `DEFAULT_GPU_NODE_SELECTOR`.
        env: more environment variables of the server (e.g. `EFCM_SLIDE_URI_PREFIXES`).
        cpu, memory: requests (memory is also the limit).
        min_replicas, max_replicas: the autoscaling range.

    Raises:
        ValueError: a bad name, namespace, mode, replica range, or an empty URI or image.
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
    if not image or image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
        raise ValueError(f"serving image {image!r} must carry an explicit tag other than :latest")
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(
            f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1; "
            f"got {min_replicas}, {max_replicas}"
        )

    if env and "STORAGE_URI" in env:
        raise ValueError("env must not set STORAGE_URI: it is the storage_uri argument")
    variables = {"STORAGE_URI": storage_uri, "EFCM_CACHE_DIR": "/tmp/efcm-cache", **(env or {})}
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
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "initialDelaySeconds": 30,
            "periodSeconds": 30,
            "failureThreshold": 5,
        },
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "containers": [container],
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
    # KServeClient wraps the Kubernetes ApiException in a RuntimeError; the status is on the cause.
    for e in (err, err.__cause__, err.__context__):
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status
    return None


def apply_inference_service(
    client: Any, isvc: Mapping[str, Any], *, ready_timeout_s: int = 0
) -> dict[str, Any]:
    """Create the InferenceService, or patch it when one of that name exists; then wait for it.

    Args:
        client: a `kserve.KServeClient` (anything with its `get`, `create`, `patch` and
            `wait_isvc_ready`).
        isvc: a rendered InferenceService (`inference_service`).
        ready_timeout_s: wait up to this long for the new generation to be Ready (0: no wait);
            the client raises RuntimeError when it is not.
    """
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    body = _Body(isvc)
    try:
        client.get(name, namespace=namespace)
    except RuntimeError as err:
        if _status(err) != 404:
            raise
        log.info("creating InferenceService %s/%s", namespace, name)
        result = client.create(body, namespace=namespace)
    else:
        log.info("patching InferenceService %s/%s", namespace, name)
        result = client.patch(name, body, namespace=namespace)
    if ready_timeout_s > 0:
        client.wait_isvc_ready(
            name,
            namespace=namespace,
            timeout_seconds=ready_timeout_s,
            expected_generation=(result or {}).get("metadata", {}).get("generation"),
        )
        log.info("InferenceService %s/%s is ready", namespace, name)
    return result


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
    ready_timeout_s: int = 600,
    **options: Any,
) -> dict[str, Any]:
    """Render the InferenceService for a package, write it as YAML, and apply it unless `dry_run`.

    Args:
        storage_uri: where the exported package is (see `inference_service`).
        out_path: the YAML file to write (the rendered object, applied or not).
        name, namespace, image, gpu, options: see `inference_service`.
        dry_run: only render and write.
        client_factory: makes the client for `apply_inference_service` (e.g. `kserve.KServeClient`,
            which reads the in-cluster or kubeconfig credentials); called only when not `dry_run`.
        ready_timeout_s: how long to wait for the applied InferenceService to be Ready.

    Raises:
        ValueError: bad values (see `inference_service`), or a URI KServe cannot download from
            when not `dry_run`.
    """
    isvc = inference_service(name, namespace, storage_uri, image, gpu=gpu, **options)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(isvc, sort_keys=False))
    if dry_run:
        log.info("dry run: rendered InferenceService %s/%s to %s", namespace, name, out)
        return isvc
    if not storage_uri.startswith(STORAGE_SCHEMES):
        raise ValueError(
            f"KServe cannot download the package from {storage_uri!r}: use a pipeline root on "
            f"one of {', '.join(STORAGE_SCHEMES)}"
        )
    if client_factory is None:
        raise ValueError("deploy without dry_run needs a client_factory (e.g. kserve.KServeClient)")
    return apply_inference_service(client_factory(), isvc, ready_timeout_s=ready_timeout_s)

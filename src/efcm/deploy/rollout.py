"""Rollout of a rendered InferenceService with the kserve SDK (`kserve.KServeClient`).

`apply_inference_service`: `get` the service; absent (404): `create` it; present: `patch` it (JSON
merge patch, which is what the SDK sends) so that its spec becomes exactly the target spec: keys
the target lacks (a node selector from a former GPU deployment, an old canary) are sent as null
and so removed. `canary_traffic_percent` < 100 on an existing service keeps the current predictor
serving the rest of the traffic (`rollout_target`):

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

The client is handed in (`client_factory`: the KFP deploy component passes `kserve.KServeClient`).
What the rollout relies on beyond the SDK's documented API is in `efcm.deploy._kserve_sdk`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from efcm.deploy import _kserve_sdk as sdk
from efcm.deploy.render import (
    DEPLOYMENT_MODE_ANNOTATION,
    canary_spec,
    inference_service,
    serving_mode,
)

log = logging.getLogger(__name__)

# Schemes KServe's storage initializer downloads (a local path only makes sense for a dry run).
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://")
_NOT_FOUND = 404


def _check_percent(canary_traffic_percent: int) -> None:
    if not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent must be in 0-100, got {canary_traffic_percent}")


def _check_same_mode(target: Mapping[str, Any], existing: Mapping[str, Any]) -> None:
    """Raise ValueError when `existing` runs in another deployment mode than `target` asks for."""
    mode = target["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION]
    current = ((existing.get("metadata") or {}).get("annotations") or {}).get(
        DEPLOYMENT_MODE_ANNOTATION
    )
    if current is not None and serving_mode(current) != serving_mode(mode):
        name = target["metadata"]["name"]
        raise ValueError(
            f"InferenceService {name!r} runs in {current} mode, the new one asks for {mode}: "
            "KServe cannot change the mode of a service; delete it first or keep its mode"
        )


def rollout_target(
    desired: Mapping[str, Any],
    existing: Mapping[str, Any] | None,
    canary_traffic_percent: int = 100,
) -> dict[str, Any]:
    """The InferenceService to converge to: `desired`, or a canary of it next to `existing`.

    Args:
        desired: a rendered InferenceService (`efcm.deploy.render.inference_service`).
        existing: the one in the cluster (as `get` returns it), or None when there is none.
        canary_traffic_percent: the share of traffic for `desired` (0-100); below 100, and only
            when `existing` is given, the existing predictor keeps the rest (module docstring).

    Raises:
        ValueError: a percentage outside 0-100, or an existing service of another deployment
            mode (KServe cannot switch a service's mode in place).
    """
    _check_percent(canary_traffic_percent)
    target = copy.deepcopy(dict(desired))
    if existing is None:
        if canary_traffic_percent < 100:
            log.warning("new InferenceService: no previous version to split traffic with")
        return target
    _check_same_mode(target, existing)
    if canary_traffic_percent == 100:
        return target
    mode = target["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION]
    if serving_mode(mode) == "Knative":
        target["spec"]["predictor"]["canaryTrafficPercent"] = canary_traffic_percent
        return target
    target["spec"] = {
        **copy.deepcopy(dict(existing["spec"])),
        "canary": [canary_spec(target["spec"]["predictor"], canary_traffic_percent)],
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


def _patch_of(existing: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `existing` into `target`: its identity, labels and mode
    annotation, and the spec difference."""
    meta = target["metadata"]
    return {
        "apiVersion": target["apiVersion"],
        "kind": target["kind"],
        "metadata": {
            **{k: meta[k] for k in ("name", "namespace", "labels")},
            "annotations": meta["annotations"],
        },
        "spec": merge_patch(existing.get("spec") or {}, target["spec"]),
    }


def _get_existing(client: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The InferenceService in the cluster, or None when the API says 404."""
    try:
        return client.get(name, namespace=namespace)
    except RuntimeError as err:
        if sdk.api_status(err) != _NOT_FOUND:
            raise
        return None


def _wait_ready(
    client: Any, name: str, namespace: str, generation: int | None, timeout_s: int
) -> None:
    """Poll until generation `generation` is Ready; TimeoutError after `timeout_s`."""
    try:
        client.wait_isvc_ready(
            name,
            namespace=namespace,
            timeout_seconds=timeout_s,
            polling_interval=max(1, min(10, timeout_s // 10)),
            expected_generation=generation,
        )
    except RuntimeError as err:
        if not sdk.is_wait_timeout(err):
            raise
        raise TimeoutError(
            f"InferenceService {namespace}/{name} (generation {generation}) is not Ready "
            f"after {timeout_s} s; `kubectl describe isvc -n {namespace} {name}` tells why"
        ) from err
    log.info("InferenceService %s/%s is ready", namespace, name)


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
        isvc: a rendered InferenceService (`efcm.deploy.render.inference_service`).
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
    existing = _get_existing(client, name, namespace)
    target = rollout_target(isvc, existing, canary_traffic_percent)
    if existing is None:
        log.info("creating InferenceService %s/%s", namespace, name)
        result = client.create(sdk.request_body(target), namespace=namespace)
    else:
        log.info(
            "patching InferenceService %s/%s (%d%% to the new predictor)",
            namespace,
            name,
            canary_traffic_percent,
        )
        body = sdk.request_body(_patch_of(existing, target))
        result = client.patch(name, body, namespace=namespace)
    if ready_timeout_s > 0:
        generation = ((result or {}).get("metadata") or {}).get("generation")
        _wait_ready(client, name, namespace, generation, ready_timeout_s)
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
        name, namespace, image, gpu, options: see `efcm.deploy.render.inference_service`.
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
    _check_percent(canary_traffic_percent)
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

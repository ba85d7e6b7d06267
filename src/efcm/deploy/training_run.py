"""Submit a rendered TrainJob, wait for it, and bring its outputs back: the pipeline's multi-node
distillation step (`components/distill_job.py`) makes one call, `run_distill_job`.

The cluster is reached through the Kubernetes client's `CustomObjectsApi` (what the Kubeflow SDK's
`TrainerClient` itself calls), handed in as `api`: the component passes `in_cluster_api`. The
calls and what each needs from RBAC on `trainjobs.trainer.kubeflow.org` in the namespace
(manifests/base/rbac.yaml grants exactly these):

- `create_namespaced_custom_object` (verb `create`), with `field_validation="Strict"`: the API
  server refuses a field the CRD does not know instead of dropping it.
- `get_namespaced_custom_object` (`get`): the polling of `wait_for_train_job`, and the existing
  job on a create that answers 409.
- `delete_namespaced_custom_object` (`delete`): a job of the same name that already failed (the
  step is retried) is deleted and created again; a job still running when the wait times out is
  deleted, so its GPUs are freed.

A job of the same name that is running or done (the step's pod was restarted) is adopted and
waited for. The TrainJob's conditions decide: `Complete` true is success, `Failed` true raises
`TrainingJobFailed` with its reason and message; `Suspended` (Kueue holding it until quota frees)
waits on. Transient API errors (5xx, 429, a dropped connection) while polling are retried a few
times in a row.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import urllib3
import yaml

from efcm.config import Params, params_to_dict
from efcm.deploy.training_job import (
    GROUP,
    PLURAL,
    VERSION,
    DistillJobIO,
    distill_train_job,
    job_name,
)
from efcm.errors import TrainingJobFailed
from efcm.io.gcs import upload
from efcm.io.transfer import download_dir

log = logging.getLogger(__name__)

FIELD_MANAGER = "efcm-pipeline"
OUTPUTS = ("student.pt", "metrics.json")  # what `efcm distill` writes into --out
POLL_S = 30.0
QUEUE_S = 3600.0  # the wait's allowance, beyond the job's deadline, for the job to be scheduled
TRANSIENT_RETRIES = 5  # API errors in a row tolerated while polling
_TRANSIENT = {429, 500, 502, 503, 504}
_CONFLICT, _NOT_FOUND = 409, 404


# -- the API --------------------------------------------------------------------------------------


def in_cluster_api() -> Any:
    """A `kubernetes.client.CustomObjectsApi` with the pod's service account (outside a cluster:
    the current kubeconfig context)."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.CustomObjectsApi()


def _status(err: Exception) -> int | None:
    """The HTTP status of a Kubernetes client `ApiException` (None for any other error)."""
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def _job(namespace: str, name: str) -> str:
    return f"TrainJob {namespace}/{name}"


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _delete(api: Any, namespace: str, name: str) -> None:
    """Delete the job and, in the foreground, its JobSet and pods."""
    api.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
    )


# -- conditions -----------------------------------------------------------------------------------


def conditions(job: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The job's status conditions by type."""
    found = ((job or {}).get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in found}


def outcome(job: Mapping[str, Any]) -> str | None:
    """`Complete` or `Failed` once the job has ended (a condition of that type is true), else
    None."""
    conds = conditions(job)
    for kind in ("Failed", "Complete"):  # a job that failed is not also a success
        if conds.get(kind, {}).get("status") == "True":
            return kind
    return None


def describe(job: Mapping[str, Any]) -> str:
    """The most recent condition as `Type=Status (Reason): message`, or `no condition yet`."""
    found = ((job or {}).get("status") or {}).get("conditions") or []
    if not found:
        return "no condition yet"
    last = max(found, key=lambda c: c.get("lastTransitionTime") or "")
    text = f"{last.get('type')}={last.get('status')}"
    if last.get("reason"):
        text += f" ({last['reason']})"
    return text + (f": {last['message']}" if last.get("message") else "")


# -- submit and wait ------------------------------------------------------------------------------


def submit(
    api: Any,
    job: Mapping[str, Any],
    *,
    poll_s: float = POLL_S,
    gone_timeout_s: float = 600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Create the TrainJob; returns `created`, `adopted` (one of that name runs or has
    completed) or `recreated` (one of that name had failed: deleted, then created again).

    Raises:
        kubernetes.client.exceptions.ApiException: the API refused (403: the service account
            lacks a verb; 422: the object is invalid for the CRD), or the old job was not gone
            after `gone_timeout_s` (as TimeoutError).
    """
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]

    def create() -> None:
        api.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            dict(job),
            field_manager=FIELD_MANAGER,
            field_validation="Strict",
        )

    try:
        create()
        log.info("created %s", _job(namespace, name))
        return "created"
    except Exception as err:
        if _status(err) != _CONFLICT:
            raise
    existing = _get(api, namespace, name)
    if outcome(existing) != "Failed":
        log.info("adopting %s (%s)", _job(namespace, name), describe(existing))
        return "adopted"
    log.info("%s failed before (%s): deleting it", _job(namespace, name), describe(existing))
    _delete(api, namespace, name)
    deadline = clock() + gone_timeout_s
    while True:
        try:
            _get(api, namespace, name)
        except Exception as err:
            if _status(err) != _NOT_FOUND:
                raise
            break
        if clock() >= deadline:
            raise TimeoutError(
                f"{_job(namespace, name)} was deleted but is still there after "
                f"{gone_timeout_s:.0f} s (finalizers?); delete it and rerun the step"
            )
        sleep(poll_s)
    create()
    log.info("created %s again", _job(namespace, name))
    return "recreated"


def wait_for_train_job(
    api: Any,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    delete_on_timeout: bool = True,
) -> dict[str, Any]:
    """Poll the TrainJob until it has completed; returns its last state.

    Raises:
        TrainingJobFailed: it ended Failed (the message has its reason and message).
        TimeoutError: not ended after `timeout_s`; names the job and its last condition. With
            `delete_on_timeout` the job is deleted first, so it stops holding GPUs.
        RuntimeError: it disappeared (deleted by someone else).
        kubernetes.client.exceptions.ApiException: an API error that is not transient (403), or
            more than `TRANSIENT_RETRIES` transient ones in a row.
    """
    deadline = clock() + timeout_s
    last: dict[str, Any] = {}
    failures = 0
    while True:
        try:
            last = _get(api, namespace, name)
            failures = 0
        except Exception as err:
            status = _status(err)
            if status == _NOT_FOUND:
                raise RuntimeError(
                    f"{_job(namespace, name)} is gone while waiting for it (deleted?); last "
                    f"seen: {describe(last)}"
                ) from err
            # the client's own retries of a dropped connection end in a urllib3 error
            dropped = isinstance(err, OSError | urllib3.exceptions.HTTPError)
            transient = status in _TRANSIENT or (status is None and dropped)
            failures += 1
            if not transient or failures > TRANSIENT_RETRIES:
                raise
            log.warning("polling %s: %s (retrying)", _job(namespace, name), err)
        ended = outcome(last) if last else None
        if ended == "Complete":
            log.info("%s completed", _job(namespace, name))
            return last
        if ended == "Failed":
            raise TrainingJobFailed(f"{_job(namespace, name)} failed: {describe(last)}")
        if clock() >= deadline:
            if delete_on_timeout:
                _delete(api, namespace, name)
            raise TimeoutError(
                f"{_job(namespace, name)} has not ended after {timeout_s:.0f} s; last condition: "
                f"{describe(last)}" + ("; the job was deleted" if delete_on_timeout else "")
            )
        sleep(poll_s)


# -- the pipeline step ----------------------------------------------------------------------------


def run_distill_job(
    api_factory: Callable[[], Any],
    params: Params,
    *,
    output_uri: str,
    output_dir: str | Path,
    manifest: str,
    patches: str,
    teacher_features: str,
    image: str,
    namespace: str,
    nodes: int,
    gpus_per_node: int,
    deadline_s: int,
    queue_s: float = QUEUE_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    **options: Any,
) -> str:
    """Distil on `nodes` x `gpus_per_node` GPUs as a TrainJob; its student.pt and metrics.json
    end up in `output_dir` (the step's output artifact). Returns the TrainJob's name.

    The params (the distill stage's sections) go to `<output_uri>-job/params.yaml`, the job
    writes into `<output_uri>-job/out/` (`DistillJobIO.beside`), and both are gs://: the job's
    pods read and write by URI.

    Args:
        api_factory: makes the `CustomObjectsApi` (the component passes `in_cluster_api`).
        params: the distill stage's validated params.
        output_uri, output_dir: the step's output artifact: its gs:// URI and its local folder.
        manifest, patches, teacher_features: the gs:// URIs of the step's input artifacts.
        image, namespace, nodes, gpus_per_node, options: see
            `efcm.deploy.training_job.distill_train_job`.
        deadline_s: the job's deadline (`activeDeadlineSeconds`, counted from its start).
        queue_s: how much longer than `deadline_s` the step waits (the job may queue for GPUs
            first); past that it deletes the job and raises TimeoutError.

    Raises:
        ValueError: a URI that is not gs:// (a pipeline root on local disk: the job's pods could
            not read it), or an argument `distill_train_job` refuses; nothing is submitted.
        TrainingJobFailed, TimeoutError: see `wait_for_train_job`.
        FileNotFoundError: the job completed without writing `OUTPUTS`.
    """
    io = DistillJobIO.beside(output_uri, manifest, patches, teacher_features)
    name = job_name(output_uri)
    job = distill_train_job(
        name,
        namespace,
        image,
        io,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        deadline_s=deadline_s,
        **options,
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "params.yaml"
        local.write_text(yaml.safe_dump(params_to_dict(params), sort_keys=False))
        upload(local, io.params)
    api = api_factory()
    submit(api, job, poll_s=poll_s, sleep=sleep, clock=clock)
    wait_for_train_job(
        api,
        namespace,
        name,
        timeout_s=deadline_s + queue_s,
        poll_s=poll_s,
        sleep=sleep,
        clock=clock,
    )
    out = download_dir(io.out, output_dir)
    missing = [f for f in OUTPUTS if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{_job(namespace, name)} completed but wrote no {missing} under {io.out}"
        )
    return name

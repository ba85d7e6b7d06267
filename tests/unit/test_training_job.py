"""The multi-node distillation: the TrainJob (`efcm.deploy.training_job`), its submission and wait
(`efcm.deploy.training_run`), the gs:// transfers its pods and the pipeline step rely on
(`efcm.io.transfer`), and the KFP step (`components/distill_job.py`).

No Kubernetes API server, no Kubeflow Trainer and no GPU can run here. So:

- Every TrainJob rendered is validated offline by `tests/trainjob_schema.errors`: Kubeflow
  Trainer's own API models from PyPI (`kubeflow-trainer-api` 2.3.0, generated from the Go types the
  Trainer v2.3.0 CRD `manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml` is generated from),
  strict about types, required fields and unknown fields at every level; the CRD's rules on the
  fields efcm sets; and the node pod it makes, a core object, with kubernetes-validate (strict).
  Broken TrainJobs are shown to be refused by the same validator.
- Submit and wait run against `FakeTrainJobApi`, a fake at the boundary of the Kubernetes client:
  it has exactly the signatures of the three `kubernetes.client.CustomObjectsApi` methods used (a
  test compares them) and raises the client's own `ApiException`. The real `CustomObjectsApi` is
  also run against a local HTTP stub of the API server, for the requests it makes and so the RBAC
  verbs the step needs (manifests/base/rbac.yaml grants exactly those).
- gs:// transfers run against the GCS emulator (tests/gcs.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from efcm.cli import build_parser
from efcm.config import for_stage, load_params, params_for_stage, params_to_dict
from efcm.deploy.render import DEFAULT_GPU_NODE_SELECTOR, GPU_RESOURCE
from efcm.deploy.training_job import (
    GROUP,
    MAX_NAME,
    NODE,
    PLURAL,
    RESERVED_ENV,
    SERVICE_ACCOUNT,
    SHM_MOUNT,
    VERSION,
    DistillJobIO,
    distill_train_job,
    job_name,
)
from efcm.deploy.training_run import (
    OUTPUTS,
    TRANSIENT_RETRIES,
    describe,
    run_distill_job,
    submit,
    wait_for_train_job,
)
from efcm.errors import TrainingJobFailed
from efcm.io.cache import SlideCache
from efcm.io.transfer import download_dir, local_inputs, local_output, upload_dir
from tests import trainjob_schema

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "europe-docker.pkg.dev/efcm-project/efcm/efcm-component:0.1.0"
NS = "efcm"
OUT_URI = "gs://efcm-root/efcm/run-1/distill-job/student_model"


def _io(output_uri: str = OUT_URI, bucket: str = "efcm-root") -> DistillJobIO:
    run = f"gs://{bucket}/efcm/run-1"
    return DistillJobIO.beside(
        output_uri, f"{run}/manifest.csv", f"{run}/patches", f"{run}/teacher_features"
    )


def _job(nodes: int = 2, gpus_per_node: int = 4, **kw: Any) -> dict[str, Any]:
    return distill_train_job(
        job_name(OUT_URI), NS, IMAGE, _io(), nodes=nodes, gpus_per_node=gpus_per_node, **kw
    )


def _pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return replicated["template"]["spec"]["template"]["spec"]


def _env(job: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}


# -- the manifest validates, and the validator refuses broken ones --------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"nodes": 2, "gpus_per_node": 1},
        {"nodes": 4, "gpus_per_node": 8, "node_selector": {"nvidia.com/gpu.present": "true"}},
        {"nodes": 1, "gpus_per_node": 2, "labels": {"pipelines.kubeflow.org/run": "r1"}},
        {"nodes": 3, "gpus_per_node": 2, "env": {"NCCL_DEBUG": "WARN"}, "cache_gib": 500},
    ],
    ids=["2x1", "4x8-nfd-selector", "1x2-labels", "3x2-env"],
)
def test_the_rendered_train_job_validates_strictly(kw):
    job = _job(**kw)
    assert trainjob_schema.errors(job) == []
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A breakage: set the dotted `path` (list indices as numbers) of the job to `value`."""

    def apply(job: dict) -> None:
        *parents, last = path.split(".")
        node: Any = job
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return apply


def _delete(path: str) -> Callable[[dict], None]:
    def apply(job: dict) -> None:
        *parents, last = path.split(".")
        node: Any = job
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return apply


_POD = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec"
BREAKAGES = {
    # unknown fields, at several depths
    "unknown spec field": _set("spec.numNodes", 2),
    "unknown trainer field": _set("spec.trainer.gpus", 4),
    "misspelt container patch field": _set(f"{_POD}.template.spec.containers.0.volumeMount", []),
    "unknown volume source field": _set(f"{_POD}.template.spec.volumes.1.emptyDir.size", "1Gi"),
    "unknown metadata field": _set("metadata.label", {"a": "b"}),
    # wrong types
    "string numNodes": _set("spec.trainer.numNodes", "2"),
    "int env value": _set("spec.trainer.env.0.value", 7),
    "string tolerationSeconds": _set(f"{_POD}.template.spec.tolerations.0.tolerationSeconds", "9"),
    "node selector as a list": _set(f"{_POD}.template.spec.nodeSelector", ["gpu"]),
    "list quantity": _set("spec.trainer.resourcesPerNode.limits.memory", ["96Gi"]),
    # missing required fields
    "no runtimeRef": _delete("spec.runtimeRef"),
    "no runtimeRef name": _delete("spec.runtimeRef.name"),
    "no patch manager": _delete("spec.runtimePatches.0.manager"),
    "no volume mount path": _delete(f"{_POD}.template.spec.containers.0.volumeMounts.0.mountPath"),
    # the CRD's own rules
    "wrong apiVersion": _set("apiVersion", "kubeflow.org/v1"),
    "name not RFC 1035": _set("metadata.name", "Efcm_distill"),
    "zero deadline": _set("spec.activeDeadlineSeconds", 0),
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_the_validator_refuses_a_broken_train_job(breakage):
    job = _job()
    breakage(job)
    assert trainjob_schema.errors(job)


def test_unknown_fields_are_reported_with_their_path():
    job = _job()
    _set(f"{_POD}.template.spec.containers.0.volumeMount", [])(job)
    (model_error, *_) = trainjob_schema.errors(job)
    assert model_error.endswith("containers[0].volumeMount: unknown field")


def test_the_node_pod_is_checked_as_a_core_object():
    """The node pod check stands on its own (not only the models'): the core Pod schema refuses
    a resource quantity that is an object."""
    job = _job()
    job["spec"]["trainer"]["resourcesPerNode"]["limits"] = {GPU_RESOURCE: {"count": 4}}
    assert any(e.startswith("node pod:") for e in trainjob_schema.pod_errors(job))


# -- what the job asks for ------------------------------------------------------------------------


def test_each_node_gets_its_gpus_on_a_gpu_node_with_shared_memory():
    job = _job(nodes=3, gpus_per_node=4)
    trainer, pod = job["spec"]["trainer"], _pod_spec(job)
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    resources = trainer["resourcesPerNode"]
    assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] == "4"
    assert resources["requests"]["cpu"] == "24" and resources["limits"]["memory"] == "96Gi"
    assert pod["nodeSelector"] == dict(DEFAULT_GPU_NODE_SELECTOR)
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (node,) = pod["containers"]
    assert node["name"] == NODE
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert volumes[mounts[SHM_MOUNT]]["emptyDir"] == {"medium": "Memory"}
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert node["securityContext"]["allowPrivilegeEscalation"] is False
    assert node["securityContext"]["runAsNonRoot"] is True


def test_the_command_is_torchrun_running_efcm_distill_on_gs_uris_one_process_per_gpu(
    monkeypatch,
):
    from torch.distributed.run import parse_args

    job = _job(nodes=2, gpus_per_node=8)
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == IMAGE and trainer["command"] == ["torchrun"]
    # torchrun's own parser, in the env the Trainer's torch plugin sets on node 1 of 2
    name = job["metadata"]["name"]
    pet = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": "29500",
    }
    for k, v in pet.items():
        monkeypatch.setenv(k, v)
    launch = parse_args(trainer["args"])
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == ("2", 1, "8")
    assert (launch.master_addr, launch.master_port) == (pet["PET_MASTER_ADDR"], 29500)
    assert not launch.standalone and launch.rdzv_backend == "static"
    assert launch.module and launch.training_script == "efcm.cli"
    # each worker runs `efcm distill` on the job's gs:// URIs, as efcm's own parser reads them
    parsed = build_parser().parse_args(launch.training_script_args)
    io = _io()
    assert parsed.command == "distill"
    assert (parsed.params, parsed.manifest, parsed.out) == (io.params, io.manifest, io.out)
    assert (parsed.patches, parsed.teacher_features) == (io.patches, io.teacher_features)


def test_the_staging_cache_is_on_its_volume_as_the_cli_reads_it():
    job = _job(cache_gib=80)
    env, pod = _env(job), _pod_spec(job)
    (node,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    cache = SlideCache.from_env(env)  # what `efcm distill` makes of the pod's env
    (volume,) = [v for v in pod["volumes"] if mounts.get(v["name"]) == str(cache.root)]
    assert volume["emptyDir"]["sizeLimit"] == "80Gi"
    assert job["spec"]["trainer"]["resourcesPerNode"]["requests"]["ephemeral-storage"] == "80Gi"
    assert not set(env) & RESERVED_ENV  # the Trainer sets those


def test_labels_reach_the_job_and_its_pods_and_istio_stays_out():
    job = _job(labels={"pipelines.kubeflow.org/run": "r1"})
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod_labels = replicated["template"]["spec"]["template"]["metadata"]["labels"]
    for labels in (job["metadata"]["labels"], pod_labels):
        assert labels["app.kubernetes.io/name"] == "efcm"
        assert labels["pipelines.kubeflow.org/run"] == "r1"
    assert pod_labels["sidecar.istio.io/inject"] == "false"
    assert replicated["name"] == NODE  # the torch runtime's job, which the webhook checks


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "Efcm"}, "RFC 1035"),
        ({"name": "e" * (MAX_NAME + 1)}, "at most"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"image": "efcm-component:latest"}, "explicit tag"),
        ({"image": "efcm-component"}, "explicit tag"),
        ({"nodes": 0}, "nodes"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"deadline_s": 0}, "deadline"),
        ({"cache_gib": 0}, "cache_gib"),
        ({"env": {"PET_NNODES": "2"}}, "PET_NNODES"),
        ({"env": {"EFCM_CACHE_DIR": "/tmp"}}, "EFCM_CACHE_DIR"),
    ],
)
def test_bad_arguments_are_refused_by_name(kw, match):
    args = {"name": job_name(OUT_URI), "namespace": NS, "image": IMAGE}
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises(ValueError, match=match):
        distill_train_job(
            args["name"],
            args["namespace"],
            args["image"],
            _io(),
            **{"nodes": 2, "gpus_per_node": 1, **kw},
        )


@pytest.mark.parametrize("uri", ["/pipeline-root/run/manifest", "s3://b/m.csv", "gs://bucket-only"])
def test_the_job_reads_and_writes_only_gs_uris(uri):
    with pytest.raises(ValueError, match="manifest must be a gs:// URI"):
        DistillJobIO.beside(OUT_URI, uri, "gs://b/patches", "gs://b/teacher")


def test_the_job_name_is_stable_for_a_step_run_and_differs_between_runs():
    other = OUT_URI.replace("run-1", "run-2")
    assert job_name(OUT_URI) == job_name(OUT_URI) != job_name(other)
    assert len(job_name(OUT_URI)) <= MAX_NAME
    io = _io()
    assert io.params == f"{OUT_URI}-job/params.yaml" and io.out == f"{OUT_URI}-job/out"


# -- submit and wait, against a fake at the Kubernetes client's boundary --------------------------


def _cond(kind: str, status: str = "True", reason: str = "", message: str = "", t: str = "1"):
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": f"2026-11-30T10:00:0{t}Z",
    }


RUNNING: dict = {}  # no condition yet: pods starting or training
COMPLETE = {"conditions": [_cond("Complete", reason="JobSetCompleted", t="2")]}
FAILED = {"conditions": [_cond("Failed", reason="JobSetFailed", message="node-0 exited 1", t="3")]}
SUSPENDED = {"conditions": [_cond("Suspended", reason="Suspended", message="queued")]}


class FakeTrainJobApi:
    """The `kubernetes.client.CustomObjectsApi` methods the step calls, with their exact
    signatures (`test_the_fake_has_the_real_clients_signatures`), over one in-memory namespace.

    `statuses`: what each `get` of the job finds in turn (a status dict applied to the stored
    object, or an `ApiException` raised); the last one stays. `on_get` runs on each get (a job
    that "runs": writes its outputs). A deleted job is gone at the next get.
    """

    def __init__(self, statuses=(), existing=None, on_get=None, create_error=None):
        self.store: dict[str, dict] = {}
        if existing is not None:
            self.store[existing["metadata"]["name"]] = copy.deepcopy(existing)
        self.statuses, self.on_get, self.create_error = list(statuses), on_get, create_error
        self.calls: list[tuple] = []

    def _check(self, group, version, plural):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self._check(group, version, plural)
        name = body["metadata"]["name"]
        self.calls.append(("create", name, kwargs))
        if self.create_error is not None:
            raise self.create_error
        if name in self.store:
            raise ApiException(status=409, reason="AlreadyExists")
        self.store[name] = {**copy.deepcopy(body), "status": {}}
        return self.store[name]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self.calls.append(("get", name))
        if name not in self.store:
            raise ApiException(status=404, reason="NotFound")
        if self.on_get is not None:
            self.on_get(self.store[name])
        if self.statuses:
            step = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if isinstance(step, Exception):
                raise step
            self.store[name]["status"] = copy.deepcopy(step)
        return copy.deepcopy(self.store[name])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self.calls.append(("delete", name, kwargs))
        del self.store[name]
        return {"kind": "Status", "status": "Success"}

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


class Clock:
    """`sleep` and `monotonic` for the wait loop, without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_the_fake_has_the_real_clients_signatures():
    from kubernetes.client import CustomObjectsApi

    for method in ("create", "get", "delete"):
        name = f"{method}_namespaced_custom_object"
        real = inspect.signature(getattr(CustomObjectsApi, name))
        assert inspect.signature(getattr(FakeTrainJobApi, name)) == real, name


def _wait(api, clock=None, timeout_s=600.0, **kw):
    clock = clock or Clock()
    name = job_name(OUT_URI)
    return wait_for_train_job(
        api, NS, name, timeout_s=timeout_s, poll_s=30, sleep=clock.sleep, clock=clock, **kw
    )


def test_wait_returns_the_job_once_it_is_complete():
    api = FakeTrainJobApi([RUNNING, RUNNING, SUSPENDED, COMPLETE], existing=_job())
    clock = Clock()
    done = _wait(api, clock)
    assert done["status"] == COMPLETE
    assert api.verbs() == ["get"] * 4 and clock.now == 90  # three polls 30 s apart


def test_wait_raises_the_failure_with_its_reason_and_message():
    api = FakeTrainJobApi([RUNNING, FAILED], existing=_job())
    with pytest.raises(TrainingJobFailed, match=r"efcm/efcm-distill-\w+ failed: Failed=True "):
        _wait(api)
    with pytest.raises(TrainingJobFailed, match=r"\(JobSetFailed\): node-0 exited 1"):
        _wait(FakeTrainJobApi([FAILED], existing=_job()))


def test_a_job_both_failed_and_complete_counts_as_failed():
    both = {"conditions": COMPLETE["conditions"] + FAILED["conditions"]}
    with pytest.raises(TrainingJobFailed):
        _wait(FakeTrainJobApi([both], existing=_job()))


def test_wait_times_out_naming_the_job_and_its_last_condition_and_deletes_it():
    api = FakeTrainJobApi([SUSPENDED], existing=_job())
    with pytest.raises(
        TimeoutError,
        match=r"efcm-distill-\w+ has not ended after 600 s; last "
        r"condition: Suspended=True \(Suspended\): queued; the job was deleted",
    ):
        _wait(api)
    assert api.verbs()[-1] == "delete" and not api.store
    kept = FakeTrainJobApi([RUNNING], existing=_job())
    with pytest.raises(TimeoutError, match="no condition yet"):
        _wait(kept, delete_on_timeout=False)
    assert "delete" not in kept.verbs() and kept.store


def test_wait_retries_transient_api_errors_and_gives_up_after_a_few_in_a_row():
    dropped = urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused")
    flaky = [ApiException(status=503), dropped, ApiException(status=429), RUNNING, COMPLETE]
    assert _wait(FakeTrainJobApi(flaky, existing=_job()))["status"] == COMPLETE
    down = [ApiException(status=502)] * (TRANSIENT_RETRIES + 2)
    with pytest.raises(ApiException) as err:
        _wait(FakeTrainJobApi(down, existing=_job()))
    assert err.value.status == 502


def test_wait_raises_at_once_on_a_forbidden_get_and_a_vanished_job():
    api = FakeTrainJobApi([ApiException(status=403, reason="Forbidden")], existing=_job())
    with pytest.raises(ApiException):
        _wait(api)
    assert api.verbs() == ["get"]
    with pytest.raises(RuntimeError, match="is gone while waiting"):
        _wait(FakeTrainJobApi())


def test_submit_creates_the_job_with_strict_field_validation():
    api = FakeTrainJobApi()
    assert submit(api, _job()) == "created"
    ((verb, name, kwargs),) = api.calls
    assert (verb, name) == ("create", job_name(OUT_URI))
    assert kwargs["field_validation"] == "Strict" and kwargs["field_manager"]
    assert api.store[name]["spec"] == _job()["spec"]


def test_submit_adopts_a_running_job_and_replaces_a_failed_one():
    running = FakeTrainJobApi([RUNNING], existing=_job())
    assert submit(running, _job()) == "adopted"
    assert running.verbs() == ["create", "get"]
    failed = {**_job(), "status": FAILED}
    api = FakeTrainJobApi(existing=failed)
    clock = Clock()
    assert submit(api, _job(), sleep=clock.sleep, clock=clock) == "recreated"
    assert api.verbs() == ["create", "get", "delete", "get", "create"]
    assert api.calls[2][2] == {"propagation_policy": "Foreground"}
    assert api.store[job_name(OUT_URI)]["status"] == {}


def test_submit_reraises_other_api_errors():
    api = FakeTrainJobApi(create_error=ApiException(status=422, reason="Invalid"))
    with pytest.raises(ApiException) as err:
        submit(api, _job())
    assert err.value.status == 422 and api.verbs() == ["create"]


def test_describe_picks_the_latest_condition():
    both = {"status": {"conditions": SUSPENDED["conditions"] + COMPLETE["conditions"]}}
    assert describe(both) == "Complete=True (JobSetCompleted)"
    assert describe({}) == "no condition yet"


# -- the real client against a stub API server: requests and RBAC verbs ---------------------------

_VERBS = {"GET": "get", "POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}
_COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"


class _StubApiServer(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for TrainJobs in one namespace: a job is stored on
    create and found `status` on every get."""

    store: ClassVar[dict] = {}
    requests: ClassVar[list] = []
    status: ClassVar[dict] = {}

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, url.path, urllib.parse.parse_qs(url.query), body))
        name = url.path.removeprefix(_COLLECTION).strip("/")
        if not url.path.startswith(_COLLECTION):
            return self._send(404, {"kind": "Status", "code": 404})
        if self.command == "POST":
            name = body["metadata"]["name"]
            if name in self.store:
                return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
            self.store[name] = body
            return self._send(201, body)
        if name not in self.store:
            return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        if self.command == "GET":
            return self._send(200, {**self.store[name], "status": self.status})
        if self.command == "DELETE":
            del self.store[name]
            return self._send(200, {"kind": "Status", "status": "Success"})
        return self._send(405, {"kind": "Status", "code": 405})

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_api():
    from kubernetes import client

    _StubApiServer.store, _StubApiServer.requests, _StubApiServer.status = {}, [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield client.CustomObjectsApi(client.ApiClient(config))
    server.shutdown()
    server.server_close()


def test_the_real_client_sends_the_job_and_uses_only_the_verbs_the_role_grants(stub_api):
    job = _job()
    name = job["metadata"]["name"]
    clock = Clock()
    _StubApiServer.status = COMPLETE
    assert submit(stub_api, job) == "created"
    assert _wait(stub_api, clock)["status"] == COMPLETE
    _StubApiServer.status = FAILED  # the step is retried after the job failed
    assert submit(stub_api, job, sleep=clock.sleep, clock=clock) == "recreated"
    requests = _StubApiServer.requests
    posts = [r for r in requests if r[0] == "POST"]
    assert [p[1] for p in posts] == [_COLLECTION] * 3
    assert posts[0][2] == {"fieldManager": ["efcm-pipeline"], "fieldValidation": ["Strict"]}
    assert posts[0][3] == job  # the rendered object, sent as it is
    (delete,) = [r for r in requests if r[0] == "DELETE"]
    assert delete[1] == f"{_COLLECTION}/{name}"
    assert delete[2] == {"propagationPolicy": ["Foreground"]}
    rbac = yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text())
    role = next(
        d for d in rbac if d["kind"] == "Role" and d["metadata"]["name"].startswith("efcm-trainjob")
    )
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [GROUP] and rule["resources"] == [PLURAL]
    assert {_VERBS[r[0]] for r in requests} == set(rule["verbs"])


# -- gs:// transfers (the GCS emulator) -----------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_folder_goes_up_and_comes_back_as_it_was(gcs_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "student.pt").write_bytes(b"weights")
    (src / "sub" / "metrics.json").write_text('{"loss": 1}')
    uris = upload_dir(src, gcs_bucket.uri("run/out/"))
    assert uris == [
        gcs_bucket.uri("run/out/student.pt"),
        gcs_bucket.uri("run/out/sub/metrics.json"),
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("not in the bucket")
    assert download_dir(gcs_bucket.uri("run/out"), dest) == dest
    assert _tree(dest) == _tree(src)
    with pytest.raises(FileNotFoundError, match="no objects under"):
        download_dir(gcs_bucket.uri("run/absent"), tmp_path / "none")


def test_local_output_resumes_from_the_bucket_and_uploads_what_rank_0_saved(gcs_bucket, tmp_path):
    out = gcs_bucket.uri("run/out")
    gcs_bucket.upload_bytes(b"epoch 1", "run/out/checkpoint.pt")
    with local_output(out, tmp_path / "w1") as local:
        assert (local / "checkpoint.pt").read_bytes() == b"epoch 1"  # a rerun resumes
        (local / "student.pt").write_bytes(b"weights")
    assert gcs_bucket.bucket.blob("run/out/student.pt").download_as_bytes() == b"weights"
    with (
        pytest.raises(RuntimeError, match="training broke"),
        local_output(out, tmp_path / "w2") as local,
    ):
        (local / "checkpoint.pt").write_bytes(b"epoch 2")
        raise RuntimeError("training broke")
    with local_output(out, tmp_path / "w3", upload=False) as local:
        (local / "rank1.pt").write_bytes(b"not rank 0")
    names = {b.name for b in gcs_bucket.client.list_blobs(gcs_bucket.name, prefix="run/out/")}
    assert names == {"run/out/checkpoint.pt", "run/out/student.pt"}  # not rank 1's
    # the checkpoint saved before the failure is there for the next attempt
    assert gcs_bucket.bucket.blob("run/out/checkpoint.pt").download_as_bytes() == b"epoch 2"
    with local_output(str(tmp_path / "plain"), tmp_path / "unused") as local:
        assert local == tmp_path / "plain" and local.is_dir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="empty or absent"), local_output(out, tmp_path / "busy"):
        pass


def test_local_inputs_stage_gs_files_and_folders_and_pass_local_paths(gcs_bucket, tmp_path):
    gcs_bucket.upload_bytes(b"slide_id,case_id,uri,label\n", "run/manifest.csv")
    gcs_bucket.upload_bytes(b"h5", "run/patches/patches/s1.h5")
    cache = SlideCache(tmp_path / "cache", 1 << 30)
    staged = local_inputs(
        {
            "manifest": gcs_bucket.uri("run/manifest.csv"),
            "patches": gcs_bucket.uri("run/patches"),
            "params": str(ROOT / "params.yaml"),
        },
        cache,
    )
    assert staged["manifest"].read_bytes() == b"slide_id,case_id,uri,label\n"
    assert (staged["patches"] / "patches" / "s1.h5").read_bytes() == b"h5"
    assert staged["params"] == ROOT / "params.yaml"
    assert str(staged["patches"]).startswith(str(cache.root))


# -- the pipeline step: params up, job submitted and waited for, outputs down ---------------------


def _params():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    sections = {k: data[k] for k in ("seed", "dataset", "student", "distill", "store")}
    return params_for_stage("distill", sections)


def _run(gcs_bucket, tmp_path, api, **kw):
    output_uri = gcs_bucket.uri("efcm/run-1/distill-job/student_model")
    io = _io(output_uri, gcs_bucket.name)
    clock = Clock()
    args = {
        "output_uri": output_uri,
        "output_dir": tmp_path / "student_model",
        "manifest": io.manifest,
        "patches": io.patches,
        "teacher_features": io.teacher_features,
        "image": IMAGE,
        "namespace": NS,
        "nodes": 2,
        "gpus_per_node": 4,
        "deadline_s": 3600,
        "sleep": clock.sleep,
        "clock": clock,
        **kw,
    }
    return run_distill_job(lambda: api, _params(), **args), io


def _runs_and_writes(gcs_bucket, outputs=OUTPUTS):
    """A job that trains on its first poll: writes `outputs` where its `--out` says."""

    def on_get(job: dict) -> None:
        args = job["spec"]["trainer"]["args"]
        out = args[args.index("--out") + 1]
        prefix = out.removeprefix(f"gs://{gcs_bucket.name}/")
        for f in outputs:
            gcs_bucket.upload_bytes(f"{f} of {job['metadata']['name']}".encode(), f"{prefix}/{f}")

    return on_get


def test_the_step_submits_waits_and_copies_the_jobs_outputs(gcs_bucket, tmp_path):
    api = FakeTrainJobApi([RUNNING, COMPLETE], on_get=_runs_and_writes(gcs_bucket))
    name, io = _run(gcs_bucket, tmp_path, api)
    assert api.verbs() == ["create", "get", "get"]
    job = api.store[name]
    assert trainjob_schema.errors({k: v for k, v in job.items() if k != "status"}) == []
    assert sorted(p.name for p in (tmp_path / "student_model").iterdir()) == sorted(OUTPUTS)
    assert (tmp_path / "student_model" / "student.pt").read_text() == f"student.pt of {name}"
    # the params the job's `efcm distill --params` reads: the step's, section for section
    params_file = tmp_path / "params.yaml"
    params_file.write_bytes(gcs_bucket.bucket.blob(io.params.split("/", 3)[3]).download_as_bytes())
    assert params_to_dict(for_stage(load_params(params_file), "distill")) == params_to_dict(
        _params()
    )


def test_the_step_fails_when_the_job_wrote_no_student(gcs_bucket, tmp_path):
    api = FakeTrainJobApi([COMPLETE], on_get=_runs_and_writes(gcs_bucket, ["metrics.json"]))
    with pytest.raises(FileNotFoundError, match=r"completed but wrote no \['student.pt'\]"):
        _run(gcs_bucket, tmp_path, api)


def test_the_step_reports_a_failed_job(gcs_bucket, tmp_path):
    with pytest.raises(TrainingJobFailed, match="node-0 exited 1"):
        _run(gcs_bucket, tmp_path, FakeTrainJobApi([RUNNING, FAILED]))


def test_the_component_refuses_a_local_pipeline_root_before_contacting_the_cluster(tmp_path):
    """kfp.local (or a pipeline root on local disk): the job's pods could not read the inputs."""
    from kfp import dsl

    import components as c

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    inputs = {
        k: dsl.Dataset(uri=str(tmp_path / k)) for k in ("manifest", "patches", "teacher_features")
    }
    with pytest.raises(ValueError, match=r"must be a gs:// URI .*its pods see no local"):
        c.distill_job.python_func(
            **inputs,
            seed=data["seed"],
            dataset=data["dataset"],
            student=data["student"],
            distill=data["distill"],
            store=data["store"],
            student_model=dsl.Model(uri=str(tmp_path / "student_model")),
        )

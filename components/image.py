"""The container images of the pipeline, tagged with the efcm version (never :latest).

`IMAGE` runs every component: the `component` target of docker/Dockerfile (efcm with the
[pipeline] extra; the deploy step also imports kserve, so the image needs the [serve] extra too).
`SERVING_IMAGE` is what the deployed InferenceService runs: its `serving` target (`efcm serve`).
`SERVING_CPU_IMAGE` is the same server without torch (target `serving-cpu`: ONNX Runtime, INT8),
which the CPU overlay of manifests/ runs. scripts/images.sh builds all three. The registry is the
one of manifests/; `pipelines/compile.py --image` overrides `IMAGE` at compile time, and the
`serving_image` pipeline parameter overrides `SERVING_IMAGE` per run.
"""

REGISTRY = "europe-docker.pkg.dev/efcm-project/efcm"
IMAGE = f"{REGISTRY}/efcm-component:0.1.0"
SERVING_IMAGE = f"{REGISTRY}/efcm-serving:0.1.0"
SERVING_CPU_IMAGE = f"{REGISTRY}/efcm-serving-cpu:0.1.0"

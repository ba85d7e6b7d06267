"""The torch-free serving image (docker/Dockerfile, target `serving-cpu`): no torch in it, the
CPU runtime's stack (ONNX Runtime, kserve, OpenSlide, OpenCV) importable, the `serving` image's
entry point, user and ports, the INT8 runtime by default, and under the issue's size goal.

Then a slide served through it as the CPU overlay's InferenceService runs it (its image, its
`EFCM_RUNTIME`, every setting read from the rendered manifest by `run_as_kserve`, as for the
serving image): the INT8 student's answer has the torch runtime's label and probabilities within
the INT8 parity bound of `efcm predict` on the host (torch FP32).
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import numpy as np
import pytest

from efcm.deploy.render import CPU_RUNTIME
from efcm.limits import RUNTIME_ENV
from pipelines.render_manifests import VARIANTS
from tests import containers
from tests.conftest import ROOT
from tests.container.test_serving_container import SLIDES, mounts, rendered_isvc, served
from tests.integration.test_serving_slides import (
    _check_slide_prediction,
    _outputs,
    _png,
    _slide_input,
    efcm_predict,
    grpc,
    rest,
)

pytestmark = [pytest.mark.integration, pytest.mark.container]

__all__ = ["mounts"]  # the fixture, shared with the serving image's test

TARGET = "serving-cpu"
MAX_BYTES = 1_500_000_000  # the goal for the CPU image
INT8_MAX_PROB_DIFF = 0.02  # the INT8 parity bound of the issue (per-slide probabilities)
_NO_TORCH = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"


def _python(image: str, code: str, check: bool = True):
    return containers.cli("run", "--rm", "--entrypoint", "python", image, "-c", code, check=check)


def test_there_is_no_torch_in_it(images):
    proc = _python(images[TARGET], _NO_TORCH, check=False)
    assert proc.returncode == 0, f"torch is importable in {images[TARGET]}: {proc.stderr}"
    # the same probe sees the torch of the serving image: it can fail
    assert _python(images["serving"], _NO_TORCH, check=False).returncode == 1


def test_the_cpu_runtime_stack_imports(images):
    code = (
        "import cv2, kserve, onnxruntime, openslide; "
        "print(onnxruntime.get_available_providers()); print(openslide.__library_version__)"
    )
    providers, openslide_version = _python(images[TARGET], code).stdout.splitlines()
    assert "CPUExecutionProvider" in providers
    assert openslide_version.split(".")[0].isdigit()


def test_efcm_help_runs(images):
    out = containers.cli("run", "--rm", "--entrypoint", "efcm", images[TARGET], "--help").stdout
    assert "serve" in out and "predict" in out


def test_it_is_small_labelled_and_started_like_the_serving_image(images, image_record):
    sizes = {i["target"]: i["bytes"] for i in image_record["images"]}
    assert sizes[TARGET] < MAX_BYTES, f"{TARGET} is {sizes[TARGET] / 1e9:.2f} GB"

    cpu, torch = containers.image_config(images[TARGET]), containers.image_config(images["serving"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cpu["Labels"]["org.opencontainers.image.version"] == version
    assert images[TARGET].endswith(f"/efcm-{TARGET}:{version}")
    assert cpu["User"] == "10001:10001"
    for key in ("Entrypoint", "Cmd", "User", "WorkingDir", "ExposedPorts"):
        assert cpu.get(key) == torch.get(key), key
    env = dict(e.split("=", 1) for e in cpu["Env"])
    assert env[RUNTIME_ENV] == CPU_RUNTIME
    assert env["EFCM_CACHE_DIR"] == dict(e.split("=", 1) for e in torch["Env"])["EFCM_CACHE_DIR"]


def cpu_isvc(image: str) -> dict:
    """The CPU overlay's InferenceService (pipelines/render_manifests.py VARIANTS["cpu"]: its
    runtime and requests) on `image`, slides allowed from SLIDES."""
    options = {k: v for k, v in VARIANTS["cpu"].items() if k != "image"}
    return rendered_isvc(image, **options)


@pytest.mark.slow
def test_a_slide_is_served_by_the_int8_runtime_as_torch_serves_it(images, mounts, tmp_path):
    """Needs the package's ONNX models (efcm export) and the serve adapter's runtimes."""
    isvc = cpu_isvc(images[TARGET])
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert {"name": RUNTIME_ENV, "value": CPU_RUNTIME} in container["env"]
    uri = f"{SLIDES}/tumour.tif"
    with served(isvc, mounts, tmp_path) as (server, box):
        out = _outputs(rest(server, [_slide_input(uri)], {"heatmap": True}))
        _check_slide_prediction(out)
        _png(base64.b64decode(out["heatmap_png"][0]))
        g = _outputs(grpc(server, [_slide_input(uri, binary=True)]))
        np.testing.assert_allclose(g["probabilities"], out["probabilities"], atol=1e-5)
        # the server process runs ONNX Runtime (PID 1: Kubernetes' command replaces the entrypoint)
        assert "onnxruntime" in box.exec("cat", "/proc/1/maps")

    package, slides = mounts
    torch_fp32 = efcm_predict(package, Path(slides) / "tumour.tif")  # the host: torch FP32
    np.testing.assert_array_equal(out["coords"], np.asarray(torch_fp32["coords"]))
    expected = np.asarray(torch_fp32["probabilities"])
    assert np.argmax(out["probabilities"][0]) == np.argmax(expected)
    np.testing.assert_allclose(out["probabilities"][0], expected, atol=INT8_MAX_PROB_DIFF)

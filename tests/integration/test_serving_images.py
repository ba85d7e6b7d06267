"""An image package served: `efcm serve` in a subprocess (a real kserve ModelServer, REST and
gRPC) with the package of the tiny multi-label chest X-ray run (`cxr_run`), called with kserve's
own clients and plain JSON: a PNG and a DICOM over REST (base64 in JSON, and the binary-data
extension) and gRPC (raw bytes), pixels, v1, and bad images answered 400 / INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from efcm.images.decode import decode_image
from efcm.inference import predict_image
from efcm.runtimes import load_runtime
from tests.integration.test_runtimes import _rest
from tests.integration.test_serving import MODEL, Server, _grpc_infer, serve_subprocess

pytestmark = pytest.mark.integration

CLASSES = ["effusion", "nodule", "cardiomegaly"]


@pytest.fixture(scope="module")
def server(cxr_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serving-images-log") / "server.log"
    with serve_subprocess(cxr_run / "package", log) as srv:
        yield srv


@pytest.fixture(scope="module")
def files(cxr_run: Path) -> dict[str, Path]:
    images = cxr_run / "data/images"
    return {"png": next(images.glob("*.png")), "dcm": next(images.glob("*.dcm"))}


def _expected(server: Server, data: bytes | np.ndarray):
    # the server's runtime is `auto`: torch here, as this suite has torch installed
    return predict_image(load_runtime(server.package, "torch"), data)


def _outputs(res) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in res.outputs}


def _check(out: dict[str, np.ndarray], expected) -> None:
    assert out["probabilities"].shape == (1, 3)
    np.testing.assert_allclose(out["probabilities"][0], expected.probabilities, atol=1e-5)
    labels = [x.decode() if isinstance(x, bytes) else x for x in out["label"].reshape(-1)]
    assert labels == expected.label


def _image_input(data: bytes | np.ndarray):
    """The `image` input: a file's raw bytes (BYTES [1], binary data) or pixels (UINT8)."""
    from kserve import InferInput

    if isinstance(data, bytes):
        inp = InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
    else:
        inp = InferInput("image", list(data.shape), "UINT8")
        inp.set_data_from_numpy(data, binary_data=True)
    return inp


def _grpc(server: Server, data: bytes | np.ndarray):
    return _grpc_infer(server, [_image_input(data)])


def _rest_binary(server: Server, data: bytes) -> dict[str, np.ndarray]:
    return _rest(server.url, [_image_input(data)])


def _rest_json(server: Server, data: bytes) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(data).decode("ascii")],
            }
        ]
    }
    return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_rest_json_answers_a_base64_file(server, files, kind):
    data = files[kind].read_bytes()
    res = _rest_json(server, data)
    assert res.status_code == 200, res.text
    body = res.json()
    out = {o["name"]: o for o in body["outputs"]}
    expected = _expected(server, data)
    np.testing.assert_allclose(out["probabilities"]["data"], expected.probabilities, atol=1e-5)
    assert out["label"]["data"] == expected.label and out["label"]["shape"] == [len(expected.label)]
    assert json.loads(body["parameters"]["label"]) == expected.label


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_rest_binary_and_grpc_answer_the_raw_file(server, files, kind):
    data = files[kind].read_bytes()
    expected = _expected(server, data)
    _check(_rest_binary(server, data), expected)
    _check(_outputs(_grpc(server, data)), expected)


def test_grpc_answers_pixels_as_the_file(server, files):
    data = files["png"].read_bytes()
    grey = decode_image(data, "png", max_pixels=10**8, min_side=16)
    expected = _expected(server, data)
    _check(_outputs(_grpc(server, grey)), expected)
    _check(_outputs(_grpc(server, np.repeat(grey[..., None], 3, axis=2))), expected)


def test_v1_answers_b64_files_and_pixels(server, files):
    png, dcm = (files[k].read_bytes() for k in ("png", "dcm"))
    grey = decode_image(png, "png", max_pixels=10**8, min_side=16)
    instances = [
        {"image": {"b64": base64.b64encode(png).decode()}},
        {"image": {"b64": base64.b64encode(dcm).decode()}},
        {"image": grey.tolist()},
    ]
    res = httpx.post(
        f"{server.url}/v1/models/{MODEL}:predict", json={"instances": instances}, timeout=30
    )
    assert res.status_code == 200, res.text
    preds = res.json()["predictions"]
    for pred, data in zip(preds, (png, dcm, png), strict=True):
        expected = _expected(server, data)
        assert pred["classes"] == CLASSES and pred["label"] == expected.label
        np.testing.assert_allclose(pred["probabilities"], expected.probabilities, atol=1e-5)
        assert "attention" not in pred


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"this is not an image", "input 'image': not an image (PNG, JPEG, TIFF or DICOM)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "input 'image'"),
        (b"DICM" * 40, "input 'image'"),
    ],
    ids=["text", "truncated-png", "not-dicom"],
)
def test_a_bad_image_is_400_over_rest_and_invalid_argument_over_grpc(server, files, body, message):
    import grpc

    res = _rest_json(server, body)
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]
    with pytest.raises(grpc.RpcError) as err:
        _grpc(server, body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'image'" in err.value.details()
    assert _rest_json(server, files["png"].read_bytes()).status_code == 200  # still serving


def _v2_body(name: str, shape: list[int], datatype: str, data: list) -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


MALFORMED = {
    "not-base64": (_v2_body("image", [1], "BYTES", ["%%%"]), "is text but not base64"),
    "features": (
        _v2_body("features", [1, 4], "FP32", [0.0, 1.0, 2.0, 3.0]),
        "is for a slide package; this is an image package",
    ),
    "two-channels": (
        _v2_body("image", [2, 2, 2], "UINT8", [0] * 8),
        "UINT8 [H, W, 3] RGB or [H, W] grey",
    ),
    "fp32": (_v2_body("image", [1], "FP32", [1.0]), "has datatype FP32"),
}


@pytest.mark.parametrize(("body", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_image_requests_are_400_naming_the_problem(server, body, message):
    res = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]


def test_metadata_declares_the_image_input(server):
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()
    assert meta["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [1]},
        {"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]},
    ]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"]["shape"] == [1, 3] and outputs["label"]["shape"] == [-1]


def test_a_cpu_server_without_torch_serves_an_image_package(cxr_run, files, tmp_path):
    """The serving-cpu image's case: torch cannot be imported (an import blocker), `auto` picks
    the package's INT8 runtime, and a PNG and a DICOM are answered as the torch FP32 model answers
    them (within the INT8 parity rule's 0.02); no torch module is ever imported."""
    from efcm.models.package import load_package
    from efcm.runtimes.torch_runtime import TorchRuntime
    from tests.integration.test_runtimes import BLOCKED, _blocked_env, _imports_of_torch

    env, record = _blocked_env(tmp_path)
    env["EFCM_RUNTIME"] = "auto"
    torch_fp32 = TorchRuntime(load_package(cxr_run / "package"), cpu_bf16=False)
    with serve_subprocess(cxr_run / "package", tmp_path / "server.log", [], env) as srv:
        assert "'runtime': 'int8'" in srv.log.read_text()
        for kind in ("png", "dcm"):
            data = files[kind].read_bytes()
            out = _outputs(_grpc(srv, data))
            want = predict_image(torch_fp32, data)
            np.testing.assert_allclose(out["probabilities"][0], want.probabilities, atol=0.02)
    assert _imports_of_torch(record) == []
    modules = (tmp_path / "sys_modules.txt").read_text().split()
    assert "onnxruntime" in modules and "pydicom" in modules
    assert not [m for m in modules if m.split(".")[0] in BLOCKED]

"""The served model: `efcm serve` in a subprocess (real kserve ModelServer, REST + gRPC), called
with kserve's own clients (v2) and plain JSON (v1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from efcm.config import params_from_dict
from efcm.inference import predict_features
from efcm.models.package import load_package
from efcm.runtimes import load_runtime
from tests import packages, processes
from tests.conftest import tiny_params_dict

pytestmark = pytest.mark.integration

DIM = 64  # the demo package's feature width (its teacher's): checked by the `package` fixture
MODEL = "efcm"


def build_package(out: Path, dim: int = DIM) -> Path:
    """A real package of `dim`-d features, made by hand in well under a second (random tiny
    student and fold CLAMs, see `tests.packages`), for tests that need a given width."""
    return packages.build_package(out, params_from_dict(tiny_params_dict()), dim)


def faulty_package(package: Path, out: Path) -> Path:
    """A copy of `package` whose model.json carries a wrong-typed field that loading never reads:
    `patch.fail_on` (a batch setting, not part of the geometry the loader checks) as a number.
    The server starts and serves features; every slide request fails on the server's side, when
    the patch settings are validated."""
    shutil.copytree(package, out)
    meta = json.loads((out / "model.json").read_text())
    meta["patch"]["fail_on"] = 5
    (out / "model.json").write_text(json.dumps(meta))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _efcm_cmd() -> list[str]:
    script = Path(sys.executable).with_name("efcm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "efcm.cli"]


@dataclass
class Server:
    url: str
    grpc: str
    package: Path
    log: Path
    pid: int = 0


@pytest.fixture(scope="module")
def package(demo_package: Path) -> Path:
    """The package the demo stages export (Retrain CLAM's fold ensemble)."""
    assert load_package(demo_package).feature_dim == DIM
    return demo_package


@contextlib.contextmanager
def serve_subprocess(
    package: Path,
    log: Path,
    extra_args: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """`efcm serve package` on free ports until the block exits; waits until it is ready."""
    http_port, grpc_port = _free_port(), _free_port()
    cmd = [
        *_efcm_cmd(),
        "serve",
        str(package),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--model-name",
        MODEL,
        *extra_args,
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"efcm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"efcm serve not ready after 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(url, f"127.0.0.1:{grpc_port}", package, log, proc.pid)
    finally:
        processes.stop(proc)


@pytest.fixture(scope="module")
def server(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serving-log") / "server.log"
    with serve_subprocess(package, log) as srv:
        yield srv


def _bag(n: int = 7, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _v2_infer(server: Server, x: np.ndarray, datatype: str = "FP32", *, binary: bool = False):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        inp = InferInput("features", list(x.shape), datatype)
        inp.set_data_from_numpy(x, binary_data=binary)
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            return await client.infer(server.url, InferRequest(MODEL, [inp]), model_name=MODEL)
        finally:
            await client.close()

    return asyncio.run(call())


def _v2_json(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)


def _v1(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{MODEL}:predict", json=body, timeout=30)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_infer_returns_probabilities_and_attention_equal_to_core(server, binary):
    x = _bag(7)
    res = _v2_infer(server, x, binary=binary)
    out = {o.name: o for o in res.outputs}
    probs, attn = out["probabilities"].as_numpy(), out["attention"].as_numpy()
    assert out["probabilities"].datatype == "FP32" and out["attention"].datatype == "FP32"
    assert probs.shape == (1, 2) and attn.shape == (7,)
    assert probs.sum() == pytest.approx(1, abs=1e-5)
    assert attn.sum() == pytest.approx(1, abs=1e-5)
    expected = predict_features(load_runtime(server.package, "torch"), x)
    np.testing.assert_allclose(probs[0], expected.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attn, expected.attention, rtol=1e-5, atol=1e-6)
    assert res.parameters["label"] == expected.label


def test_v2_accepts_fp16_binary_features(server):
    x = _bag(5).astype(np.float16)
    out = {o.name: o.as_numpy() for o in _v2_infer(server, x, "FP16", binary=True).outputs}
    expected = predict_features(load_runtime(server.package, "torch"), x.astype(np.float32))
    np.testing.assert_allclose(out["probabilities"][0], expected.probabilities, atol=1e-5)


def test_grpc_infer_matches_rest(server):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    x = _bag(6, seed=3)

    async def call():
        inp = InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        client = InferenceGRPCClient(server.grpc, timeout=30)
        try:
            return await client.infer(InferRequest(MODEL, [inp]))
        finally:
            await client.close()

    grpc_out = {o.name: o.as_numpy() for o in asyncio.run(call()).outputs}
    rest_out = {o.name: o.as_numpy() for o in _v2_infer(server, x).outputs}
    np.testing.assert_allclose(grpc_out["probabilities"], rest_out["probabilities"], atol=1e-6)
    np.testing.assert_allclose(grpc_out["attention"], rest_out["attention"], atol=1e-6)


def test_v1_json_predictions(server):
    bags = [_bag(4, seed=1), _bag(9, seed=2)]
    res = _v1(server, {"instances": [{"features": b.tolist()} for b in bags]})
    assert res.status_code == 200, res.text
    preds = res.json()["predictions"]
    assert len(preds) == 2
    pkg = load_runtime(server.package, "torch")
    for bag, pred in zip(bags, preds, strict=True):
        expected = predict_features(pkg, bag)
        assert pred["label"] == expected.label
        assert len(pred["attention"]) == len(bag)
        np.testing.assert_allclose(pred["probabilities"], expected.probabilities, atol=1e-6)
        np.testing.assert_allclose(pred["attention"], expected.attention, atol=1e-6)


def test_v2_metadata_declares_the_features_input(server):
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()
    inputs = {i["name"]: i for i in meta["inputs"]}
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert inputs["features"] == {"name": "features", "datatype": "FP32", "shape": [-1, DIM]}
    size = load_package(server.package).meta["patch"]["patch_size"]
    assert inputs["patches"] == {
        "name": "patches",
        "datatype": "UINT8",
        "shape": [-1, size, size, 3],
    }
    assert inputs["slide_uri"] == {"name": "slide_uri", "datatype": "BYTES", "shape": [1]}
    assert outputs["probabilities"]["shape"] == [1, 2]
    assert outputs["attention"]["shape"] == [-1]
    assert outputs["label"]["datatype"] == outputs["heatmap_png"]["datatype"] == "BYTES"
    assert outputs["coords"] == {"name": "coords", "datatype": "INT64", "shape": [-1, 2]}
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=10).json()["ready"]


def _features(x, datatype="FP32", shape=None, name="features") -> dict:
    arr = np.asarray(x)
    return {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape) if shape is None else shape,
                "data": arr.reshape(-1).tolist(),
            }
        ]
    }


BAD_REQUESTS = {
    "v2-wrong-width": ("v2", _features(_bag(3, dim=DIM + 1))),
    "v2-wrong-rank": ("v2", _features(_bag(1).reshape(-1))),
    "v2-rank-3": ("v2", _features(_bag(4).reshape(2, 2, DIM))),
    "v2-int32": ("v2", _features(np.ones((3, DIM), np.int32), "INT32")),
    "v2-fp64": ("v2", _features(_bag(3).astype(np.float64), "FP64")),
    "v2-empty-bag": ("v2", _features(np.zeros((0, DIM), np.float32))),
    "v2-data-shorter-than-shape": ("v2", _features(_bag(2), shape=[3, DIM])),
    "v2-missing-input": ("v2", _features(_bag(3), name="pixels")),
    "v2-no-inputs": ("v2", {"id": "x"}),
    "v1-wrong-width": ("v1", {"instances": [{"features": _bag(2, dim=5).tolist()}]}),
    "v1-empty-bag": ("v1", {"instances": [{"features": []}]}),
    "v1-strings": ("v1", {"instances": [{"features": [["a"] * DIM]}]}),
    "v1-no-instances": ("v1", {"features": _bag(2).tolist()}),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_request_is_400_naming_the_shape_and_server_keeps_serving(server, case):
    protocol, body = BAD_REQUESTS[case]
    res = (_v2_json if protocol == "v2" else _v1)(server, body)
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    if case != "v2-no-inputs":  # rejected by kserve's request schema, before the model
        assert f"[N, {DIM}]" in error, error
    assert "Traceback" not in res.text
    assert _v1(server, {"instances": [{"features": _bag(3).tolist()}]}).status_code == 200


def test_nan_features_are_400(server):
    x = _bag(3)
    x[1, 2] = np.nan
    with pytest.raises(httpx.HTTPStatusError) as err:
        _v2_infer(server, x, binary=True)
    assert err.value.response.status_code == 400
    assert "NaN" in err.value.response.json()["error"]
    # v1 JSON with a NaN literal
    body = '{"instances": [{"features": [[NaN' + ", 0" * (DIM - 1) + "]]}]}"
    res = httpx.post(
        f"{server.url}/v1/models/{MODEL}:predict",
        content=body,
        headers={"content-type": "text/plain"},
        timeout=30,
    )
    assert res.status_code == 400 and "NaN" in res.json()["error"], res.text


def test_slide_input_is_refused_unless_allowed(server):
    res = _v1(server, {"instances": [{"slide_uri": "/etc/passwd"}]})
    assert res.status_code == 403
    assert "disabled" in res.json()["error"]


def test_unloadable_package_fails_at_startup_with_one_line(tmp_path, package):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in package.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with (bad / "clam_fold_0.pt").open("ab") as fh:
        fh.write(b"tampered")
    proc = subprocess.run(
        [
            *_efcm_cmd(),
            "serve",
            str(bad),
            "--http-port",
            str(_free_port()),
            "--grpc-port",
            str(_free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _grpc_infer(server: Server, inputs):
    from kserve import InferenceGRPCClient, InferRequest

    async def call():
        client = InferenceGRPCClient(server.grpc, timeout=30)
        try:
            return await client.infer(InferRequest(MODEL, inputs))
        finally:
            await client.close()

    return asyncio.run(call())


def test_a_bad_tensor_is_invalid_argument_over_grpc_as_400_over_rest(server):
    import grpc
    from kserve import InferInput

    x = _bag(3, dim=DIM + 1)
    inp = InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(grpc.RpcError) as err:
        _grpc_infer(server, [inp])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"[N, {DIM}]" in err.value.details() and f"[3, {DIM + 1}]" in err.value.details()
    res = _v2_json(server, _features(x))
    assert res.status_code == 400 and res.json()["error"] == err.value.details()


def test_v2_binary_data_short_of_the_declared_shape_is_400(server):
    # kserve decodes the binary part before the model sees it (efcm.serving._kserve)
    header = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [3, DIM],
                "parameters": {"binary_data_size": 2 * DIM * 4},
            }
        ]
    }
    head = json.dumps(header).encode()
    res = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=head + _bag(2).tobytes(),
        headers={
            "inference-header-content-length": str(len(head)),
            "content-type": "application/octet-stream",
        },
        timeout=30,
    )
    assert res.status_code == 400, res.text
    assert "do not match the inputs' shapes" in res.json()["error"]


@pytest.fixture(scope="module")
def faulty_server(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`efcm serve` of `faulty_package(package)`, slide input allowed under `<base>/slides`
    (one synthetic slide there, `s.tif`)."""
    from efcm.slides.synthetic import SlideSpec, write_slide

    base = tmp_path_factory.mktemp("faulty")
    write_slide(base / "slides" / "s.tif", SlideSpec(1024, 1024, mpp=1.0, levels=2, seed=1))
    bad = faulty_package(package, base / "package")
    args = ["--allow-slides", str(base / "slides")]
    with serve_subprocess(bad, base / "server.log", args) as srv:
        yield srv


def test_a_server_fault_is_a_500_with_a_request_id_and_no_internals(faulty_server):
    import re

    import grpc
    from kserve import InferInput

    slide = str(faulty_server.package.parent / "slides" / "s.tif")
    v1 = _v1(faulty_server, {"instances": [{"slide_uri": slide}]})
    v2 = _v2_json(
        faulty_server,
        {"inputs": [{"name": "slide_uri", "datatype": "BYTES", "shape": [1], "data": [slide]}]},
    )
    uri = InferInput("slide_uri", [1], "BYTES")
    uri.set_data_from_numpy(np.array([slide.encode()], dtype=object), binary_data=True)
    with pytest.raises(grpc.RpcError) as rpc:
        _grpc_infer(faulty_server, [uri])
    assert rpc.value.code() == grpc.StatusCode.INTERNAL
    answers = [v1.json()["error"], v2.json()["error"], rpc.value.details()]
    assert (v1.status_code, v2.status_code) == (500, 500)
    ids = [re.fullmatch(r"internal error \(request id ([0-9a-f]{16})\)", a) for a in answers]
    assert all(ids), answers
    log = faulty_server.log.read_text()
    for m in ids:  # each fault is in the server's log, with its traceback, under its id
        assert f"request id {m.group(1)}" in log
    assert "Traceback" in log and "fail_on" in log
    # features requests never read the broken field: the server keeps serving them
    assert _v1(faulty_server, {"instances": [{"features": _bag(3).tolist()}]}).status_code == 200

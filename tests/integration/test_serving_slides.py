"""Serving for real use: slide URIs (local allowed roots, the real CMU-1-Small-Region.svs, gs:// via
gcp-storage-emulator), patch pixels and features, over REST (kserve's InferenceRESTClient) and gRPC
(InferenceGRPCClient) against `efcm serve` in a subprocess; and every refusal with its status.

The package is the one the demo pipeline exports (the `demo_package` fixture: its stages run on the
tiny demo data: a test_vit teacher, the distilled test_resnet VFD student with 64-d output, 64 px
patches at 1 um/px, the Retrain CLAM head).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from efcm.features import embed_batches
from efcm.models.package import load_package
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide
from tests import gcs
from tests.conftest import SHARED_DATA
from tests.geojson_check import check_attention_geojson
from tests.integration.test_serving import (
    MODEL,
    Server,
    _efcm_cmd,
    serve_subprocess,
)

pytestmark = pytest.mark.integration

MAX_REQUEST_BYTES = 8 << 20
MAX_PATCHES = 2_000
DIM = 64  # the demo package's feature width (its teacher's): checked by the `env` fixture
CMU = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"


class Env:
    def __init__(self, root: Path, bucket: gcs.Bucket, cache: Path, server: Server) -> None:
        self.root, self.bucket, self.cache, self.server = root, bucket, cache, server


@pytest.fixture(scope="module")
def env(tmp_path_factory, gcs_emulator, demo_package):
    base = tmp_path_factory.mktemp("serving-slides")
    root = base / "slides"
    write_slide(root / "tumour.tif", SlideSpec(1536, 1536, mpp=0.5, levels=2, tumour=True, seed=3))
    write_slide(root / "blank.tif", SlideSpec(1024, 1024, mpp=0.5, levels=2, tissue=False))
    write_slide(root / "no_mpp.tif", SlideSpec(1024, 1024, mpp=None, levels=2, seed=4))
    (root / "zero.svs").write_bytes(b"")
    (root / "random.svs").write_bytes(np.random.default_rng(0).bytes(200_000))
    (base / "secret.tif").write_text("root:x:0:0:secret-contents")
    (root / "escape.tif").symlink_to(base / "secret.tif")
    bucket = gcs.create_bucket(gcs_emulator, f"efcm-serve-{uuid.uuid4().hex[:10]}")
    bucket.upload_file(root / "tumour.tif", "slides/tumour.tif")
    cache = base / "cache"
    server_env = {
        "STORAGE_EMULATOR_HOST": gcs_emulator.url,
        **gcs.EMULATOR_ENV,
        "EFCM_CACHE_DIR": str(cache),
        "EFCM_SLIDE_URI_PREFIXES": bucket.uri("slides/"),
        "EFCM_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "EFCM_MAX_PATCHES": str(MAX_PATCHES),
    }
    package = demo_package
    assert load_package(package).feature_dim == DIM
    args = ["--allow-slides", str(root), "--allow-slides", str(SHARED_DATA / "wsi")]
    with serve_subprocess(package, base / "server.log", args, server_env) as server:
        yield Env(root, bucket, cache, server)


# -- clients --------------------------------------------------------------------------------------


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool = True):
    from kserve import InferInput

    inp = InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def _slide_input(uri: str, binary: bool = False):
    return _input("slide_uri", np.array([uri.encode()], dtype=object), "BYTES", binary)


def rest(server: Server, inputs, parameters=None):
    from kserve import InferenceRESTClient, InferRequest, RESTConfig

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
        try:
            req = InferRequest(MODEL, inputs, parameters=parameters)
            return await client.infer(server.url, req, model_name=MODEL)
        finally:
            await client.close()

    return asyncio.run(call())


def grpc(server: Server, inputs, parameters=None):
    from kserve import InferenceGRPCClient, InferRequest

    async def call():
        client = InferenceGRPCClient(server.grpc, timeout=120)
        try:
            return await client.infer(InferRequest(MODEL, inputs, parameters=parameters))
        finally:
            await client.close()

    return asyncio.run(call())


def _outputs(res) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in res.outputs}


def _png(data) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.ndim == 3 and min(img.shape[:2]) > 16
    return img


def efcm_predict(package: Path, slide: Path, *options: str) -> dict:
    proc = subprocess.run(
        [*_efcm_cmd(), "predict", str(package), str(slide), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_slide_prediction(out: dict[str, np.ndarray]) -> None:
    probs, attn, coords = out["probabilities"], out["attention"], out["coords"]
    assert probs.shape == (1, 2) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert attn.ndim == 1 and len(attn) == len(coords) > 0 and coords.shape[1] == 2
    assert attn.sum() == pytest.approx(1, abs=1e-4)


# -- slide URIs -----------------------------------------------------------------------------------


def test_synthetic_slide_uri_over_rest_and_grpc_with_heatmap(env):
    uri = str(env.root / "tumour.tif")
    params = {"heatmap": True, "heatmap_size": 800, "geojson": True}
    res = rest(env.server, [_slide_input(uri)], params)
    out = _outputs(res)
    _check_slide_prediction(out)
    assert out["label"][0] in ("normal", "tumour", b"normal", b"tumour")
    assert res.parameters["n_patches"] == len(out["attention"])
    # a square slide: 800 px high, its legend band under it (REST: base64 text)
    assert _png(base64.b64decode(out["heatmap_png"][0])).shape[0] == 800
    dims = (1536, 1536)
    check_attention_geojson(out["heatmap_geojson"][0], out["coords"], None, out["attention"], dims)
    g = grpc(env.server, [_slide_input(uri, binary=True)], params)
    gout = _outputs(g)
    np.testing.assert_allclose(gout["probabilities"], out["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(gout["coords"], out["coords"])
    assert _png(gout["heatmap_png"][0]).shape[0] == 800  # gRPC: the PNG bytes
    gjson = gout["heatmap_geojson"][0]
    assert isinstance(gjson, bytes)  # gRPC: the JSON text's bytes
    check_attention_geojson(gjson, gout["coords"], None, gout["attention"], dims)
    timings = json.loads(res.parameters["timings"])
    assert {"download", "patching", "features", "clam", "heatmap", "geojson"} <= set(timings)
    plain = _outputs(rest(env.server, [_slide_input(uri)]))  # neither asked for: neither sent
    assert "heatmap_png" not in plain and "heatmap_geojson" not in plain


def test_real_svs_slide_uri(env, shared_data, tmp_path):
    res = rest(env.server, [_slide_input(str(CMU))], {"heatmap": True})
    out = _outputs(res)
    _check_slide_prediction(out)
    # 2220 x 2967 px: the default heatmap is 1024 px high, the slide drawn above its legend
    assert max(_png(base64.b64decode(out["heatmap_png"][0])).shape[:2]) == 1024
    png, geo = tmp_path / "cmu.png", tmp_path / "cmu.geojson"
    local = efcm_predict(
        env.server.package,
        CMU,
        "--heatmap",
        str(png),
        "--heatmap-size",
        "1500",
        "--geojson",
        str(geo),
    )
    assert local["n_patches"] == len(out["attention"])
    np.testing.assert_allclose(out["probabilities"][0], local["probabilities"], atol=1e-5)
    assert _png(png.read_bytes()).shape[0] == 1500
    attention = np.asarray(local["attention"])  # rounded to 6 places in the printed JSON
    doc = json.loads(geo.read_text())
    raw = [f["properties"]["measurements"]["attention"] for f in doc["features"]]
    np.testing.assert_allclose(raw, attention, atol=1e-6)
    check_attention_geojson(doc, np.asarray(local["coords"]), None, np.asarray(raw), (2220, 2967))


def test_features_and_patches_give_the_probabilities_of_efcm_predict(env):
    slide = env.root / "tumour.tif"
    local = efcm_predict(env.server.package, slide)
    pkg = load_package(env.server.package)
    from efcm.config import PatchParams

    with open_slide(slide) as s:
        plan = plan_patches(s, PatchParams.model_validate(pkg.meta["patch"]))
    np.testing.assert_array_equal(plan.coords, np.asarray(local["coords"]))
    g = plan.geometry
    sp = SlidePatches(
        str(slide),
        CoordsFile(plan.coords, g.patch_level, g.read_size, g.patch_size, "s", g.step0, g.size0),
    )
    patches = sp.read_batch(range(len(sp)))  # uint8 [N, 64, 64, 3]
    sp.close()
    import torch

    feats = embed_batches(pkg.encoder, [torch.from_numpy(patches)])
    assert feats.shape == (len(patches), DIM)
    expected = np.asarray(local["probabilities"])
    for call, name, arr, dtype in (
        (grpc, "patches", patches, "UINT8"),
        (rest, "patches", patches, "UINT8"),
        (grpc, "features", feats, "FP32"),
        (rest, "features", feats, "FP32"),
    ):
        out = _outputs(call(env.server, [_input(name, arr, dtype)]))
        np.testing.assert_allclose(out["probabilities"][0], expected, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(out["attention"], local["attention"], atol=1e-5)


def test_gs_slide_is_downloaded_once_then_served_from_the_cache(env):
    uri = env.bucket.uri("slides/tumour.tif")
    first = rest(env.server, [_slide_input(uri)])
    second = rest(env.server, [_slide_input(uri)])
    assert first.parameters["downloaded_bytes"] > 0
    assert second.parameters["downloaded_bytes"] == 0
    np.testing.assert_allclose(
        _outputs(first)["probabilities"], _outputs(second)["probabilities"], atol=1e-6
    )
    local = _outputs(rest(env.server, [_slide_input(str(env.root / "tumour.tif"))]))
    np.testing.assert_allclose(_outputs(first)["probabilities"], local["probabilities"], atol=1e-5)
    assert (env.cache / "gcs" / env.bucket.name / "slides" / "tumour.tif").is_file()


# -- refusals -------------------------------------------------------------------------------------


def _v2(server: Server, body: dict | bytes) -> httpx.Response:
    url = f"{server.url}/v2/models/{MODEL}/infer"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN as a literal
    return httpx.post(
        url, content=content, headers={"content-type": "application/json"}, timeout=60
    )


def _uri_body(uri: str) -> dict:
    return {"inputs": [{"name": "slide_uri", "datatype": "BYTES", "shape": [1], "data": [uri]}]}


def _tensor(name: str, arr: np.ndarray, datatype: str, shape=None) -> dict:
    data = arr.reshape(-1).tolist()
    shape = list(arr.shape) if shape is None else shape
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


def _nan_bag() -> np.ndarray:
    x = np.zeros((3, DIM), np.float32)
    x[1, 1] = np.nan
    return x


def _refusals(env: Env) -> dict[str, tuple[dict | bytes, int, str]]:
    root = env.root
    return {
        "outside-allow-list-gs": (_uri_body("gs://other-bucket/slides/a.svs"), 403, "outside"),
        "outside-allow-list-local": (_uri_body(str(root.parent / "secret.tif")), 403, "outside"),
        "dotdot-escape": (_uri_body(f"{root}/../secret.tif"), 403, "outside"),
        "gs-dotdot": (_uri_body(env.bucket.uri("slides/../private/a.svs")), 403, "'..'"),
        "symlink-out-of-root": (_uri_body(str(root / "escape.tif")), 403, "outside"),
        "file-scheme": (_uri_body("file:///etc/passwd"), 403, "scheme 'file'"),
        "http-url": (_uri_body("http://127.0.0.1:1/slide.svs"), 403, "scheme 'http'"),
        "zero-byte-slide": (_uri_body(str(root / "zero.svs")), 400, "empty file"),
        "random-bytes-slide": (_uri_body(str(root / "random.svs")), 400, "not a slide format"),
        "no-tissue-slide": (_uri_body(str(root / "blank.tif")), 400, "no tissue"),
        "no-mpp-slide": (_uri_body(str(root / "no_mpp.tif")), 400, "no mpp"),
        "missing-slide": (_uri_body(str(root / "missing.svs")), 400, "not found"),
        "heatmap-size-too-small": (
            {**_uri_body(str(root / "tumour.tif")), "parameters": {"heatmap_size": 10}},
            400,
            "'heatmap_size' must be from 64 to 8192",
        ),
        "heatmap-size-not-a-number": (
            {**_uri_body(str(root / "tumour.tif")), "parameters": {"heatmap_size": "big"}},
            400,
            "'heatmap_size' must be a whole number",
        ),
        "too-large-request": (b"{" + b" " * (MAX_REQUEST_BYTES + 10) + b"}", 413, "limit"),
        "too-many-patches": (
            _tensor("features", np.zeros((MAX_PATCHES + 1, DIM)), "FP32"),
            413,
            "limit",
        ),
        "features-wrong-dtype": (
            _tensor("features", np.ones((3, DIM), np.int32), "INT32"),
            400,
            "INT32",
        ),
        "patches-wrong-dtype": (_tensor("patches", np.zeros((1, 64, 64, 3)), "FP32"), 400, "UINT8"),
        "features-wrong-rank": (
            _tensor("features", np.zeros((2, 3, DIM)), "FP32"),
            400,
            f"[N, {DIM}]",
        ),
        "patches-wrong-rank": (
            _tensor("patches", np.zeros((64, 64, 3), np.uint8), "UINT8"),
            400,
            "[N, 64, 64, 3]",
        ),
        "nan-features": (_tensor("features", _nan_bag(), "FP32"), 400, "NaN"),
        "empty-bag": (_tensor("features", np.zeros((0, DIM)), "FP32"), 400, "empty bag"),
        "empty-patches": (
            _tensor("patches", np.zeros((0, 64, 64, 3), np.uint8), "UINT8"),
            400,
            "empty",
        ),
    }


def test_refusals_have_their_status_and_the_server_keeps_serving(env):
    results = {}
    for case, (body, status, words) in _refusals(env).items():
        res = _v2(env.server, body)
        error = res.json().get("error", "")
        results[case] = (res.status_code, error)
        assert res.status_code == status, (case, res.status_code, res.text)
        assert words in error, (case, error)
        assert "secret-contents" not in res.text and "Traceback" not in res.text, case
    assert httpx.get(f"{env.server.url}/v2/health/ready", timeout=10).status_code == 200
    ok = rest(env.server, [_input("features", np.ones((4, DIM), np.float32), "FP32")])
    assert _outputs(ok)["probabilities"].shape == (1, 2)


def test_grpc_refusals_carry_grpc_status_codes(env):
    import grpc as grpc_lib

    S = grpc_lib.StatusCode
    cases = [
        ([_slide_input("file:///etc/passwd", binary=True)], S.PERMISSION_DENIED, "scheme"),
        (
            [_input("features", np.zeros((MAX_PATCHES + 1, DIM), np.float32), "FP32")],
            S.RESOURCE_EXHAUSTED,
            f"limit of {MAX_PATCHES}",
        ),
        (
            [
                _input(
                    "features",
                    np.zeros((MAX_REQUEST_BYTES // 4 // DIM + 10, DIM), np.float32),
                    "FP32",
                )
            ],
            S.RESOURCE_EXHAUSTED,
            "larger than max",  # gRPC's own message limit, = EFCM_MAX_REQUEST_BYTES
        ),
        ([_slide_input(str(env.root / "blank.tif"), binary=True)], S.INVALID_ARGUMENT, "tissue"),
        ([_input("features", _nan_bag(), "FP32")], S.INVALID_ARGUMENT, "NaN"),
    ]
    for inputs, code, words in cases:
        with pytest.raises(grpc_lib.RpcError) as err:
            grpc(env.server, inputs)
        assert err.value.code() == code, (code, err.value)
        assert words in err.value.details(), (words, err.value.details())
    ok = grpc(env.server, [_input("features", np.ones((4, DIM), np.float32), "FP32")])
    assert _outputs(ok)["probabilities"].shape == (1, 2)

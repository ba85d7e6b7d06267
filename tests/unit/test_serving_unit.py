"""The KServe predictor in process: request parsing, the slide access policy, EFCMModel errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from efcm.export import PackageError
from efcm.serving import request as rq
from efcm.serving.policy import AccessDenied, SlideAccessPolicy
from tests.integration.test_serving import DIM, build_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def model(package):
    from efcm.serving.server import build_model

    return build_model(package, model_name="efcm")


def _infer_request(x: np.ndarray, datatype: str = "FP32", name: str = "features"):
    from kserve import InferInput, InferRequest

    inp = InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=False)
    return InferRequest("efcm", [inp])


def _predict(model, payload):
    return asyncio.run(model.predict(payload))


# -- request parsing ------------------------------------------------------------------------------


def test_v1_integral_json_numbers_are_features():
    (bag,) = rq.v1_bags({"instances": [{"features": [[1, 2], [3, 4]]}]}, 2)
    assert bag.features.dtype == np.float32 and bag.features.shape == (2, 2)


def test_v1_accepts_bare_bags_and_bytes_bodies():
    bags = rq.v1_bags(
        b'{"instances": [[[0.5, 1.0]], {"slide_uri": "gs://b/s.svs", "mpp": 0.5}]}', 2
    )
    assert isinstance(bags[0], rq.FeaturesBag)
    assert bags[1] == rq.SlideBag("gs://b/s.svs", 0.5)


@pytest.mark.parametrize(
    "body",
    [
        {"instances": []},
        {"instances": [{"patches": [[1.0]]}]},
        {"instances": [{"features": [[1.0], [1.0, 2.0]]}]},
        {"instances": [{"features": [[True, False]]}]},
        {"instances": [{"slide_uri": "gs://b/s.svs", "mpp": -1}]},
        b"not json",
    ],
)
def test_v1_malformed_bodies_name_the_expected_input(body):
    with pytest.raises(ValueError, match=r"\[N, 7\]|mpp"):
        rq.v1_bags(body, 7)


# -- access policy --------------------------------------------------------------------------------


def test_slide_access_is_off_by_default():
    with pytest.raises(AccessDenied, match="disabled"):
        SlideAccessPolicy.from_env({}).check("gs://bucket/slides/a.svs")


def test_slide_access_allows_only_listed_locations(tmp_path):
    policy = SlideAccessPolicy.from_env(
        {"EFCM_SLIDE_URI_PREFIXES": f"gs://bucket/slides, {tmp_path / 'ok'}"}
    )
    assert policy.check("gs://bucket/slides/a.svs") == "gs://bucket/slides/a.svs"
    assert policy.check(str(tmp_path / "ok" / "a.tif"))
    for uri in (
        "gs://bucket/slides-other/a.svs",
        "gs://bucket/slides/../secrets/a.svs",
        "gs://other/slides/a.svs",
        str(tmp_path / "ok" / ".." / "nok" / "a.tif"),
        "/etc/passwd",
        "http://example.com/a.svs",
    ):
        with pytest.raises(AccessDenied):
            policy.check(uri)


def test_slide_access_rejects_other_schemes_in_config():
    with pytest.raises(ValueError, match="only gs://"):
        SlideAccessPolicy.of(["s3://bucket/"])


# -- the model ------------------------------------------------------------------------------------


def test_importing_the_adapter_hides_argv_from_kserve():
    # kserve parses sys.argv on import: an ambiguous option prefix would exit the process.
    code = "import efcm.serving; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--enable", "--max"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_v2_and_v1_give_the_same_prediction(model):
    x = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    v2 = _predict(model, _infer_request(x))
    out = {o.name: np.asarray(o.data, np.float32) for o in v2.outputs}
    v1 = _predict(model, {"instances": [{"features": x.tolist()}]})["predictions"][0]
    np.testing.assert_allclose(out["probabilities"], v1["probabilities"], atol=1e-6)
    np.testing.assert_allclose(out["attention"], v1["attention"], atol=1e-6)
    assert v2.parameters["label"] == v1["label"]


@pytest.mark.parametrize(
    ("x", "datatype"),
    [
        (np.zeros((3, DIM + 1), np.float32), "FP32"),
        (np.zeros((0, DIM), np.float32), "FP32"),
        (np.full((2, DIM), np.nan, np.float32), "FP32"),
        (np.zeros((2, DIM), np.int32), "INT32"),
    ],
    ids=["width", "empty", "nan", "int32"],
)
def test_bad_features_are_invalid_input(model, x, datatype):
    from kserve.errors import InvalidInput

    with pytest.raises(InvalidInput, match=rf"\[N, {DIM}\]"):
        _predict(model, _infer_request(x, datatype))


def test_a_model_that_is_not_loaded_is_not_ready(package):
    from kserve.errors import ModelNotReady

    from efcm.serving.model import EFCMModel

    m = EFCMModel("efcm", package)
    m.start()
    assert not m.ready
    with pytest.raises(ModelNotReady):
        _predict(m, {"instances": [[[0.0] * DIM]]})


def test_missing_package_is_a_package_error(tmp_path):
    from efcm.serving.server import build_model

    with pytest.raises(PackageError, match=r"no model\.json"):
        build_model(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{")
    with pytest.raises(PackageError, match="cannot load"):
        build_model(tmp_path / "broken")


def test_slide_input_where_the_policy_allows_it(package, tmp_path):
    from kserve.errors import InvalidInput

    from efcm.serving.model import EFCMModel
    from efcm.slides.synthetic import SlideSpec, write_slide

    slide = tmp_path / "slides" / "s.tif"
    write_slide(slide, SlideSpec(1024, 1024, mpp=1.0, levels=2, seed=1))
    m = EFCMModel("efcm", package, slide_access=SlideAccessPolicy.of([str(slide.parent)]))
    m.load()
    pred = _predict(m, {"instances": [{"slide_uri": str(slide)}]})["predictions"][0]
    assert len(pred["attention"]) == len(pred["coords"]) > 0
    assert sum(pred["probabilities"]) == pytest.approx(1, abs=1e-5)
    from kserve import InferInput, InferRequest

    inp = InferInput("slide_uri", [1], "BYTES", data=[str(slide)])
    v2 = _predict(m, InferRequest("efcm", [inp], parameters={"mpp": 1.0}))
    out = {o.name: o for o in v2.outputs}
    assert out["coords"].shape == [len(pred["coords"]), 2]
    np.testing.assert_allclose(out["attention"].data, pred["attention"], atol=1e-6)
    with pytest.raises(InvalidInput, match="outside the allowed"):
        _predict(m, {"instances": [{"slide_uri": str(tmp_path / "elsewhere.tif")}]})
    with pytest.raises(InvalidInput, match="not found"):
        _predict(m, {"instances": [{"slide_uri": str(slide.parent / "missing.tif")}]})

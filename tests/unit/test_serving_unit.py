"""The KServe predictor in process: request parsing, the slide access policy, the error table,
the kserve shim and `efcm serve`'s options, EFCMModel (called as kserve calls it:
`model(body)` runs preprocess -> predict -> postprocess) and its bounded executor."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from efcm.errors import Forbidden, PackageError
from efcm.serving import request as rq
from efcm.serving.policy import SlideAccessPolicy
from tests.integration.test_serving import DIM, build_package, faulty_package


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
    """The response to `payload`, through the model's whole kserve pipeline."""
    response, _headers = asyncio.run(model(payload))
    return response


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
    with pytest.raises(Forbidden, match="disabled"):
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
        with pytest.raises(Forbidden):
            policy.check(uri)


def test_slide_access_rejects_other_schemes_in_config():
    with pytest.raises(ValueError, match="only gs://"):
        SlideAccessPolicy.of(["s3://bucket/"])


# -- the error table ------------------------------------------------------------------------------


def test_the_error_table_gives_each_client_error_its_status_and_message():
    from kserve.errors import InvalidInput as KServeInvalidInput

    from efcm.errors import Busy, Deadline, InvalidInput, InvalidSlide, InvalidTensor, TooLarge
    from efcm.serving.errors import refusal

    cases = [
        (InvalidInput("a bad request"), 400, "INVALID_ARGUMENT"),
        (InvalidTensor("features must have shape [N, 7]"), 400, "INVALID_ARGUMENT"),
        (InvalidSlide("s.svs: no tissue found", status="no_tissue"), 400, "INVALID_ARGUMENT"),
        (KServeInvalidInput("kserve's own"), 400, "INVALID_ARGUMENT"),
        (Forbidden("slide_uri '/etc/passwd': outside"), 403, "PERMISSION_DENIED"),
        (TooLarge("5 patches, over the limit of 4"), 413, "RESOURCE_EXHAUSTED"),
        (Deadline("past its time budget of 1 s"), 504, "DEADLINE_EXCEEDED"),
        (Busy("all 2 model workers are busy"), 503, "UNAVAILABLE"),
    ]
    for err, http, code in cases:
        r = refusal(err)
        assert (r.http_status, r.status_code.name, r.details) == (http, code, str(err)), err


@pytest.mark.parametrize(
    "err",
    [
        PackageError("/srv/models/pkg/clam_fold_0.pt: sha256 does not match"),
        ValueError("operands could not be broadcast together with shapes (3,) (4,)"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 65x16)"),
        KeyError("patch_size"),
    ],
    ids=["package", "value-error", "torch", "bug"],
)
def test_a_server_fault_is_a_logged_500_that_names_only_a_request_id(err, caplog):
    import re

    from efcm.serving.errors import refusal

    try:
        raise err
    except Exception as raised:
        r = refusal(raised)
    assert (r.http_status, r.status_code.name) == (500, "INTERNAL")
    match = re.fullmatch(r"internal error \(request id ([0-9a-f]{16})\)", r.details)
    assert match, r.details
    record = next(rec for rec in caplog.records if match.group(1) in rec.getMessage())
    assert record.levelname == "ERROR" and record.exc_info[1] is err  # the traceback is logged


# -- the kserve shim and efcm serve's options -----------------------------------------------------


def test_the_kserve_shim_matches_the_installed_kserve():
    import argparse

    from fastapi import FastAPI

    from efcm.serving import _kserve

    installed = _kserve.installed_version()
    assert installed == _kserve.CHECKED_VERSION, (
        f"kserve {installed} is installed, efcm.serving._kserve was checked against "
        f"{_kserve.CHECKED_VERSION}: re-check every private API listed in its docstring, then "
        "bump CHECKED_VERSION"
    )
    from kserve import model_server
    from kserve.protocol.dataplane import DataPlane

    assert isinstance(model_server.app, FastAPI)
    assert isinstance(model_server.parser, argparse.ArgumentParser)
    for field in _kserve.ARGS_FIELDS:
        assert hasattr(model_server.args, field), field
    dests = {a.dest for a in model_server.parser._actions}
    assert {"http_port", "grpc_port", "model_name", "workers", *_kserve.ARGS_FIELDS} <= dests
    assert callable(DataPlane.decode_inference_request)
    server = model_server.ModelServer(http_port=0, grpc_port=0)
    assert isinstance(server.dataplane, DataPlane)  # what start() hands the REST/gRPC servers
    # item 6: an input's binary data, which as_numpy decodes
    from kserve.protocol.infer_type import InferInput, serialize_byte_tensor

    inp = InferInput("image", [1], "BYTES")
    assert inp._raw_data is None
    inp._raw_data = serialize_byte_tensor(np.array([b"\x89PNG"], dtype=np.object_)).item()
    assert inp.as_numpy().tolist() == [b"\x89PNG"]


def test_binary_data_short_of_the_declared_shape_is_invalid_input_at_kserves_decoding():
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository

    from efcm.serving._kserve import CheckedDataPlane

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [3, DIM],
                    "parameters": {"binary_data_size": 2 * DIM * 4},
                }
            ]
        }
    ).encode()
    body = header + np.zeros((2, DIM), np.float32).tobytes()
    headers = {"inference-header-content-length": str(len(header))}
    plane = CheckedDataPlane(ModelRepository())
    with pytest.raises(InvalidInput, match="do not match the inputs' shapes"):
        plane.decode_inference_request(body, headers, "efcm")
    with pytest.raises(ValueError) as raw:  # what kserve's own data plane lets out
        super(CheckedDataPlane, plane).decode_inference_request(body, headers, "efcm")
    assert not isinstance(raw.value, InvalidInput)


def test_efcm_serve_options_are_kserves_parser_plus_efcms():
    from kserve import model_server

    from efcm.serving.server import parse_args

    args = parse_args(["pkg", "--http-port", "9000", "--max_threads", "2", "--allow-slides", "/a"])
    assert (args.package, args.http_port, args.grpc_port) == ("pkg", 9000, 8081)
    assert (args.model_name, args.max_threads, args.allow_slides) == ("efcm", 2, ["/a"])
    assert parse_args(["pkg", "--model_name", "m", "--grpc-port", "1"]).model_name == "m"
    assert model_server.parser.get_default("model_name") == "model"  # kserve's is untouched
    with pytest.raises(SystemExit):
        parse_args(["pkg", "--workers", "2"])


def test_efcm_serve_help_lists_kserves_and_efcms_options(capsys):
    from efcm.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--allow-slides" in out and "--max_threads" in out and "--http-port" in out


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["efcm.serving.model", "efcm.serving.server", "efcm.serving.errors"]
)
def test_importing_the_adapter_hides_argv_from_kserve(module):
    # kserve parses sys.argv on import: an ambiguous option prefix would exit the process.
    code = f"import {module}, sys; assert 'kserve' in sys.modules; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--enable", "--max"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_the_deploy_step_reads_the_serving_policy_without_kserve_or_torch():
    # the deploy renderer checks slide URI prefixes with efcm.serving.policy
    code = (
        "import sys, efcm.deploy.render, efcm.serving.policy, efcm.serving; "
        "print(sorted(m for m in ('kserve', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_v2_and_v1_give_the_same_prediction(model):
    x = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    v2 = _predict(model, _infer_request(x))
    out = {o.name: np.asarray(o.data, np.float32) for o in v2.outputs if o.datatype == "FP32"}
    v1 = _predict(model, {"instances": [{"features": x.tolist()}]})["predictions"][0]
    assert next(o.data for o in v2.outputs if o.name == "label") == [v1["label"]]
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
def test_bad_features_are_400_naming_the_expected_shape(model, x, datatype):
    from efcm.serving.errors import Refused

    with pytest.raises(Refused, match=rf"\[N, {DIM}\]") as err:
        _predict(model, _infer_request(x, datatype))
    assert (err.value.http_status, err.value.status_code.name) == (400, "INVALID_ARGUMENT")


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
    with pytest.raises(PackageError, match=r"model\.json: not valid JSON"):
        build_model(tmp_path / "broken")
    # any other failure to load is a PackageError too, naming the package
    (tmp_path / "broken" / "model.json").write_text('{"format": "efcm.package/2"}')
    with pytest.raises(PackageError, match="broken: cannot load the model package"):
        build_model(tmp_path / "broken")


def test_slide_input_where_the_policy_allows_it(package, tmp_path):
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
    from efcm.serving.errors import Refused

    with pytest.raises(Refused, match="outside the allowed") as err:
        _predict(m, {"instances": [{"slide_uri": str(tmp_path / "elsewhere.tif")}]})
    assert err.value.http_status == 403
    with pytest.raises(Refused, match="not found") as err:
        _predict(m, {"instances": [{"slide_uri": str(slide.parent / "missing.tif")}]})
    assert err.value.http_status == 400


# -- policy: access and limits --------------------------------------------------------------------


def test_access_resolves_symlinks_and_refuses_other_schemes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.tif").write_bytes(b"x")
    (tmp_path / "secret.tif").write_bytes(b"secret")
    (root / "link.tif").symlink_to(tmp_path / "secret.tif")
    policy = SlideAccessPolicy.of([str(root), "gs://lab-slides/"])
    assert policy.check(str(root / "sub" / ".." / "a.tif")) == str(root / "a.tif")
    for uri in (
        str(root / "link.tif"),
        str(root / ".." / "secret.tif"),
        "file:///etc/passwd",
        "http://example.com/a.svs",
        "https://lab-slides/a.svs",
        "s3://lab-slides/a.svs",
        "gs://lab-slides//a.svs",
        "gs://lab-slides-evil/a.svs",
        "relative/a.tif",
    ):
        with pytest.raises(Forbidden) as err:
            policy.check(uri)
        assert "secret" not in str(err.value).replace(uri, "")


def test_access_takes_cli_prefixes_beside_the_env(tmp_path):
    policy = SlideAccessPolicy.from_env(
        {"EFCM_SLIDE_URI_PREFIXES": "gs://a/"}, extra=[str(tmp_path)]
    )
    assert policy.prefixes == ("gs://a/", str(tmp_path.resolve()))


def test_serving_limits_from_env_with_safe_defaults():
    from efcm.limits import ServingLimits

    d = ServingLimits.from_env({})
    assert d == ServingLimits()
    assert d.max_request_bytes == 64 << 20 and d.max_patches == 100_000
    assert d.request_timeout_s == 300 and d.cache_max_bytes == 20 << 30
    lim = ServingLimits.from_env(
        {"EFCM_MAX_REQUEST_BYTES": "1000", "EFCM_MAX_PATCHES": "5", "EFCM_REQUEST_TIMEOUT_S": "2.5"}
    )
    assert (lim.max_request_bytes, lim.max_patches, lim.request_timeout_s) == (1000, 5, 2.5)
    for bad in ("0", "-1", "lots"):
        with pytest.raises(ValueError, match="EFCM_MAX_PATCHES"):
            ServingLimits.from_env({"EFCM_MAX_PATCHES": bad})


def test_runtime_settings_split_the_cores_between_the_runtime_and_the_readers():
    from efcm.limits import RuntimeSettings

    def split(cpus: int, env: dict[str, str] | None = None) -> tuple[int | None, int]:
        s = RuntimeSettings.from_env(env or {}, cpus=cpus)
        return s.threads, s.read_workers

    # the runtime takes every core; a quarter of them read beside it, 2 from 2 cores up
    assert [split(c) for c in (1, 2, 4, 16, 32)] == [(1, 1), (2, 2), (4, 2), (16, 4), (32, 8)]
    assert RuntimeSettings().read_workers == split(2)[1]
    # fewer runtime threads leave their cores to the readers
    assert split(16, {"EFCM_RUNTIME_THREADS": "10"}) == (10, 6)
    assert split(16, {"EFCM_RUNTIME_THREADS": "14"}) == (14, 4)
    assert split(2, {"EFCM_READ_WORKERS": "1"}) == (2, 1)
    with pytest.raises(ValueError, match="EFCM_READ_WORKERS"):
        RuntimeSettings.from_env({"EFCM_READ_WORKERS": "0"}, cpus=2)
    # a command line's values win over the variables, and the readers follow its threads
    env = {"EFCM_RUNTIME": "onnx", "EFCM_RUNTIME_THREADS": "16"}
    s = RuntimeSettings.from_env(env, cpus=16, runtime="int8", threads=10)
    assert (s.runtime, s.threads, s.read_workers) == ("int8", 10, 6)
    assert RuntimeSettings.from_env(env, cpus=16).runtime == "onnx"


def test_too_many_patches_and_the_time_budget_are_refused(package):
    from efcm.limits import ServingLimits
    from efcm.serving.errors import Refused
    from efcm.serving.model import EFCMModel

    m = EFCMModel("efcm", package, limits=ServingLimits(max_patches=4))
    m.load()
    with pytest.raises(Refused, match="over the limit of 4") as err:
        _predict(m, _infer_request(np.zeros((5, DIM), np.float32)))
    assert err.value.http_status == 413
    m.limits = ServingLimits(request_timeout_s=1e-9)
    with pytest.raises(Refused, match="time budget") as err:
        _predict(m, _infer_request(np.zeros((64, 64, 64, 3), np.uint8), "UINT8", "patches"))
    assert err.value.http_status == 504


# -- the gs:// cache size cap ---------------------------------------------------------------------


def _fake_staged(root: Path, name: str, size: int, age: float) -> None:
    import json
    import os
    import time

    data = root / "gcs" / "b" / name
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(b"x" * size)
    meta = root / "gcs-meta" / "b" / f"{name}.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"generation": 1, "size": size, "mtime_ns": 0}))
    use = root / "gcs-meta" / "b" / f"{name}.use"
    use.touch()
    t = time.time() - age
    os.utime(use, (t, t))


def test_cache_evicts_least_recently_used_but_never_a_slide_in_use(tmp_path):
    import fcntl

    from efcm.io.cache import SlideCache

    cache = SlideCache(tmp_path, 200)
    for name, age in (("old.svs", 30), ("mid.svs", 20), ("new.svs", 10)):
        _fake_staged(tmp_path, name, 100, age)
    with open(tmp_path / "gcs-meta" / "b" / "old.svs.use", "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # a request is reading the oldest slide
        assert cache.evict() == 100
    assert (tmp_path / "gcs" / "b" / "old.svs").exists()
    assert not (tmp_path / "gcs" / "b" / "mid.svs").exists()
    assert not (tmp_path / "gcs-meta" / "b" / "mid.svs.json").exists()
    assert (tmp_path / "gcs" / "b" / "new.svs").exists()
    assert cache.size() == 200
    assert cache.evict(100) == 100  # released: now the oldest goes
    assert not (tmp_path / "gcs" / "b" / "old.svs").exists()


# -- slide prediction: reader threads and errors --------------------------------------------------


def _slide(tmp_path: Path, name: str = "s.tif", size: int = 1024) -> Path:
    from efcm.slides.synthetic import SlideSpec, write_slide

    path = tmp_path / "slides" / name
    write_slide(path, SlideSpec(size, size, mpp=1.0, levels=2, seed=1))
    return path


def test_an_encoder_failure_stops_the_patch_readers_before_the_slide_is_closed(
    package, tmp_path, monkeypatch
):
    import dataclasses
    import threading
    import time

    import torch

    from efcm.inference import predict_slide
    from efcm.models.package import load_package
    from efcm.runtimes.torch_runtime import TorchRuntime
    from efcm.slides.patches import SlidePatches

    slide = _slide(tmp_path)
    closed = threading.Event()
    reads_after_close: list[int] = []
    read_batch, close = SlidePatches.read_batch, SlidePatches.close

    def slow_read_batch(self, indices):
        time.sleep(0.05)  # reads still in flight when the encoder fails
        if closed.is_set():
            reads_after_close.append(len(indices))
        return read_batch(self, indices)

    def recording_close(self):
        closed.set()
        close(self)

    monkeypatch.setattr(SlidePatches, "read_batch", slow_read_batch)
    monkeypatch.setattr(SlidePatches, "close", recording_close)

    class FailsOnSecondBatch(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("encoder failed on batch 2")
            return torch.zeros(len(x), DIM)

    pkg = TorchRuntime(dataclasses.replace(load_package(package), encoder=FailsOnSecondBatch()))
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="encoder failed on batch 2"):
        predict_slide(pkg, slide, batch_size=2, read_workers=2)
    readers = [
        t for t in threading.enumerate() if t not in before and t.name.startswith("efcm-read")
    ]
    assert closed.is_set()
    assert readers == []  # joined before predict_slide returned
    assert reads_after_close == []


def _corrupt_tiles(slide: Path) -> Path:
    """A slide that opens (its header and its smallest level, which OpenSlide hashes on open, are
    intact) but whose level-0 tiles in the middle are zeroed: reading them fails in libjpeg.
    Truncating the file does not give this: tifffile writes the smallest level last, so any cut
    breaks opening."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        tiles = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(slide, "r+b") as f:
        for offset, count in tiles[len(tiles) // 4 : 3 * len(tiles) // 4]:
            f.seek(offset)
            f.write(b"\0" * count)
    return slide


def test_a_slide_with_corrupt_tiles_is_invalid_input_not_a_500(package, tmp_path):
    from efcm.serving.errors import Refused
    from efcm.serving.model import EFCMModel

    slide = _corrupt_tiles(_slide(tmp_path, "corrupt.tif"))
    m = EFCMModel("efcm", package, slide_access=SlideAccessPolicy.of([str(slide.parent)]))
    m.load()
    with pytest.raises(Refused, match="corrupt or unreadable") as err:
        _predict(m, {"instances": [{"slide_uri": str(slide)}]})
    assert err.value.http_status == 400
    assert str(slide) in str(err.value) and "JPEG" not in str(err.value)


def test_efcm_predict_reports_a_corrupt_slide_in_one_line(package, tmp_path, capsys):
    from efcm.cli import main

    slide = _corrupt_tiles(_slide(tmp_path, "corrupt.tif"))
    assert main(["predict", str(package), str(slide)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("efcm predict: ") and "corrupt or unreadable slide" in err[-1]
    assert "Traceback" not in "\n".join(err)


def _gs_model(package, bucket, cache: Path, monkeypatch, limits=None):
    """A model allowed to read the emulator bucket's slides/; `EFCM_CACHE_DIR` is `cache`, where
    the model stages them."""
    from efcm.serving.model import EFCMModel

    monkeypatch.setenv("EFCM_CACHE_DIR", str(cache))
    access = SlideAccessPolicy.of([bucket.uri("slides/")])
    m = EFCMModel("efcm", package, slide_access=access, limits=limits)
    m.load()
    return m


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "corrupt-tiles"])
def test_bad_gs_slides_are_named_by_their_gs_uri_without_openslide_internals(
    package, gcs_bucket, tmp_path, monkeypatch, damage
):
    from efcm.serving.errors import Refused

    local = _slide(tmp_path, "s.tif")
    if damage == "truncated":  # the smallest level, hashed on open, loses its last bytes
        data = local.read_bytes()
        local.write_bytes(data[:-100])
    elif damage == "random-bytes":
        local.write_bytes(np.random.default_rng(0).bytes(200_000))
    else:
        _corrupt_tiles(local)
    uri = gcs_bucket.upload_file(local, "slides/s.tif")
    cache = tmp_path / "cache"
    m = _gs_model(package, gcs_bucket, cache, monkeypatch)
    with pytest.raises(Refused) as err:
        _predict(m, {"instances": [{"slide_uri": uri}]})
    assert err.value.http_status == 400
    msg = str(err.value)
    assert uri in msg
    assert (cache / "gcs" / gcs_bucket.name / "slides" / "s.tif").is_file()  # it was staged
    assert str(tmp_path) not in msg and "cache" not in msg
    assert "Short read" not in msg and "JPEG" not in msg  # OpenSlide's own text stays in the log


def test_the_servers_cache_cap_is_the_one_staging_uses(package, gcs_bucket, tmp_path, monkeypatch):
    from efcm.limits import ServingLimits, cache_max_bytes

    a, b = _slide(tmp_path, "a.tif"), _slide(tmp_path, "b.tif")
    uri_a = gcs_bucket.upload_file(a, "slides/a.tif")
    uri_b = gcs_bucket.upload_file(b, "slides/b.tif")
    cap = max(a.stat().st_size, b.stat().st_size) + 1  # room for one slide only
    cache = tmp_path / "cache"
    m = _gs_model(
        package,
        gcs_bucket,
        cache,
        monkeypatch=monkeypatch,
        limits=ServingLimits(cache_max_bytes=cap),
    )
    assert (m.cache.root, m.cache.max_bytes) == (cache, cap)
    staged = cache / "gcs" / gcs_bucket.name / "slides"
    _predict(m, {"instances": [{"slide_uri": uri_a}]})
    assert (staged / "a.tif").is_file()
    _predict(m, {"instances": [{"slide_uri": uri_b}]})
    assert (staged / "b.tif").is_file() and not (staged / "a.tif").exists()  # a made room
    assert m.cache.size() <= cap
    assert m.cache.stats.objects == 2
    # one parser of EFCM_CACHE_MAX_BYTES: the server's limits and `efcm predict` read it alike
    env = {"EFCM_CACHE_MAX_BYTES": "4096"}
    assert ServingLimits.from_env(env).cache_max_bytes == cache_max_bytes(env) == 4096
    assert ServingLimits.from_env({}).cache_max_bytes == cache_max_bytes({}) == 20 << 30
    for bad in ("0", "lots"):
        with pytest.raises(ValueError, match="EFCM_CACHE_MAX_BYTES"):
            ServingLimits.from_env({"EFCM_CACHE_MAX_BYTES": bad})


# -- model workers: one bounded executor for every kind of request -------------------------------


class _GatedSlides:
    """Stands in for predict_slide: each call blocks until `gate` is set, then runs the real one."""

    def __init__(self, monkeypatch) -> None:
        import threading

        import efcm.serving.model
        from efcm.inference import predict_slide

        self.gate, self.running = threading.Event(), threading.Semaphore(0)
        real = predict_slide

        def gated(*args, **kwargs):
            self.running.release()
            self.gate.wait()
            return real(*args, **kwargs)

        monkeypatch.setattr(efcm.serving.model, "predict_slide", gated)

    async def started(self) -> None:
        await asyncio.to_thread(self.running.acquire)


def _gated_model(package, tmp_path, monkeypatch, limits):
    """A loaded model that may read one slide, whose slide requests wait at `gated` (a
    `_GatedSlides`) until the test opens the gate; and the request for that slide."""
    from efcm.serving.model import EFCMModel

    slide = _slide(tmp_path)
    gated = _GatedSlides(monkeypatch)
    m = EFCMModel(
        "efcm", package, slide_access=SlideAccessPolicy.of([str(slide.parent)]), limits=limits
    )
    m.load()
    return m, gated, {"instances": [{"slide_uri": str(slide)}]}


def test_every_kind_of_request_shares_the_bounded_model_workers(package, tmp_path, monkeypatch):
    from efcm.limits import ServingLimits
    from efcm.serving.errors import Refused

    m, gated, slide_req = _gated_model(
        package,
        tmp_path,
        monkeypatch,
        ServingLimits(max_concurrent_slides=2, max_queued_requests=0),
    )
    features_req = {"instances": [[[0.5] * DIM] * 3]}
    size = int(m.get_input_types()[1]["shape"][1])
    patches_req = _infer_request(np.zeros((2, size, size, 3), np.uint8), "UINT8", "patches")

    async def scenario():
        first = asyncio.create_task(m(slide_req))
        try:
            await gated.started()  # one of the two workers is busy
            feats, _ = await m(features_req)  # the other one serves it
            second = asyncio.create_task(m(slide_req))
            await gated.started()  # both are busy now: every kind of request is refused at once
            refusals = []
            for req in (features_req, patches_req, slide_req):
                with pytest.raises(Refused, match="busy") as busy:
                    await m(req)
                refusals.append(busy.value)
        finally:
            gated.gate.set()  # a failing check must not leave the slides waiting forever
        return feats, refusals, [(await t)[0] for t in (first, second)]

    feats, refusals, slides = asyncio.run(scenario())
    assert len(feats["predictions"][0]["attention"]) == 3
    for busy in refusals:
        assert busy.http_status == 503 and busy.status_code.name == "UNAVAILABLE"
        assert "EFCM_MAX_CONCURRENT_SLIDES" in busy.details
        assert "EFCM_MAX_QUEUED_REQUESTS" in busy.details
    assert all(len(s["predictions"][0]["coords"]) > 0 for s in slides)
    assert m.executor.busy == 0
    assert len(_predict(m, features_req)["predictions"]) == 1  # free again


def test_a_request_waits_for_a_worker_in_the_bounded_queue(package, tmp_path, monkeypatch):
    from efcm.limits import ServingLimits
    from efcm.serving.errors import Refused

    m, gated, slide_req = _gated_model(
        package,
        tmp_path,
        monkeypatch,
        ServingLimits(max_concurrent_slides=1, max_queued_requests=1),
    )
    features_req = {"instances": [[[0.5] * DIM] * 3]}

    async def scenario():
        first = asyncio.create_task(m(slide_req))
        try:
            await gated.started()  # the one worker is busy
            waiting = asyncio.create_task(m(features_req))  # waits in the queue
            while m.executor.waiting == 0:
                await asyncio.sleep(0.001)
            assert not waiting.done()
            with pytest.raises(Refused, match="busy") as busy:  # the queue is full
                await m(features_req)
        finally:
            gated.gate.set()
        return (await waiting)[0], busy.value, (await first)[0]

    feats, busy, slide_pred = asyncio.run(scenario())
    assert len(feats["predictions"][0]["attention"]) == 3  # served once the slide was done
    assert busy.http_status == 503
    assert len(slide_pred["predictions"][0]["coords"]) > 0
    assert m.executor.busy == 0 and m.executor.waiting == 0


def test_a_slide_past_its_budget_keeps_its_worker_until_it_stops(package, tmp_path, monkeypatch):
    from efcm.limits import ServingLimits
    from efcm.serving.errors import Refused

    m, gated, slide_req = _gated_model(
        package,
        tmp_path,
        monkeypatch,
        ServingLimits(max_concurrent_slides=1, max_queued_requests=0, request_timeout_s=0.5),
    )

    async def scenario():
        try:
            with pytest.raises(Refused) as late:
                await m(slide_req)  # the worker is held at the gate past the budget
            with pytest.raises(Refused) as busy:
                await m(slide_req)  # its thread still runs: no second one is started
        finally:
            gated.gate.set()
        while m.executor.busy:  # the abandoned worker stops at its deadline check
            await asyncio.sleep(0.01)
        return late.value, busy.value

    late, busy = asyncio.run(scenario())
    assert (late.http_status, busy.http_status) == (504, 503)
    m.limits = ServingLimits(max_concurrent_slides=1)
    pred = _predict(m, slide_req)["predictions"][0]  # the worker is free again
    assert len(pred["coords"]) > 0


def test_a_v1_request_has_one_budget_and_an_instance_cap(package, tmp_path, monkeypatch):
    import efcm.serving.model
    from efcm.inference import predict_slide
    from efcm.serving.errors import Refused
    from efcm.serving.model import EFCMModel

    deadlines: list[float] = []

    def recording(*args, **kwargs):
        deadlines.append(kwargs["deadline"])
        return predict_slide(*args, **kwargs)

    monkeypatch.setattr(efcm.serving.model, "predict_slide", recording)
    slide = _slide(tmp_path)
    m = EFCMModel("efcm", package, slide_access=SlideAccessPolicy.of([str(slide.parent)]))
    m.load()
    bag = [[0.5] * DIM]
    out = _predict(m, {"instances": [{"slide_uri": str(slide)}, bag, {"slide_uri": str(slide)}]})
    assert len(out["predictions"]) == 3
    assert len(deadlines) == 2 and deadlines[0] == deadlines[1]  # one budget for the request
    with pytest.raises(Refused, match=f"{rq.MAX_V1_INSTANCES} instances") as err:
        _predict(m, {"instances": [bag] * (rq.MAX_V1_INSTANCES + 1)})
    assert err.value.http_status == 413
    out = _predict(m, {"instances": [bag] * rq.MAX_V1_INSTANCES})
    assert len(out["predictions"]) == rq.MAX_V1_INSTANCES


# -- server faults, and thread safety -------------------------------------------------------------


def test_a_package_fault_at_request_time_is_a_500_without_internals(package, tmp_path, caplog):
    # model.json's patch settings are read again by every slide request: a wrong-typed field
    # there fails on the server's side, and the client learns nothing but a request id
    from efcm.serving.errors import Refused
    from efcm.serving.model import EFCMModel

    slide = _slide(tmp_path)
    bad = faulty_package(package, tmp_path / "faulty")
    m = EFCMModel("efcm", bad, slide_access=SlideAccessPolicy.of([str(slide.parent)]))
    m.load()  # loading never reads the field
    assert len(_predict(m, {"instances": [[[0.5] * DIM] * 2]})["predictions"]) == 1
    with pytest.raises(Refused) as err:
        _predict(m, {"instances": [{"slide_uri": str(slide)}]})
    assert (err.value.http_status, err.value.status_code.name) == (500, "INTERNAL")
    assert err.value.details.startswith("internal error (request id ")
    for internal in ("fail_on", "PatchParams", "validation", str(bad), str(slide)):
        assert internal not in err.value.details
    request_id = err.value.details.rsplit(" ", 1)[-1].rstrip(")")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "fail_on" in str(logged[0].exc_info[1])
    assert m.executor.busy == 0


def test_concurrent_requests_on_an_fpd_package_answer_as_serial_ones(tmp_path):
    # one FPD student (TransScan's selective kernel included) serves every worker thread at once
    from efcm.config import FpdParams, params_from_dict
    from efcm.limits import ServingLimits
    from efcm.serving.model import EFCMModel
    from tests.conftest import tiny_params_dict
    from tests.packages import build_package as build

    fpd = FpdParams(shallow_stage=2, embed_dim=16, depth=1, heads=2, sk_reduction=2)
    pkg = build(tmp_path, params_from_dict(tiny_params_dict()), DIM, fpd=fpd)
    n = 6
    m = EFCMModel("efcm", pkg, limits=ServingLimits(max_concurrent_slides=n))
    m.load()
    assert type(m.package.package.encoder.encoder).__name__ == "FPDStudent"
    size = int(m.get_input_types()[1]["shape"][1])
    rng = np.random.default_rng(0)
    bags = [rng.integers(0, 256, (5 + i, size, size, 3), dtype=np.uint8) for i in range(n)]

    def outputs(res) -> tuple[np.ndarray, np.ndarray]:
        out = {o.name: np.asarray(o.data, np.float32) for o in res.outputs if o.datatype == "FP32"}
        return out["probabilities"], out["attention"]

    serial = [outputs(_predict(m, _infer_request(b, "UINT8", "patches"))) for b in bags]

    async def together():
        reqs = [_infer_request(b, "UINT8", "patches") for b in bags]
        return [r for r, _ in await asyncio.gather(*(m(q) for q in reqs))]

    for _ in range(3):
        for (probs, attn), res in zip(serial, asyncio.run(together()), strict=True):
            got_probs, got_attn = outputs(res)
            np.testing.assert_allclose(got_probs, probs, atol=1e-6)
            np.testing.assert_allclose(got_attn, attn, atol=1e-6)


def test_threads_that_start_reading_a_slide_together_open_one_handle(tmp_path, monkeypatch):
    import threading
    import time

    import efcm.slides.patches as patches_mod
    from efcm.slides.patches import SlidePatches
    from efcm.slides.patching import CoordsFile

    slide = _slide(tmp_path)
    opened = []
    real_open = patches_mod.open_slide

    def slow_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        time.sleep(0.05)  # every thread would be inside the open at once without the lock
        opened.append(handle)
        return handle

    monkeypatch.setattr(patches_mod, "open_slide", slow_open)
    coords = np.array([[0, 0], [64, 0]], np.int64)
    patches = SlidePatches(str(slide), CoordsFile(coords, 0, 64, 64, "s", 64, 64))
    start = threading.Barrier(8)
    got = []

    def read() -> None:
        start.wait()
        got.append(patches.slide)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(opened) == 1 and all(h is opened[0] for h in got)
        assert patches.read_batch([0, 1]).shape == (2, 64, 64, 3)
    finally:
        patches.close()
        for h in opened[1:]:
            h.close()

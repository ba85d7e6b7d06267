"""The package's three runtimes (`efcm.runtimes`: torch, ONNX Runtime FP32, INT8) on the package the
demo stages export, and a CPU server that never imports torch.

- The same slides, through each runtime in this process and through `efcm serve` over REST, give
  the probabilities the parity figures of model.json promise (INT8: within 0.02 of torch FP32, the
  same label; FP32 ONNX: feature cosine >= 0.999).
- `efcm serve` with a CPU runtime runs under an import blocker (a `sitecustomize` on PYTHONPATH):
  every attempt to import torch, torchvision, timm or torchmetrics fails as if they were not
  installed (the `serving-cpu` image has none of them) and is recorded with its stack, so a lazy
  import anywhere on the path (startup, a features bag, a patches bag, a slide) fails the test;
  when the server has stopped, its `sys.modules` (written at exit) holds no torch module.
- Export refuses a runtime that misses its parity (with the figures), and the package already in
  place stays as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from efcm.config import params_from_dict
from efcm.errors import PackageError
from efcm.inference import predict_features, predict_patches, predict_slide
from efcm.io.manifest import read_manifest
from efcm.models.package import load_package
from efcm.runtimes import cosine_rows, load_runtime
from efcm.runtimes.torch_runtime import TorchRuntime
from tests.conftest import SHARED_DATA, tiny_params_dict
from tests.integration.test_serving import MODEL, serve_subprocess
from tests.packages import build_package

pytestmark = pytest.mark.integration

CMU = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
BLOCKED = ("torch", "torchvision", "timm", "torchmetrics")

# A sitecustomize that makes torch & co. uninstalled for the process: find_spec raises
# ModuleNotFoundError (what Python raises for a missing package) and records who asked; at exit
# it writes the names in sys.modules.
SITECUSTOMIZE = """
import atexit, os, sys, traceback
BLOCKED = {blocked!r}
RECORD = {record!r}
MODULES = {modules!r}

def _modules():  # what the process had imported when it ended
    with open(MODULES, "w") as f:
        f.write(chr(10).join(sorted(sys.modules)))

atexit.register(_modules)

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(RECORD, "a") as f:
                f.write(chr(0) + name + "\\n" + "".join(traceback.format_stack()))
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Blocker())
"""


def _slides(tiny_dataset: Path) -> list[Path]:
    m = read_manifest(tiny_dataset)
    return [m.base_dir / s.uri for s in m.slides]


def test_the_package_carries_three_runtimes_whose_parity_holds(demo_package):
    meta = json.loads((demo_package / "model.json").read_text())
    rts = meta["runtimes"]
    assert set(rts) == {"torch", "onnx", "int8"}
    for name in ("onnx", "int8"):
        assert set(rts[name]["files"]) <= set(meta["files"])  # hashed like every file
        p = rts[name]["parity"]
        assert p["slides"] == 6 and p["same_label"] == "6/6" and p["patches"] > 6
    assert rts["onnx"]["parity"]["feature_cosine_min"] >= 0.999
    assert rts["int8"]["parity"]["feature_cosine_min"] >= 0.99
    assert rts["int8"]["parity"]["max_prob_diff"] <= 0.02
    q = rts["int8"]["quantization"]
    assert q["format"] == "QDQ" and "7-bit" in q["weights"] and q["calibration"]["patches"] > 0


def test_the_same_slides_through_torch_onnx_and_int8(demo_package, tiny_dataset):
    torch_fp32 = TorchRuntime(load_package(demo_package), cpu_bf16=False)
    onnx, int8 = load_runtime(demo_package, "onnx"), load_runtime(demo_package, "int8")
    assert (onnx.name, int8.name) == ("onnx", "int8")
    for slide in _slides(tiny_dataset)[:3]:
        want = predict_slide(torch_fp32, slide, read_workers=1)
        for rt, tol in ((onnx, 1e-4), (int8, 0.02)):
            got = predict_slide(rt, slide, read_workers=1)
            np.testing.assert_array_equal(got.coords, want.coords)
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=tol)
            assert got.label == want.label, (rt.name, slide.name)
            np.testing.assert_allclose(got.attention.sum(), 1, atol=1e-4)
    # patch pixels: the features of each runtime against torch FP32's
    size = onnx.patch_size
    patches = np.random.default_rng(0).integers(0, 256, (9, size, size, 3), dtype=np.uint8)
    ref = torch_fp32.embed([patches])
    assert cosine_rows(onnx.embed([patches]), ref).min() >= 0.999
    assert cosine_rows(int8.embed([patches]), ref).min() >= 0.95  # noise, not tissue
    p = predict_patches(int8, patches)
    assert p.probabilities.shape == (2,) and p.attention.shape == (9,)


def test_a_package_without_a_runtime_says_so(tmp_path):
    params = params_from_dict(tiny_params_dict())
    pkg = build_package(tmp_path, params, 16)  # export.runtimes: [] (an older package, too)
    assert json.loads((pkg / "model.json").read_text())["runtimes"].keys() == {"torch"}
    assert load_runtime(pkg).name == "torch"  # auto, with torch installed
    with pytest.raises(PackageError, match=r"carries no 'int8' runtime.*export.runtimes"):
        load_runtime(pkg, "int8")
    with pytest.raises(PackageError, match=r"unknown runtime 'fp8'"):
        load_runtime(pkg, "fp8")


def test_export_refuses_a_runtime_that_misses_parity_and_keeps_the_old_package(
    tmp_path, monkeypatch
):
    from efcm.training import runtimes

    params = params_from_dict(tiny_params_dict())
    pkg = build_package(tmp_path, params, 16, runtimes=("int8",))
    before = {f.name: f.read_bytes() for f in pkg.iterdir()}
    # a bar no INT8 model can pass: the same export must now refuse, with its figures
    monkeypatch.setitem(runtimes.MIN_COSINE, "int8", 1.01)
    with pytest.raises(PackageError, match=r"refuses runtime\(s\) \['int8'\].*cosine min") as err:
        build_package(tmp_path, params, 16, runtimes=("int8",))
    assert "feature_cosine_mean" in str(err.value) and "export.runtimes" in str(err.value)
    assert {f.name: f.read_bytes() for f in pkg.iterdir()} == before
    assert load_runtime(pkg, "int8").name == "int8"


def _blocked_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site, record = tmp_path / "blocker", tmp_path / "torch_imports.txt"
    site.mkdir()
    modules = tmp_path / "sys_modules.txt"
    (site / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(blocked=BLOCKED, record=str(record), modules=str(modules))
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}, record


def _imports_of_torch(record: Path) -> list[str]:
    """The recorded attempts, but for `efcm.runtimes.torch_installed`'s probe (it asks whether
    torch is there without importing it)."""
    if not record.is_file():
        return []
    attempts = record.read_text().split("\0")[1:]
    return [a for a in attempts if "torch_installed" not in a]


def _rest(url: str, inputs, parameters=None):
    from kserve import InferenceRESTClient, InferRequest, RESTConfig

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
        try:
            req = InferRequest(MODEL, inputs, parameters=parameters)
            return await client.infer(url, req, model_name=MODEL)
        finally:
            await client.close()

    return {o.name: o.as_numpy() for o in asyncio.run(call()).outputs}


def _input(name: str, arr: np.ndarray, datatype: str):
    from kserve import InferInput

    inp = InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=datatype != "BYTES")
    return inp


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_a_cpu_runtime_server_never_imports_torch(runtime, demo_package, tiny_dataset, tmp_path):
    slides = _slides(tiny_dataset)
    env, record = _blocked_env(tmp_path)
    env["EFCM_RUNTIME"] = runtime  # auto: torch is "not installed", so the package's int8
    roots = {str(s.parent) for s in slides} | ({str(CMU.parent)} if CMU.is_file() else set())
    args = [a for r in sorted(roots) for a in ("--allow-slides", r)]
    torch_fp32 = TorchRuntime(load_package(demo_package), cpu_bf16=False)
    tol = 0.02 if runtime == "auto" else 1e-4
    with serve_subprocess(demo_package, tmp_path / "server.log", args, env) as server:
        served = "int8" if runtime == "auto" else "onnx"
        assert f"'runtime': '{served}'" in server.log.read_text()
        for slide in [slides[0], *([CMU] if CMU.is_file() else [])]:
            uri = np.array([str(slide).encode()], dtype=object)
            out = _rest(server.url, [_input("slide_uri", uri, "BYTES")], {"heatmap": True})
            want = predict_slide(torch_fp32, slide, read_workers=1)
            np.testing.assert_allclose(out["probabilities"][0], want.probabilities, atol=tol)
            assert out["label"][0] in (want.label, want.label.encode())
            assert len(out["heatmap_png"][0]) > 0
        bag = np.random.default_rng(1).normal(size=(5, torch_fp32.feature_dim)).astype(np.float32)
        out = _rest(server.url, [_input("features", bag, "FP32")])
        np.testing.assert_allclose(
            out["probabilities"][0], predict_features(torch_fp32, bag).probabilities, atol=1e-5
        )
        size = torch_fp32.patch_size
        px = np.random.default_rng(2).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        assert _rest(server.url, [_input("patches", px, "UINT8")])["attention"].shape == (4,)
    assert _imports_of_torch(record) == []
    # the server stopped cleanly (SIGTERM) and wrote its sys.modules: onnxruntime, no torch
    modules = (tmp_path / "sys_modules.txt").read_text().split()
    assert "onnxruntime" in modules and "kserve" in modules
    assert not [m for m in modules if m.split(".")[0] in BLOCKED]
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_blocker_would_catch_a_torch_import(demo_package, tmp_path):
    """The check above can fail: the same blocked server asked for the torch runtime stops at
    startup, and its attempt is recorded."""
    env, record = _blocked_env(tmp_path)
    env["EFCM_RUNTIME"] = "torch"
    with (
        pytest.raises(pytest.fail.Exception, match="efcm serve exited"),
        serve_subprocess(demo_package, tmp_path / "server.log", [], env),
    ):
        pass
    assert "torch is not installed here" in (tmp_path / "server.log").read_text()
    # and an import of torch, as efcm.runtimes.torch_runtime does, is recorded
    script = "import efcm.runtimes.torch_runtime"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr
    assert _imports_of_torch(record)

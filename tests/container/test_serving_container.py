"""The serving image, run as KServe runs it: every setting comes from the InferenceService that
`efcm.deploy.render.inference_service` renders, read here the way the kubelet reads it, so this
test checks the manifest's assumptions about the image, not a copy of them.

From the `kserve-container` of the rendered predictor:
- `command` + `args` replace the image's entrypoint (`efcm serve /mnt/models --http-port 8080
  --grpc-port 8081 --model-name efcm`); the container's HTTP port and the gRPC port of its args are
  published on loopback;
- `securityContext`: runAsUser/runAsGroup (10001), readOnlyRootFilesystem (and podman's own tmpfs
  on /tmp, /run and /var/tmp switched off, so that only the manifest's volumes are writable),
  allowPrivilegeEscalation: false (no-new-privileges), capabilities drop ALL;
- every `volumeMount` on an `emptyDir` volume (the slide cache and /tmp): a new empty host folder,
  mode 0777, bind-mounted read-write, which is what the kubelet makes of an emptyDir on the node's
  disk (its sizeLimit is enforced by eviction, not by the filesystem; a tmpfs would not do: podman
  gives a tmpfs the mode of the image's folder under it, and the kubelet does not);
- `env`: the serving policy, verbatim (EFCM_SLIDE_URI_PREFIXES, the limits, EFCM_CACHE_DIR);
- `resources.limits.memory`: the container's memory limit.

What no Kubernetes runs here: KServe's storage initializer, which downloads STORAGE_URI to
/mnt/models: the demo package is bind-mounted there read-only instead (what the initializer
leaves); and the slide folder the policy allows is a read-only bind mount of a host folder.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from efcm.deploy.render import inference_service
from efcm.inference import predict_features
from efcm.limits import SLIDE_URI_PREFIXES_ENV
from efcm.runtimes import load_runtime
from efcm.slides.synthetic import SlideSpec, write_slide
from tests import containers
from tests.conftest import SHARED_DATA
from tests.integration.test_serving import MODEL, Server
from tests.integration.test_serving_slides import (
    _check_slide_prediction,
    _input,
    _outputs,
    _png,
    _slide_input,
    grpc,
    rest,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.container]

SLIDES = "/slides"  # where the allowed slide folder is mounted in the container
CMU = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity in binary units ("36Gi", "8Gi", "512Mi") as bytes."""
    for suffix, scale in _UNITS.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * scale
    return int(quantity)


def rendered_isvc(image: str, **options: Any) -> dict:
    """The InferenceService `efcm deploy` would apply: CPU, the default limits, slides allowed
    from SLIDES, and `options` (more arguments of `inference_service`)."""
    return inference_service(
        MODEL,
        "efcm-test",
        "gs://efcm-test-models/package",
        image,
        gpu=False,
        slide_uri_prefixes=SLIDES,
        **options,
    )


def run_as_kserve(
    isvc: dict, package: Path, slides: Path, scratch: Path
) -> tuple[list[str], list[str], dict]:
    """(run options, argv after the image, {"http": port, "grpc": port}) of the predictor's
    `kserve-container`, read from the rendered manifest as the kubelet reads it; its emptyDir
    volumes are new folders in `scratch`."""
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    opts = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    if sc["readOnlyRootFilesystem"]:
        opts.append("--read-only")
        if containers.engine() == "podman":  # podman adds writable tmpfs mounts unless told not to
            opts.append("--read-only-tmpfs=false")
    if sc["allowPrivilegeEscalation"] is False:
        opts += ["--security-opt", "no-new-privileges"]
    for cap in sc["capabilities"]["drop"]:
        opts += ["--cap-drop", cap]
    volumes = {v["name"]: v for v in predictor["volumes"]}
    for mount in c["volumeMounts"]:
        assert _bytes(volumes[mount["name"]]["emptyDir"]["sizeLimit"]) > 0
        folder = scratch / mount["name"]
        folder.mkdir(parents=True)
        folder.chmod(0o777)  # as the kubelet makes an emptyDir
        opts += ["-v", f"{folder}:{mount['mountPath']}:rw"]
    env = {e["name"]: e["value"] for e in c["env"]}
    for name, value in env.items():
        opts += ["--env", f"{name}={value}"]
    opts += ["--memory", str(_bytes(c["resources"]["limits"]["memory"]))]
    argv = [*c["command"][1:], *c["args"]]
    model_dir = c["args"][c["args"].index("serve") + 1]
    opts += ["-v", f"{package}:{model_dir}:ro"]
    assert env[SLIDE_URI_PREFIXES_ENV] == SLIDES
    opts += ["-v", f"{slides}:{SLIDES}:ro"]
    ports = {
        "http": c["ports"][0]["containerPort"],
        "grpc": int(c["args"][c["args"].index("--grpc-port") + 1]),
    }
    for port in ports.values():
        opts += ["-p", f"127.0.0.1::{port}"]
    opts += ["--entrypoint", c["command"][0]]  # Kubernetes' command replaces the entrypoint
    return opts, argv, ports


@pytest.fixture(scope="module")
def mounts(tmp_path_factory, demo_package) -> tuple[Path, Path]:
    """(the package, the allowed slide folder), readable by the container's user."""
    base = tmp_path_factory.mktemp("serving-container")
    package = base / "package"
    shutil.copytree(demo_package, package)
    slides = base / "slides"
    spec = SlideSpec(1536, 1536, mpp=0.5, levels=2, tumour=True, seed=3)
    write_slide(slides / "tumour.tif", spec)
    if CMU.exists():
        shutil.copy2(CMU, slides / CMU.name)
    containers.readable(base)
    return package, slides


@contextmanager
def served(isvc: dict, mounts, tmp_path: Path) -> Iterator[tuple[Server, containers.Container]]:
    """The predictor's image, run as the rendered InferenceService `isvc` runs it, until ready;
    after the block: still ready, then stopped, exit code 0 and no traceback in its log."""
    package, slides = mounts
    image = isvc["spec"]["predictor"]["containers"][0]["image"]
    opts, argv, ports = run_as_kserve(isvc, package, slides, tmp_path / "volumes")
    log = tmp_path / "container.log"
    with containers.running(image, opts, argv, log) as box:
        url = f"http://127.0.0.1:{box.port(ports['http'])}"
        ready = isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
        box.wait_http(url + ready)
        server = Server(url, f"127.0.0.1:{box.port(ports['grpc'])}", package, log)
        yield server, box
        assert httpx.get(url + ready, timeout=10).status_code == 200, "not ready at the end"
        code = box.stop()
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert code == 0, f"exit code {code} after SIGTERM:\n{text[-2000:]}"


def test_manifest_settings_reach_the_container(images, mounts, tmp_path):
    """The user, the read-only root and the tmpfs volumes are what the manifest says."""
    with served(rendered_isvc(images["serving"]), mounts, tmp_path) as (_, box):
        assert box.exec("id", "-u").strip() == "10001"
        for path in ("/opt/venv/x", "/home/efcm/x", "/mnt/models/x", f"{SLIDES}/x"):
            proc = containers.cli("exec", box.name, "touch", path, check=False)
            assert proc.returncode != 0 and "Read-only file system" in proc.stderr, (path, proc)
        for path in ("/tmp/x", "/var/cache/efcm/x"):
            containers.cli("exec", box.name, "touch", path)


def test_features_over_rest_and_grpc_equal_the_core_on_the_host(images, mounts, tmp_path):
    x = np.random.default_rng(0).normal(size=(9, 64)).astype(np.float32)
    with served(rendered_isvc(images["serving"]), mounts, tmp_path) as (server, _):
        expected = predict_features(load_runtime(server.package, "torch"), x)
        for call, binary in ((rest, False), (rest, True), (grpc, True)):
            out = _outputs(call(server, [_input("features", x, "FP32", binary)]))
            np.testing.assert_allclose(out["probabilities"][0], expected.probabilities, atol=1e-5)
            np.testing.assert_allclose(out["attention"], expected.attention, atol=1e-5)


def test_slide_uris_under_the_allowed_folder_and_a_refused_one(images, mounts, tmp_path):
    import grpc as grpc_lib

    with served(rendered_isvc(images["serving"]), mounts, tmp_path) as (server, _):
        uri = f"{SLIDES}/tumour.tif"
        res = rest(server, [_slide_input(uri)], {"heatmap": True})
        out = _outputs(res)
        _check_slide_prediction(out)
        _png(base64.b64decode(out["heatmap_png"][0]))
        g = _outputs(grpc(server, [_slide_input(uri, binary=True)], {"heatmap": True}))
        np.testing.assert_allclose(g["probabilities"], out["probabilities"], atol=1e-5)
        _png(g["heatmap_png"][0])
        if CMU.exists():  # the real SVS through the image's OpenSlide
            _check_slide_prediction(_outputs(rest(server, [_slide_input(f"{SLIDES}/{CMU.name}")])))

        for refused in ("/mnt/models/model.json", "/etc/passwd", "file:///etc/passwd"):
            body = {"inputs": [_slide_tensor(refused)]}
            r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
            assert r.status_code == 403, (refused, r.status_code, r.text)
            assert "Traceback" not in r.text
        with pytest.raises(grpc_lib.RpcError) as e:
            grpc(server, [_slide_input("/etc/passwd", binary=True)])
        assert e.value.code() == grpc_lib.StatusCode.PERMISSION_DENIED


def _slide_tensor(uri: str) -> dict:
    return {"name": "slide_uri", "shape": [1], "datatype": "BYTES", "data": [uri]}

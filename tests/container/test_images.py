"""What each image carries: exactly this tree's `efcm`, the CUDA build of torch (serving,
component) or no torch at all (serving-cpu), its version label, and a numeric non-root user."""

from __future__ import annotations

import hashlib
import json
import tomllib

import pytest

from tests import containers
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.container]

_INSPECT = """
import efcm, hashlib, importlib.util, json, pathlib
root = pathlib.Path(efcm.__file__).parent
torch = None
if importlib.util.find_spec("torch") is not None:
    import torch
print(json.dumps({
    "files": {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(root.rglob("*.py"))},
    "torch": torch is not None,
    "cuda": torch.version.cuda if torch is not None else None,
}))
"""


@pytest.mark.parametrize("target", ["serving", "serving-cpu", "component"])
def test_image_carries_this_trees_efcm_and_its_torch(images, target):
    image = images[target]
    out = containers.cli("run", "--rm", "--entrypoint", "python", image, "-c", _INSPECT).stdout
    got = json.loads(out)
    src = ROOT / "src" / "efcm"
    expected = {
        str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(src.rglob("*.py"))
    }
    assert got["files"] == expected, sorted(set(got["files"].items()) ^ set(expected.items()))[:5]
    if target == "serving-cpu":
        assert not got["torch"], "torch is installed in the torch-free image"
    else:
        assert got["cuda"], "torch in the image is not the CUDA build"

    config = containers.image_config(image)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert config["Labels"]["org.opencontainers.image.version"] == version
    assert image.endswith(f":{version}")
    uid = config["User"].split(":")[0]
    assert uid.isdigit() and uid != "0"

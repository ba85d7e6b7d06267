"""What each image carries: exactly this tree's `efcm`, the CUDA build of torch, its version label,
and a numeric non-root user."""

from __future__ import annotations

import hashlib
import json
import tomllib

import pytest

from tests import containers
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.container]

_INSPECT = """
import efcm, hashlib, json, pathlib, torch
root = pathlib.Path(efcm.__file__).parent
print(json.dumps({
    "files": {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(root.rglob("*.py"))},
    "cuda": torch.version.cuda,
}))
"""


@pytest.mark.parametrize("target", ["serving", "component"])
def test_image_carries_this_trees_efcm_and_cuda_torch(images, target):
    image = images[target]
    out = containers.cli("run", "--rm", "--entrypoint", "python", image, "-c", _INSPECT).stdout
    got = json.loads(out)
    src = ROOT / "src" / "efcm"
    expected = {
        str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(src.rglob("*.py"))
    }
    assert got["files"] == expected, sorted(set(got["files"].items()) ^ set(expected.items()))[:5]
    assert got["cuda"], "torch in the image is not the CUDA build"

    config = containers.image_config(image)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert config["Labels"]["org.opencontainers.image.version"] == version
    assert image.endswith(f":{version}")
    uid = config["User"].split(":")[0]
    assert uid.isdigit() and uid != "0"

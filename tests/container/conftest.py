"""The images, built by scripts/images.sh once per session (a layer-cache hit when the README's
test command built them just before)."""

from __future__ import annotations

import pytest

from tests import containers


@pytest.fixture(scope="session")
def image_record(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """scripts/images.sh's JSON record of this working tree's images (every target):
    {"engine", "base", "stand_in_base", "images": [{"target", "image", "bytes", "build_s"}]}."""
    log = tmp_path_factory.mktemp("images") / "images.log"
    try:
        return containers.build_images(log)
    except RuntimeError as e:  # no engine and not CI, a failed build: a failure, never a skip
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def images(image_record: dict) -> dict[str, str]:
    """{"serving": tag, "serving-cpu": tag, "component": tag} of the images of this tree."""
    return {i["target"]: i["image"] for i in image_record["images"]}

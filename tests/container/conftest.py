"""Both images, built by scripts/images.sh once per session (a layer-cache hit when the README's
test command built them just before)."""

from __future__ import annotations

import pytest

from tests import containers


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"serving": tag, "component": tag} of the images of this working tree."""
    log = tmp_path_factory.mktemp("images") / "images.log"
    try:
        record = containers.build_images(log)
    except RuntimeError as e:  # no engine and not CI, a failed build: a failure, never a skip
        pytest.fail(str(e))
    return {i["target"]: i["image"] for i in record["images"]}

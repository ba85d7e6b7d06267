"""A model package's `model.json`, read and verified without torch: the one check of a package's
files, shared by the torch loader (`efcm.models.package.load_package`) and the ONNX Runtime
(`efcm.runtimes.onnx`), so a CPU server that has no torch verifies a package exactly as the
evaluation's loader does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efcm.errors import PackageError
from efcm.io.files import sha256_file
from efcm.io.package import FORMAT, geometry
from efcm.slides.patching import settings_changes


class PackageFacts:
    """What `model.json` (`self.meta`) says, answered alike by every holder of a package (the
    torch modules, each runtime)."""

    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def patch_size(self) -> int:
        """The side of the patches the student embeds (px at the packaged target mpp)."""
        return int(self.meta["patch"]["patch_size"])


def read_package_meta(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """`model.json` of the package directory `path`, after checking its format, that every file it
    lists is there (with `verify`, that its sha256 matches), and that the geometry it records is
    its params' (a package edited by hand to serve other patches than it was trained on is
    refused).

    Raises:
        PackageError: naming the package and what is wrong.
    """
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise PackageError(f"{path}: not a model package (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise PackageError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise PackageError(
            f"{path}: unknown package format {meta.get('format')!r}, expected {FORMAT}"
        )
    for f in meta["files"]:
        if not (path / f).is_file():
            raise PackageError(f"{path}: missing {f}")
        if verify and sha256_file(path / f) != meta["sha256"][f]:
            raise PackageError(f"{path}/{f}: sha256 does not match model.json (corrupt or altered)")
    recorded = geometry(meta["patch"])
    configured = geometry(meta.get("params", {}).get("patch", {}))
    if recorded != configured:
        raise PackageError(
            f"{path}: model.json's patch geometry differs from its params "
            f"({'; '.join(settings_changes(recorded, configured))}): refusing to serve other "
            "patches than the model was trained on"
        )
    return meta

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
from efcm.io.package import FORMAT, IMAGE, KINDS, geometry, image_geometry, kind_of
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
    def kind(self) -> str:
        """`slide` or `image` (`efcm.io.package`)."""
        return kind_of(self.meta)

    @property
    def patch_size(self) -> int:
        """The side of the square the student embeds: a patch (px at the packaged target mpp),
        or for an image package the preprocessed image."""
        if self.kind == IMAGE:
            return int(self.meta["image"]["size"])
        return int(self.meta["patch"]["patch_size"])

    @property
    def multi_label(self) -> bool:
        return bool(self.meta.get("multi_label", False))

    def label_of(self, probs: Any) -> str | list[str]:
        """The call of class probabilities (C,): the most probable class; for a multi-label
        image package, the list of classes whose probability reaches the package's threshold
        (`model.json["thresholds"]`, picked on validation images; see
        `efcm.training.image_export`), possibly empty."""
        if self.multi_label:
            thr = self.meta["thresholds"]["per_class"]
            return [c for c, p, t in zip(self.classes, probs, thr, strict=True) if p >= t]
        return self.classes[int(probs.argmax())]

    def boundary_distance(self, probs: Any) -> float:
        """How far class probabilities (C,) are from changing `label_of`'s call, per
        probability: for a multi-label package the smallest |p - threshold| over the classes,
        else half the gap between the two most probable classes (each moving by d flips it)."""
        import numpy as np

        p = np.asarray(probs, np.float64)
        if self.multi_label:
            return float(np.abs(p - np.asarray(self.meta["thresholds"]["per_class"])).min())
        top = np.sort(p)[::-1]
        return float((top[0] - top[1]) / 2) if len(top) > 1 else float("inf")


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
    kind = kind_of(meta)
    if kind not in KINDS:
        raise PackageError(f"{path}: unknown package kind {kind!r}, expected one of {KINDS}")
    section = "image" if kind == IMAGE else "patch"
    shape = image_geometry if kind == IMAGE else geometry
    recorded = shape(meta[section])
    configured = shape(meta.get("params", {}).get(section, {}))
    if recorded != configured:
        raise PackageError(
            f"{path}: model.json's {section} geometry differs from its params "
            f"({'; '.join(settings_changes(recorded, configured))}): refusing to serve other "
            f"{'images' if kind == IMAGE else 'patches'} than the model was trained on"
        )
    return meta

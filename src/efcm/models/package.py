"""A model package loaded as modules: `load_package` verifies the package's files
(`efcm.io.package`) and builds its fold ensemble (students and CLAMs). The one loader of the
evaluation, the CLI and the predictor."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from efcm.config import EncoderParams
from efcm.errors import PackageError
from efcm.io.files import sha256_file
from efcm.io.package import FORMAT, geometry
from efcm.models.clam import load_clam
from efcm.models.encoders import EncoderWithTransform
from efcm.models.ensemble import FoldEnsembleCLAM, FoldEnsembleEncoder
from efcm.models.students import load_student
from efcm.slides.patching import settings_changes


@dataclass
class Package:
    path: Path
    meta: dict[str, Any]
    encoder: nn.Module  # uint8 patches (B, S, S, 3) -> features (B, D)
    clam: FoldEnsembleCLAM

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def n_members(self) -> int:
        return len(self.clam.members)

    def member(self, k: int) -> Package:
        """Fold k's model alone (its student and its CLAM): the model the evaluation scored on
        fold k's test patients."""
        if not 0 <= k < self.n_members:
            raise IndexError(f"{self.path}: no fold member {k} (the package has {self.n_members})")
        split = self.clam.split
        encoder = self.encoder.members[k] if split else self.encoder
        clam = FoldEnsembleCLAM([self.clam.members[k]], split=False)
        meta = {**self.meta, "feature_dim": clam.in_dim}
        return replace(self, meta=meta, encoder=encoder, clam=clam)


def load_package(path: str | Path, *, verify: bool = True) -> Package:
    """Load a package directory; checks its format, the sha256 of every file, and that the
    geometry it records is its params' (a package edited by hand to serve other patches than it
    was trained on is refused)."""
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
    ens = meta["ensemble"]
    encoders = []
    for f in ens["students"]:
        student, spec = load_student(path / f)
        if spec.arch != meta["encoder"]["arch"]:
            raise PackageError(f"{path}/{f}: student arch {spec.arch} does not match model.json")
        encoders.append(
            EncoderWithTransform(student, EncoderParams.model_validate(meta["encoder"]))
        )
    split = bool(ens["per_fold_student"])
    encoder = FoldEnsembleEncoder(encoders) if split else encoders[0]
    clam = FoldEnsembleCLAM([load_clam(path / c) for c in ens["clams"]], split=split)
    if clam.in_dim != int(meta["feature_dim"]):
        raise PackageError(f"{path}: the CLAMs take {clam.in_dim}-d features, model.json says "
                           f"{meta['feature_dim']}")  # fmt: skip
    return Package(path, meta, encoder.eval(), clam.eval())

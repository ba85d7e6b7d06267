"""A model package loaded as modules: `load_package` verifies the package's files
(`efcm.models.meta`) and builds its fold ensemble (students and CLAMs, or for an image package
students and linear heads). The one loader of the evaluation, the CLI and the predictor."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from efcm.config import EncoderParams
from efcm.errors import PackageError
from efcm.io.package import IMAGE, kind_of
from efcm.models.clam import load_clam
from efcm.models.encoders import EncoderWithTransform
from efcm.models.ensemble import FoldEnsembleCLAM, FoldEnsembleEncoder
from efcm.models.image_head import ImageHeadEnsemble, load_head
from efcm.models.meta import PackageFacts, read_package_meta
from efcm.models.students import load_student


@dataclass
class Package(PackageFacts):
    path: Path
    meta: dict[str, Any]
    encoder: nn.Module  # uint8 patches (B, S, S, 3) -> features (B, D)
    # the head: bag (N, D) -> probs (1, C), attention (N,); an image package's linear heads
    clam: FoldEnsembleCLAM | ImageHeadEnsemble

    @property
    def n_members(self) -> int:
        return len(self.clam.members)

    def member(self, k: int) -> Package:
        """Fold k's model alone (its student and its CLAM, or its head): the model the
        evaluation scored on fold k's test patients."""
        if not 0 <= k < self.n_members:
            raise IndexError(f"{self.path}: no fold member {k} (the package has {self.n_members})")
        split = self.clam.split
        encoder = self.encoder.members[k] if split else self.encoder
        clam = self.clam.member(k)
        meta = {**self.meta, "feature_dim": clam.in_dim}
        if self.multi_label:  # fold k's own thresholds, picked on its validation images
            thr = self.meta["thresholds"]
            meta["thresholds"] = {**thr, "per_class": thr["per_fold"][k]}
        return replace(self, meta=meta, encoder=encoder, clam=clam)


def load_package(path: str | Path, *, verify: bool = True) -> Package:
    """Load a package directory as torch modules, after `read_package_meta`'s checks (format, the
    sha256 of every file, geometry)."""
    path = Path(path)
    meta = read_package_meta(path, verify=verify)
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
    if kind_of(meta) == IMAGE:
        heads = [load_head(path / h) for h in ens["heads"]]
        clam: FoldEnsembleCLAM | ImageHeadEnsemble = ImageHeadEnsemble(heads, split=split)
    else:
        clam = FoldEnsembleCLAM([load_clam(path / c) for c in ens["clams"]], split=split)
    if clam.in_dim != int(meta["feature_dim"]):
        raise PackageError(f"{path}: the heads take {clam.in_dim}-d features, model.json says "
                           f"{meta['feature_dim']}")  # fmt: skip
    return Package(path, meta, encoder.eval(), clam.eval())

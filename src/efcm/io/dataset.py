"""The dataset of a Kubeflow run: resolve a DVC-versioned manifest, cut it into shards, and merge
the shards' outputs again.

A dataset is a git repository tracked with DVC: the slide manifest (`dvc add data/manifest.csv`)
and the slides (`dvc add data/slides`), pushed to a gs:// remote. `resolve_dataset` reads the
manifest at one git revision through a `VersionedRepo` (the resolve_dataset KFP component backs it
with the DVC API: the core never imports DVC) and rewrites every slide URI to the slide's object in
the remote (`gs://<remote>/files/md5/ab/cdef...`): the pipeline reads the slides
where DVC stored them, by URI, and never copies them through its steps. Slide URIs that are already
absolute (gs:// or a local path) are kept as they are.

Without a repository, `path` is a plain manifest (a local path or gs:// URI),
imported as `efcm.io.manifest.import_manifest` does.

Unlabelled slides (an empty label) are part of the dataset like any other: they are resolved and
sharded, patched, extracted and distilled; only the slide-level stages leave them out. The
metadata counts them (`unlabelled`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from efcm.errors import InvalidInput
from efcm.io.cache import SlideCache, local_path
from efcm.io.manifest import Manifest, SlideEntry, import_manifest, read_manifest, write_manifest
from efcm.io.status import read_status, write_status

# What `efcm.stages.patch` / `extract` write into their output folder, besides status.csv.
OUTPUT_FOLDERS = ("patches", "qc", "features", "store")
STATUS = "status.csv"


class DatasetError(InvalidInput):
    """The dataset cannot be resolved: the message names the repository, revision and path."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VersionedRepo(Protocol):
    """A data repository at one revision, as `resolve_dataset` needs it. The KFP component gives it
    one backed by `dvc.repo.Repo` (the core never imports DVC); paths are relative to the
    repository's root."""

    url: str
    commit: str  # the revision, resolved to a commit

    def is_file(self, path: str) -> bool: ...

    def fetch(self, path: str, dest: Path) -> None:
        """Copy the file (from the DVC remote when DVC tracks it) to the local `dest`."""

    def md5(self, path: str) -> str | None:
        """DVC's md5 of a tracked file; None for a file in git only."""

    def storage_url(self, path: str) -> str | None:
        """Where the DVC remote stores the tracked file (`gs://remote/files/md5/ab/cdef...`);
        None when DVC does not track it. Raises LookupError when there is no remote."""


def open_error(url: str, revision: str, err: Exception) -> DatasetError:
    """The error for a repository that cannot be opened at a revision (clone failure, unknown
    revision, ...)."""
    return DatasetError(
        f"cannot open {url} at revision {revision or 'HEAD'!r}: {type(err).__name__}: {err}"
    )


def manifest_md5(path: str, *, cache: SlideCache | None = None) -> str:
    """The md5 of a manifest (local path, or gs:// URI staged into `cache`) as stored."""
    return _md5(local_path(path, cache=cache))


def _slide_url(repo: VersionedRepo, manifest_path: str, s: SlideEntry) -> str:
    """The storage URL of a slide named relative to the manifest's folder in the repository."""
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path), s.uri))
    where = f"{repo.url}@{repo.commit[:12]}: slide {s.slide_id} ({s.uri})"
    if rel == ".." or rel.startswith("../"):
        raise DatasetError(f"{where} lies outside the repository")
    try:
        url = repo.storage_url(rel)
    except LookupError as err:
        raise DatasetError(f"{where}: {err}") from None
    if url is None:
        state = "in git but not tracked by DVC" if repo.is_file(rel) else "not in the repository"
        raise DatasetError(f"{where} is {state}: `dvc add` the slides and `dvc push` them")
    return url


def resolve_dataset(
    repo: VersionedRepo | None,
    revision: str,
    path: str,
    dest: str | Path,
    classes: tuple[str, ...] | None = None,
    *,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Write the manifest `path` of `repo` (at the revision it was opened at, asked for as
    `revision`) to `dest`, every relative slide URI resolved to its DVC storage URL; returns the
    metadata of the result: the repository, the revision asked for, its commit, the manifest's DVC
    md5, the number of slides and how many of them are unlabelled. With no `repo`, `path` is a
    plain manifest (local, or gs:// staged into `cache`), imported with its relative URIs made
    absolute.

    Raises:
        DatasetError: the manifest cannot be read, or a slide is not tracked by DVC.
        ValueError: the manifest itself is invalid (see `efcm.io.manifest.read_manifest`).
    """
    if repo is None:
        manifest = import_manifest(path, dest, classes, cache=cache)
        return {
            "repo_url": "",
            "revision": "",
            "commit": "",
            "path": path,
            "md5": manifest_md5(path, cache=cache),  # of the manifest as stored, as DVC computes it
            "dvc_tracked": False,
            "slides": len(manifest.slides),
            "unlabelled": len(manifest.unlabelled),
        }
    where = f"{repo.url}@{repo.commit[:12]}: {path}"
    if not repo.is_file(path):
        raise DatasetError(f"{where}: no such manifest in the repository")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "manifest.csv"
        try:
            repo.fetch(path, local)
        except Exception as err:  # any backend error: say what and where
            raise DatasetError(
                f"{where}: cannot fetch it ({type(err).__name__}: {err}); was it `dvc push`ed?"
            ) from None
        dvc_md5 = repo.md5(path)
        md5 = dvc_md5 or _md5(local)
        manifest = read_manifest(local, classes)
    slides = []
    for s in manifest.slides:
        uri = s.uri
        if "://" not in uri and not os.path.isabs(uri):
            uri = _slide_url(repo, path, s)
        slides.append(SlideEntry(s.slide_id, s.case_id, uri, s.label, s.mpp))
    write_manifest(dest, slides)
    return {
        "repo_url": repo.url,
        "revision": revision,
        "commit": repo.commit,
        "path": path,
        "md5": md5,
        "dvc_tracked": dvc_md5 is not None,
        "slides": len(slides),
        "unlabelled": len(manifest.unlabelled),
    }


# -- shards ---------------------------------------------------------------------------------------


def shard_indices(manifest: str | Path | Manifest, shard_size: int) -> list[int]:
    """[0, 1, ..., n_shards - 1] for the manifest's slides cut `shard_size` at a time."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    return list(range((len(m.slides) + shard_size - 1) // shard_size))


def select_shard(manifest: Manifest, shard: int, shard_size: int) -> Manifest:
    """The slides of shard `shard` (in manifest order), as a manifest with the same base folder."""
    n_shards = len(shard_indices(manifest, shard_size))
    if not 0 <= shard < n_shards:
        raise ValueError(
            f"{manifest.path}: shard {shard} does not exist ({n_shards} shards of {shard_size})"
        )
    return replace(manifest, slides=manifest.slides[shard * shard_size : (shard + 1) * shard_size])


def merge_outputs(shards: Sequence[str | Path], out_dir: str | Path) -> list[dict[str, str]]:
    """Merge the output folders of shards (patch or extract): their `patches/`, `qc/` and
    `features/` files side by side in `out_dir`, and one status.csv. Returns the status rows.

    A slide in two shards is an error (the shards of one manifest are disjoint).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for shard in map(Path, shards):
        status = shard / STATUS
        if not status.is_file():
            raise ValueError(f"{shard}: not a shard output (no {STATUS})")
        for row in read_status(status):
            if row["slide_id"] in seen:
                raise ValueError(
                    f"slide {row['slide_id']} is in two shards: {seen[row['slide_id']]} and {shard}"
                )
            seen[row["slide_id"]] = str(shard)
            rows.append(row)
        for folder in OUTPUT_FOLDERS:
            if (shard / folder).is_dir():
                _copy_tree(shard / folder, out / folder)
    write_status(out / STATUS, rows)
    return rows


def _copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _copy_tree(item, dst / item.name)
        elif not item.name.endswith(".part"):
            target = dst / item.name
            target.unlink(missing_ok=True)  # a retried gather writes over its own first try
            try:  # the same filesystem (kfp.local, a workspace PVC): no copy at all
                os.link(item, target)
            except OSError:
                shutil.copyfile(item, target)


def status_counts(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row["status"]] = out.get(row["status"], 0) + 1
    return out

"""The dataset of a Kubeflow run: resolve a DVC-versioned manifest, cut it into shards, and merge
the shards' outputs again.

A dataset is a git repository tracked with DVC: the slide manifest (`dvc add data/manifest.csv`)
and the slides (`dvc add data/slides`), pushed to a gs:// remote. `resolve_dataset` reads the
manifest at one git revision from the remote with the DVC API and rewrites every slide URI to the
slide's object in the remote (`gs://<remote>/files/md5/ab/cdef...`): the pipeline reads the slides
where DVC stored them, by URI, and never copies them through its steps. Slide URIs that are already
absolute (gs:// or a local path) are kept as they are.

Without a repository (`repo_url` empty), `path` is a plain manifest (a local path or gs:// URI),
imported as `efcm.manifest.import_manifest` does.
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
from typing import Any

from efcm.manifest import Manifest, SlideEntry, import_manifest, read_manifest, write_manifest
from efcm.status import read_status, write_status
from efcm.storage import local_path

# What `efcm.stages.patch` / `extract` write into their output folder, besides status.csv.
OUTPUT_FOLDERS = ("patches", "qc", "features")
STATUS = "status.csv"


class DatasetError(ValueError):
    """The dataset cannot be resolved: the message names the repository, revision and path."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_repo(repo_url: str, revision: str):
    from dvc.repo import Repo

    try:
        return Repo.open(repo_url, rev=revision or None, subrepos=True, uninitialized=True)
    except Exception as err:  # dvc/scmrepo raise many types: clone, unknown revision, ...
        raise DatasetError(
            f"cannot open {repo_url} at revision {revision or 'HEAD'!r}: "
            f"{type(err).__name__}: {err}"
        ) from None


def resolve_version(repo_url: str, revision: str, path: str) -> str:
    """A key that changes exactly when the data may have: the commit `revision` points at in
    `repo_url` now, or, with no repository, the md5 of the manifest at `path`.

    The pipeline runs this step uncached and caches the dataset read on its result, so a run that
    asks for a branch gets the branch's latest data, and one that names a commit reuses its cache.
    """
    if not repo_url:
        return _md5(local_path(path))
    with _open_repo(repo_url, revision) as repo:
        return repo.scm.get_rev()


def _slide_url(repo: Any, repo_url: str, commit: str, manifest_path: str, s: SlideEntry) -> str:
    """The storage URL of a slide named relative to the manifest's folder in the repository."""
    from dvc_data.index import StorageKeyError

    rel = posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path), s.uri))
    where = f"{repo_url}@{commit[:12]}: slide {s.slide_id} ({s.uri})"
    if rel == ".." or rel.startswith("../"):
        raise DatasetError(f"{where} lies outside the repository")
    try:
        index, entry = repo.get_data_index_entry(rel)
    except Exception:
        tracked = repo.dvcfs.exists(rel)
        raise DatasetError(
            f"{where} is {'in git but not tracked by DVC' if tracked else 'not in the repository'}"
            f": `dvc add` the slides and `dvc push` them"
        ) from None
    try:
        remote_fs, remote_path = index.storage_map.get_remote(entry)
    except (StorageKeyError, ValueError):
        raise DatasetError(
            f"{where}: the repository has no DVC remote (`dvc remote add -d`)"
        ) from None
    return remote_fs.unstrip_protocol(remote_path)


def resolve_dataset(
    repo_url: str,
    revision: str,
    path: str,
    dest: str | Path,
    classes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write the manifest `path` of `repo_url` at `revision` to `dest`, every slide URI resolved
    to its DVC storage URL; returns the metadata of the result: the commit, the manifest's DVC md5
    and the number of slides.

    Raises:
        DatasetError: the repository, revision or manifest cannot be read, or a slide is not
            tracked by DVC.
        ValueError: the manifest itself is invalid (see `efcm.manifest.read_manifest`).
    """
    if not repo_url:
        manifest = import_manifest(path, dest, classes)
        return {
            "repo_url": "",
            "revision": "",
            "commit": "",
            "path": path,
            "md5": _md5(local_path(path)),  # of the manifest as stored, as DVC computes it
            "slides": len(manifest.slides),
        }
    with _open_repo(repo_url, revision) as repo:
        commit = repo.scm.get_rev()
        fs = repo.dvcfs
        where = f"{repo_url}@{commit[:12]}: {path}"
        if not fs.isfile(path):
            raise DatasetError(f"{where}: no such manifest in the repository")
        info = fs.info(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "manifest.csv"
            try:
                fs.get_file(path, str(local))
            except Exception as err:
                raise DatasetError(
                    f"{where}: cannot fetch it from the DVC remote ({type(err).__name__}: {err}); "
                    "was it `dvc push`ed?"
                ) from None
            md5 = info.get("md5") or _md5(local)
            manifest = read_manifest(local, classes)
        slides = []
        for s in manifest.slides:
            uri = s.uri
            if "://" not in uri and not os.path.isabs(uri):
                uri = _slide_url(repo, repo_url, commit, path, s)
            slides.append(SlideEntry(s.slide_id, s.case_id, uri, s.label, s.mpp))
    write_manifest(dest, slides)
    return {
        "repo_url": repo_url,
        "revision": revision,
        "commit": commit,
        "path": path,
        "md5": md5,
        "dvc_tracked": bool(info.get("isdvc") or info.get("dvc_info")),
        "slides": len(slides),
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
            try:  # the same filesystem (kfp.local, a workspace PVC): no copy at all
                os.link(item, dst / item.name)
            except OSError:
                shutil.copyfile(item, dst / item.name)


def status_counts(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row["status"]] = out.get(row["status"], 0) + 1
    return out

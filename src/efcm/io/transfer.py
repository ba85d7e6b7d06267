"""gs:// folders to and from local disk: what a command needs to run where it sees no KFP artifact.

The multi-node training job (`efcm.deploy.training_job`) runs `efcm distill` with gs:// URIs for
its params, manifest, patch coordinates, teacher features and output folder. The stage itself
reads and writes local paths, so the command stages its inputs and uploads its output around it:

- `local_inputs`: each gs:// input (an object or a folder) staged into the slide cache
  (`efcm.io.cache.SlideCache.download`: reused by generation, one download when several
  processes of a node stage it at once); a local path is passed through.
- `local_output`: a local folder for an output that may be gs://. Objects already under the
  gs:// folder (a checkpoint of an earlier attempt) are downloaded first, so a rerun resumes;
  when the block ends the folder is uploaded if `upload` is true (the process whose rank writes
  the outputs), also when it raised: efcm writes files atomically, so what is there is whole (a
  checkpoint to resume from), and the pipeline step copies the outputs only from a job that
  completed. A process that is killed uploads nothing.
- `download_dir` / `upload_dir`: a gs:// folder to a local one and back (the pipeline step copies
  the job's output folder into its output artifact with `download_dir`).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from efcm.io.cache import SlideCache
from efcm.io.gcs import RemoteObject, check_name, is_gcs, split_gcs, stage, upload

log = logging.getLogger(__name__)


class _Folder:
    """An `efcm.io.gcs.ObjectStore` that puts the objects under `prefix` into `dest`, by their
    names relative to the prefix (a download goes to a temporary name, renamed when complete)."""

    def __init__(self, dest: Path, prefix: str) -> None:
        self.dest, self.prefix = dest, prefix

    def _local(self, name: str) -> Path:
        return self.dest / name[len(self.prefix) :]

    def put(self, obj: RemoteObject) -> Path:
        path = self._local(obj.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            obj.download(part)
            part.replace(path)
        finally:
            part.unlink(missing_ok=True)
        return path

    def prune(self, bucket: str, prefix: str, keep: set[str]) -> None:
        wanted = {self._local(name) for name in keep}
        for path in self.dest.rglob("*"):
            if path.is_file() and path not in wanted:
                path.unlink()

    def folder(self, bucket: str, prefix: str) -> Path:
        return self.dest


def download_dir(uri: str, dest: str | Path) -> Path:
    """Every object under the gs:// folder `uri` into `dest`, by its name below `uri`; files in
    `dest` that are not objects there are removed. Returns `dest`.

    Raises:
        ValueError: not a gs:// URI with a bucket and a folder name.
        FileNotFoundError: no object under `uri` (names it).
        PermissionError: the credentials may not read it.
    """
    bucket, name = split_gcs(uri)
    prefix = name.rstrip("/") + "/"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return stage(f"gs://{bucket}/{prefix}", _Folder(dest, prefix))


def upload_dir(src: str | Path, uri: str) -> list[str]:
    """Upload every file under `src` to `<uri>/<its relative path>`; returns the URIs written.

    Raises:
        ValueError: not a gs:// URI, or a file name that cannot be an object name.
        NotADirectoryError: `src` is not a folder.
    """
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"not a folder to upload: {src}")
    base = uri.rstrip("/")
    split_gcs(f"{base}/x")  # a bucket is required; the folder may be the bucket's root
    written = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = f"{base}/{path.relative_to(src).as_posix()}"
        check_name(target, split_gcs(target)[1])
        upload(path, target)
        written.append(target)
    log.info("uploaded %d files from %s to %s", len(written), src, base)
    return written


def local_inputs(uris: Mapping[str, str], cache: SlideCache) -> dict[str, Path]:
    """Each input by name: a gs:// object or folder staged into `cache`, a local path as it is.

    Raises:
        what `SlideCache.download` raises (FileNotFoundError names a missing URI).
    """
    return {name: cache.download(uri) if is_gcs(uri) else Path(uri) for name, uri in uris.items()}


@contextmanager
def local_output(out: str, work: str | Path, *, upload: bool = True) -> Iterator[Path]:
    """A local folder for the output `out`: `out` itself when local; for a gs:// folder, `work`
    (a folder private to this process) with the objects already under `out` in it, uploaded to
    `out` when the block ends (returns or raises) and `upload` is true.

    Raises:
        ValueError: `out` is gs:// and `work` is not an empty folder (or absent).
        what the block raises; an upload that fails after it is logged, not raised over it.
    """
    if not is_gcs(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    work = Path(work)
    if work.exists() and any(work.iterdir()):
        raise ValueError(f"the local folder for {out} must be empty or absent: {work}")
    try:
        download_dir(out, work)
        log.info("resuming from the objects under %s", out)
    except FileNotFoundError:
        work.mkdir(parents=True, exist_ok=True)  # a first attempt: nothing to resume from
    try:
        yield work
    except Exception:
        if upload:  # keep what was saved (a checkpoint): a rerun resumes from it
            try:
                upload_dir(work, out)
            except Exception:
                log.exception("uploading %s to %s after a failure", work, out)
        raise
    if upload:
        upload_dir(work, out)

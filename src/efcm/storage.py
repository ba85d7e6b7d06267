"""Where files live: local paths and gs:// objects staged into a local cache.

A gs:// object is downloaded once into the cache directory (`EFCM_CACHE_DIR`, default
``~/.cache/efcm``) under its bucket/object path, and reused while its size and generation match.
Works against the real GCS API and against an emulator (`STORAGE_EMULATOR_HOST`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b -> (bucket, a/b)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, blob = uri[5:].partition("/")
    if not bucket or not blob:
        raise ValueError(f"gs:// URI needs a bucket and an object name: {uri!r}")
    return bucket, blob


def cache_dir() -> Path:
    return Path(os.environ.get("EFCM_CACHE_DIR", Path.home() / ".cache" / "efcm"))


def gcs_client():
    """A google-cloud-storage client; anonymous against an emulator."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project="efcm-local", credentials=AnonymousCredentials())
    return storage.Client()


def download(uri: str, dest_root: Path | None = None) -> Path:
    """Stage a gs:// object locally (once); returns the local path."""
    bucket_name, name = split_gcs(uri)
    dest = (dest_root or cache_dir()) / "gcs" / bucket_name / name
    blob = gcs_client().bucket(bucket_name).get_blob(name)
    if blob is None:
        raise FileNotFoundError(f"no such object: {uri}")
    marker = dest.with_name(dest.name + ".generation")
    if dest.is_file() and marker.is_file() and marker.read_text() == str(blob.generation):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    os.close(fd)
    try:
        blob.download_to_filename(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    marker.write_text(str(blob.generation))
    log.info("downloaded %s (%d bytes)", uri, dest.stat().st_size)
    return dest


def upload(path: str | Path, uri: str) -> None:
    bucket_name, name = split_gcs(uri)
    gcs_client().bucket(bucket_name).blob(name).upload_from_filename(str(path))


def local_path(uri: str, *, base_dir: str | Path | None = None) -> Path:
    """A local path for `uri`: gs:// is staged into the cache; a relative path is taken from
    base_dir."""
    if is_gcs(uri):
        return download(uri)
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or gs://)")
    p = Path(uri).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def atomic_path(path: Path) -> Path:
    """A temporary sibling name to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")

"""Where files live: local paths, and gs:// objects staged into a local cache.

A gs:// slide is downloaded once into the cache directory (`EFCM_CACHE_DIR`, default
``~/.cache/efcm``) and reused while the object's generation matches: a later call costs one
metadata request and no bytes. Layout of the cache::

    <cache>/gcs/<bucket>/<object>             the staged bytes, under the object's own name
    <cache>/gcs-meta/<bucket>/<object>.json   generation, size and mtime of the staged file
    <cache>/gcs-meta/<bucket>/<object>.lock   held (flock) while one process stages the object
    <cache>/gcs-meta/<bucket>/<object>.*.part bytes in flight (unique per process, then renamed)

A download goes to a temporary name and is renamed into place only when complete (size and the
library's CRC32C check), and its record is written after the rename, so a killed download never
looks complete. Workers staging the same object take turns on the lock: one downloads, the others
then find it current and reuse it. Metadata requests and downloads retry transient errors
(google-cloud-storage's `DEFAULT_RETRY`: 408/429/5xx and connection errors, exponential
backoff); an interrupted download resumes from the bytes it has.

Multi-file slides are staged as a whole:

- ``gs://b/d/x.mrxs``: the ``.mrxs`` file and everything under its sibling folder ``gs://b/d/x/``
  (Slidedat.ini, Index.dat, Data*.dat); OpenSlide then opens the local ``.mrxs``.
- ``gs://b/d/series/`` (a trailing slash, or a name that only exists as a folder): every object
  under the prefix, e.g. a DICOM WSI series. OpenSlide opens a DICOM series by any one of its files
  (it scans that file's folder for the same Series Instance UID), so `local_path` returns one
  ``.dcm`` file of the staged folder. One series per folder.

Size cap (`staged`, used by `efcm predict` and the predictor): while a slide is used, a shared
flock on each of its objects' ``<object>.use`` file marks it in use (its mtime is the last use).
Before an object of known size (its metadata's) is downloaded, the least recently used objects
are removed (record first, then bytes) until the cache holds at most the cap minus that size, so
the volume needs the cap, not the cap plus a slide in flight; after staging the cache is trimmed to
the cap again. The cap is `EFCM_CACHE_MAX_BYTES` (default 20 GiB) or the caller's `cap_bytes`. An
object whose ``.use`` lock another request holds is never removed, so the cache can stay over the
cap while every slide in it is in use. A later request for an evicted slide downloads it again.

Works against the real GCS API and against an emulator (`STORAGE_EMULATOR_HOST`).
`download_stats()` counts what this process downloaded and reused (tests assert on it).
"""

from __future__ import annotations

import contextvars
import functools
import glob
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from efcm.errors import TooLarge
from efcm.limits import cache_dir, cache_max_bytes

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds per HTTP request (connect / between bytes)
METADATA_DEADLINE = 120.0  # seconds of retrying a metadata GET or a listing
DOWNLOAD_DEADLINE = 1800.0  # seconds of retrying one object's download (slides are GBs)


@dataclass(frozen=True)
class DownloadStats:
    """What this process staged from gs:// since the last reset."""

    objects: int = 0  # objects downloaded
    bytes: int = 0  # bytes downloaded
    reused: int = 0  # objects found current in the cache (no bytes moved)


_stats = DownloadStats()
_stats_lock = threading.Lock()


def download_stats() -> DownloadStats:
    """Objects and bytes this process downloaded, and objects it reused, since the last reset.

    Per process: downloads made by worker processes are counted in those processes.
    """
    return _stats


def reset_download_stats() -> None:
    global _stats
    with _stats_lock:
        _stats = DownloadStats()


def _count(objects: int = 0, nbytes: int = 0, reused: int = 0) -> None:
    global _stats
    with _stats_lock:
        _stats = DownloadStats(
            _stats.objects + objects, _stats.bytes + nbytes, _stats.reused + reused
        )


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b -> (bucket, a/b).

    Raises:
        ValueError: not a gs:// URI, or no bucket or no object name.
    """
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, blob = uri[5:].partition("/")
    if not bucket or not blob:
        raise ValueError(f"gs:// URI needs a bucket and an object name: {uri!r}")
    return bucket, blob


def gcs_client():
    """A google-cloud-storage client (one per process and endpoint); anonymous against an
    emulator."""
    return _client(os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST") or "")


@functools.lru_cache(maxsize=4)
def _client(pid: int, emulator: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if emulator:
        return storage.Client(project="efcm-local", credentials=AnonymousCredentials())
    return storage.Client()


def _retry(deadline: float):
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(deadline)


def download(uri: str, dest_root: Path | None = None, *, max_bytes: int | None = None) -> Path:
    """Stage a gs:// slide (or any object) into the local cache, once; returns its local path.

    An object -> its local file. ``.mrxs`` -> the local ``.mrxs`` file, with its sibling data
    folder staged beside it. A folder (``gs://b/series/``, or a name that exists only as a
    prefix) -> the local folder holding every object under it. Objects whose generation and size
    match the cache are reused without downloading.

    Args:
        uri: ``gs://bucket/object``, ``gs://bucket/slide.mrxs`` or ``gs://bucket/folder/``.
        dest_root: the cache directory (default `cache_dir()`).
        max_bytes: refuse (TooLarge, before any byte moves) a slide whose objects add up to more.

    Raises:
        ValueError: not a gs:// URI, no bucket or object name, or an object name that cannot be a
            local path (``..``, empty segments).
        FileNotFoundError: no such object (or folder, or MRXS data folder); names the URI.
        PermissionError: the credentials may not read it.
        TooLarge: over `max_bytes`.
    """
    from google.api_core import exceptions as gexc

    bucket, name = split_gcs(uri)
    root = Path(dest_root) if dest_root is not None else cache_dir()
    _check_name(uri, name)
    for attempt in range(2):
        try:
            if name.endswith("/"):
                return _stage_folder(uri, bucket, name, root, max_bytes)
            if name.lower().endswith(".mrxs"):
                return _stage_mrxs(uri, bucket, name, root, max_bytes)
            return _stage_object(uri, bucket, name, root, max_bytes)
        except gexc.NotFound as err:
            # the generation we listed was replaced while we downloaded it: look again, once
            if attempt:
                raise FileNotFoundError(f"no such object: {uri} ({err.message})") from None
            log.info("%s changed while staging; retrying with its new generation", uri)
        except (gexc.Forbidden, gexc.Unauthorized) as err:
            raise PermissionError(f"access denied to {uri}: {err.message}") from None
    raise AssertionError("unreachable")


def _check_name(uri: str, name: str) -> None:
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"gs:// object name cannot be staged as a local path: {uri!r}")


def _check_size(uri: str, blobs: list[Any], max_bytes: int | None) -> None:
    total = sum(int(b.size or 0) for b in blobs)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(f"{uri}: {total} bytes, over the limit of {max_bytes} bytes")


def _stage_object(
    uri: str, bucket: str, name: str, root: Path, max_bytes: int | None = None
) -> Path:
    blob = (
        gcs_client().bucket(bucket).get_blob(name, retry=_retry(METADATA_DEADLINE), timeout=TIMEOUT)
    )
    if blob is None:
        if _list(uri, bucket, name + "/", max_results=1, placeholders=True):
            return _stage_folder(uri, bucket, name + "/", root, max_bytes)  # named without '/'
        raise FileNotFoundError(f"no such object: {uri}")
    _check_size(uri, [blob], max_bytes)
    return _stage_blob(blob, root)


def _stage_mrxs(uri: str, bucket: str, name: str, root: Path, max_bytes: int | None = None) -> Path:
    blob = (
        gcs_client().bucket(bucket).get_blob(name, retry=_retry(METADATA_DEADLINE), timeout=TIMEOUT)
    )
    if blob is None:
        raise FileNotFoundError(f"no such object: {uri}")
    data_prefix = name[: -len(".mrxs")] + "/"
    data = _list(uri, bucket, data_prefix)
    if not data:
        raise FileNotFoundError(
            f"{uri}: MRXS slide without its data folder gs://{bucket}/{data_prefix}"
        )
    _check_size(uri, [blob, *data], max_bytes)
    for b in data:
        _stage_blob(b, root)
    _prune(root, bucket, data_prefix, {b.name for b in data})
    return _stage_blob(blob, root)


def _stage_folder(
    uri: str, bucket: str, prefix: str, root: Path, max_bytes: int | None = None
) -> Path:
    blobs = _list(uri, bucket, prefix)
    if not blobs:
        raise FileNotFoundError(f"no objects under {uri}")
    _check_size(uri, blobs, max_bytes)
    for b in blobs:
        _check_name(f"gs://{bucket}/{b.name}", b.name)
        _stage_blob(b, root)
    _prune(root, bucket, prefix, {b.name for b in blobs})
    return _data_path(root, bucket, prefix)


def _list(
    uri: str, bucket: str, prefix: str, max_results: int | None = None, placeholders: bool = False
) -> list[Any]:
    """The objects under `prefix`; folder placeholders (names ending in '/') only if asked."""
    from google.api_core import exceptions as gexc

    try:
        it = gcs_client().list_blobs(
            bucket,
            prefix=prefix,
            max_results=max_results,
            retry=_retry(METADATA_DEADLINE),
            timeout=TIMEOUT,
        )
        return [b for b in it if placeholders or not b.name.endswith("/")]
    except gexc.NotFound:
        raise FileNotFoundError(f"no such object: {uri} (no bucket {bucket!r})") from None


def _data_path(root: Path, bucket: str, name: str) -> Path:
    return root / "gcs" / bucket / PurePosixPath(name)


def _meta_path(root: Path, bucket: str, name: str, suffix: str) -> Path:
    p = root / "gcs-meta" / bucket / PurePosixPath(name)
    return p.with_name(p.name + suffix)


def _record(dest: Path, generation: int, size: int) -> dict[str, int]:
    return {"generation": int(generation), "size": int(size), "mtime_ns": dest.stat().st_mtime_ns}


def _is_current(dest: Path, meta: Path, generation: int, size: int) -> bool:
    """The staged file is this generation of the object, complete and untouched since."""
    try:
        rec = json.loads(meta.read_text())
        return rec == _record(dest, generation, size) and dest.stat().st_size == size
    except (OSError, ValueError):
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes (no-op where flock does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: unique temp names + rename still hold
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stage_blob(blob: Any, root: Path) -> Path:
    """Download one listed/fetched object unless the cache already holds its generation."""
    bucket, name = blob.bucket.name, blob.name
    uri = f"gs://{bucket}/{name}"
    # read before downloading: the download overwrites them from response headers (if any)
    generation, size = int(blob.generation), int(blob.size)
    dest = _data_path(root, bucket, name)
    meta = _meta_path(root, bucket, name, ".json")
    _hold(root, bucket, name)  # inside `staged`: in use from here on, never evicted
    if _is_current(dest, meta, generation, size):
        _count(reused=1)
        return dest
    with _locked(_meta_path(root, bucket, name, ".lock")):
        if _is_current(dest, meta, generation, size):  # another worker staged it while we waited
            _count(reused=1)
            return dest
        _remove_stale_parts(meta.parent, dest.name)
        holder = _holder.get()
        if holder is not None and holder.cap_bytes is not None:
            # room first: the cache volume must hold the cap, not the cap plus this download
            evict_lru(root, holder.cap_bytes - size)
        t0 = time.perf_counter()
        tmp = _meta_path(root, bucket, name, f".{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            # `blob` carries its generation, so these bytes are exactly the version we checked
            blob.download_to_filename(str(tmp), retry=_retry(DOWNLOAD_DEADLINE), timeout=TIMEOUT)
            got = tmp.stat().st_size
            if got != size:
                raise OSError(f"{uri}: downloaded {got} bytes, expected {size}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        _write_json(meta, _record(dest, generation, size))
    _count(objects=1, nbytes=size)
    if holder is not None:
        holder.downloaded_bytes += size
    log.info(
        "downloaded %s (generation %s, %d bytes, %.1f s)",
        uri,
        generation,
        size,
        time.perf_counter() - t0,
    )
    return dest


def _remove_stale_parts(folder: Path, name: str) -> None:
    """Bytes left by a killed download of this object (we hold its lock: no one else writes)."""
    part = re.compile(rf"{re.escape(name)}\.\d+\.[0-9a-f]{{8}}\.part")
    for p in folder.glob(f"{glob.escape(name)}.*.part"):
        if part.fullmatch(p.name):
            log.info("removing %s: left by an interrupted download", p)
            p.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _prune(root: Path, bucket: str, prefix: str, keep: Iterable[str]) -> None:
    """Remove staged files under `prefix` whose objects are gone (a series must not gain stale
    files)."""
    folder = _data_path(root, bucket, prefix)
    keep_paths = {_data_path(root, bucket, n) for n in keep}
    for p in folder.rglob("*"):
        if p.is_file() and p not in keep_paths:
            log.info("removing %s: its object is gone from gs://%s/%s", p, bucket, prefix)
            p.unlink(missing_ok=True)
            rel = p.relative_to(root / "gcs" / bucket).as_posix()
            _meta_path(root, bucket, rel, ".json").unlink(missing_ok=True)


# -- the size cap: in-use marks and LRU eviction ----------------------------------------------


@dataclass
class StagedSlide:
    """What `staged` yields: the local path OpenSlide opens, and the bytes this call downloaded
    (0 when the cache already held the slide, and for local paths)."""

    path: Path
    downloaded_bytes: int = 0
    cap_bytes: int | None = field(default=None, repr=False)  # the cache cap while staging
    _held: list[Any] = field(default_factory=list, repr=False)


_holder: contextvars.ContextVar[StagedSlide | None] = contextvars.ContextVar(
    "efcm_cache_holder", default=None
)


def _hold(root: Path, bucket: str, name: str) -> None:
    """Inside `staged`: mark the object in use (a shared flock, released when `staged` exits)."""
    holder = _holder.get()
    if holder is None:
        return
    import fcntl

    use = _meta_path(root, bucket, name, ".use")
    use.parent.mkdir(parents=True, exist_ok=True)
    fh = open(use, "a")  # noqa: SIM115 (closed when `staged` exits)
    fcntl.flock(fh, fcntl.LOCK_SH)
    holder._held.append(fh)
    os.utime(use)  # the last use, for LRU


def _release(held: list[Any]) -> None:
    import fcntl

    for fh in held:
        try:
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()


@contextmanager
def staged(
    uri: str, *, max_bytes: int | None = None, cap_bytes: int | None = None
) -> Iterator[StagedSlide]:
    """The local path of a slide, held in the cache for the duration of the block.

    A gs:// slide is staged (see `download`) and its objects are marked in use, so that no
    eviction removes them while the block runs. The cache is kept to `cap_bytes` (default
    `cache_max_bytes()`), least recently used first: before each download it is trimmed to
    `cap_bytes` minus the object's size, and after staging to `cap_bytes`. A local path is
    returned as it is (its size is checked against `max_bytes` too).

    Raises:
        TooLarge: the slide is over `max_bytes`.
        and what `download` / `local_path` raise.
    """
    if not is_gcs(uri):
        p = local_path(uri)
        if max_bytes is not None and p.is_file() and p.stat().st_size > max_bytes:
            raise TooLarge(f"{uri}: {p.stat().st_size} bytes, over the limit of {max_bytes} bytes")
        yield StagedSlide(p)
        return
    cap = cache_max_bytes() if cap_bytes is None else cap_bytes
    holder = StagedSlide(Path(), cap_bytes=cap)
    token = _holder.set(holder)
    try:
        try:
            p = download(uri, max_bytes=max_bytes)
        finally:
            _holder.reset(token)
        holder.path = dicom_series_file(p) if p.is_dir() else p
        evict_lru(cache_dir(), cap)
        yield holder
    finally:
        _release(holder._held)


def _cache_entries(root: Path) -> list[tuple[float, int, Path, Path, Path]]:
    """(last use, size, record, data, use-mark) of every staged object."""
    out = []
    meta_root, data_root = root / "gcs-meta", root / "gcs"
    for rec in meta_root.rglob("*.json"):
        rel = rec.relative_to(meta_root).as_posix()[: -len(".json")]
        data = data_root / PurePosixPath(rel)
        use = rec.with_name(rec.name[: -len(".json")] + ".use")
        try:
            size = int(json.loads(rec.read_text())["size"])
            last = use.stat().st_mtime if use.exists() else rec.stat().st_mtime
        except (OSError, ValueError, KeyError):
            continue
        out.append((last, size, rec, data, use))
    return sorted(out, key=lambda e: e[0])


def cache_size(root: Path | None = None) -> int:
    """Bytes of staged objects in the cache (by their records)."""
    return sum(e[1] for e in _cache_entries(cache_dir() if root is None else root))


def evict_lru(root: Path, cap_bytes: int) -> int:
    """Remove least recently used staged objects until the cache holds at most `cap_bytes`;
    objects in use (their `.use` lock held by anyone) are skipped. Returns the bytes removed."""
    import fcntl

    entries = _cache_entries(root)
    total = sum(e[1] for e in entries)
    removed = 0
    for _, size, rec, data, use in entries:
        if total <= cap_bytes:
            break
        with open(use, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a request (of this or another process)
            try:
                rec.unlink(missing_ok=True)  # the record first: no one takes it as current
                data.unlink(missing_ok=True)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        log.info("cache: evicted %s (%d bytes, least recently used)", data, size)
        total -= size
        removed += size
    if total > cap_bytes:
        log.warning(
            "cache: %d bytes over the cap of %d: every other slide is in use", total, cap_bytes
        )
    return removed


def dicom_series_file(folder: Path) -> Path:
    """The file OpenSlide should open for a DICOM series folder: its first ``.dcm`` file (any file
    of the series opens the whole series); the folder itself when it has none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    return files[0] if files else Path(folder)


def upload(path: str | Path, uri: str) -> None:
    bucket_name, name = split_gcs(uri)
    gcs_client().bucket(bucket_name).blob(name).upload_from_filename(str(path), timeout=TIMEOUT)


def local_path(uri: str, *, base_dir: str | Path | None = None) -> Path:
    """A local path for `uri`, ready for OpenSlide or `open`.

    gs:// is staged into the cache (see `download`); a relative path is taken from `base_dir`.
    A folder holding a DICOM series (staged or local) becomes one of its ``.dcm`` files.
    """
    if is_gcs(uri):
        p = download(uri)
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or gs://)")
    else:
        p = Path(uri).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
    return dicom_series_file(p) if p.is_dir() else p

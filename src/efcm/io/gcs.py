"""gs:// objects: the client, staging a slide's objects into a local store, and upload.

`stage` finds the objects a slide is made of and hands each one to an `ObjectStore` (the slide
cache, `efcm.io.cache.SlideCache`), which keeps it current on local disk; this module knows GCS,
the store knows the local layout, its locks and its size cap.

What a URI stages:

- ``gs://b/d/x.svs`` (any object): that object.
- ``gs://b/d/x.mrxs``: the ``.mrxs`` file and everything under its sibling folder ``gs://b/d/x/``
  (Slidedat.ini, Index.dat, Data*.dat); OpenSlide then opens the local ``.mrxs``.
- ``gs://b/d/series/`` (a trailing slash, or a name that only exists as a folder): every object
  under the prefix, e.g. a DICOM WSI series; folder placeholders (names ending in ``/``) are
  skipped, and staged files whose objects are gone are pruned. One series per folder.

An object is handed over with the generation and size its metadata gave, and `RemoteObject.download`
fetches exactly that generation (the size and the library's CRC32C are checked). If that
generation is replaced while it downloads, the whole slide is looked up again, once. Metadata
requests and downloads retry transient errors (google-cloud-storage's `DEFAULT_RETRY`:
408/429/5xx and connection errors, exponential backoff); an interrupted download resumes from the
bytes it has.

The client is one per thread (and per process, and per emulator endpoint): google-cloud-storage
builds it on a `requests` session, which requests does not promise to be thread-safe, so serving
threads never share one. Works against the real GCS API and against an emulator
(`STORAGE_EMULATOR_HOST`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from efcm.errors import TooLarge

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds per HTTP request (connect / between bytes)
METADATA_DEADLINE = 120.0  # seconds of retrying a metadata GET or a listing
DOWNLOAD_DEADLINE = 1800.0  # seconds of retrying one object's download (slides are GBs)


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


# -- the client: one per thread -------------------------------------------------------------------

_clients = threading.local()  # .by_key: {(pid, emulator endpoint): Client} of this thread


def gcs_client():
    """This thread's google-cloud-storage client (anonymous against an emulator).

    One per thread: the client's `requests` session is not documented as safe to share between
    threads. Keyed by pid as well, because a forked child inherits its parent's thread-local data
    and must not reuse the parent's connections; and by `STORAGE_EMULATOR_HOST`, read on every call
    (google-cloud-storage itself reads it when the client is made).
    """
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST") or "")
    by_key: dict[tuple[int, str], Any] = getattr(_clients, "by_key", None) or {}
    if key not in by_key:
        if len(by_key) >= 4:  # another endpoint (tests switch emulators) or a fork: drop old ones
            by_key.clear()
        by_key[key] = _new_client(bool(key[1]))
        _clients.by_key = by_key
    return by_key[key]


def _new_client(emulator: bool):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if emulator:
        return storage.Client(project="efcm-local", credentials=AnonymousCredentials())
    return storage.Client()


def _retry(deadline: float):
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(deadline)


# -- staging --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteObject:
    """One object at the generation and size its metadata gave when it was looked up."""

    bucket: str
    name: str
    generation: int
    size: int
    _blob: Any = field(repr=False, compare=False)  # the Blob, pinned to `generation`

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @classmethod
    def of(cls, blob: Any) -> RemoteObject:
        # read now: a download overwrites them from its response headers (if any)
        return cls(blob.bucket.name, blob.name, int(blob.generation), int(blob.size or 0), blob)

    def download(self, dest: Path) -> None:
        """Write this generation's bytes to `dest` (retried; resumed when interrupted).

        Raises:
            OSError: the bytes written are not `size` bytes.
            google.api_core.exceptions.NotFound: the generation was replaced meanwhile (`stage`
                looks the slide up again).
        """
        self._blob.download_to_filename(str(dest), retry=_retry(DOWNLOAD_DEADLINE), timeout=TIMEOUT)
        got = dest.stat().st_size
        if got != self.size:
            raise OSError(f"{self.uri}: downloaded {got} bytes, expected {self.size}")


class ObjectStore(Protocol):
    """Where `stage` puts objects: the local copy of each, kept current by generation."""

    def put(self, obj: RemoteObject) -> Path:
        """The local file of `obj`, downloaded unless the store holds this generation already."""

    def prune(self, bucket: str, prefix: str, keep: set[str]) -> None:
        """Remove the local files under `prefix` whose object names are not in `keep`."""

    def folder(self, bucket: str, prefix: str) -> Path:
        """The local folder that holds the objects under `prefix`."""


def stage(uri: str, store: ObjectStore, *, max_bytes: int | None = None) -> Path:
    """Put the objects of the slide `uri` into `store`; returns the local path to open.

    An object -> its local file. ``.mrxs`` -> the local ``.mrxs`` file, with its sibling data folder
    staged beside it. A folder (``gs://b/series/``, or a name that exists only as a prefix) -> the
    local folder holding every object under it.

    Raises:
        ValueError: not a gs:// URI, no bucket or object name, or an object name that cannot be a
            local path (``..``, empty segments).
        FileNotFoundError: no such object (or folder, or MRXS data folder); names the URI.
        PermissionError: the credentials may not read it.
        TooLarge: the slide's objects add up to more than `max_bytes` (before any byte moves).
    """
    from google.api_core import exceptions as gexc

    bucket, name = split_gcs(uri)
    check_name(uri, name)
    for attempt in range(2):
        try:
            if name.endswith("/"):
                return _stage_folder(uri, bucket, name, store, max_bytes)
            if name.lower().endswith(".mrxs"):
                return _stage_mrxs(uri, bucket, name, store, max_bytes)
            return _stage_object(uri, bucket, name, store, max_bytes)
        except gexc.NotFound as err:
            # the generation we listed was replaced while we downloaded it: look again, once
            if attempt:
                raise FileNotFoundError(f"no such object: {uri} ({err.message})") from None
            log.info("%s changed while staging; retrying with its new generation", uri)
        except (gexc.Forbidden, gexc.Unauthorized) as err:
            raise PermissionError(f"access denied to {uri}: {err.message}") from None
    raise AssertionError("unreachable")


def check_name(uri: str, name: str) -> None:
    """Refuse an object name that cannot be a local path below the store (``..``, ``a//b``)."""
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"gs:// object name cannot be staged as a local path: {uri!r}")


def _check_size(uri: str, objects: Iterable[RemoteObject], max_bytes: int | None) -> None:
    total = sum(o.size for o in objects)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(f"{uri}: {total} bytes, over the limit of {max_bytes} bytes")


def _get(bucket: str, name: str) -> RemoteObject | None:
    blob = (
        gcs_client().bucket(bucket).get_blob(name, retry=_retry(METADATA_DEADLINE), timeout=TIMEOUT)
    )
    return None if blob is None else RemoteObject.of(blob)


def _stage_object(
    uri: str, bucket: str, name: str, store: ObjectStore, max_bytes: int | None
) -> Path:
    obj = _get(bucket, name)
    if obj is None:
        if _list(uri, bucket, name + "/", max_results=1, placeholders=True):
            return _stage_folder(uri, bucket, name + "/", store, max_bytes)  # named without '/'
        raise FileNotFoundError(f"no such object: {uri}")
    _check_size(uri, [obj], max_bytes)
    return store.put(obj)


def _stage_mrxs(
    uri: str, bucket: str, name: str, store: ObjectStore, max_bytes: int | None
) -> Path:
    obj = _get(bucket, name)
    if obj is None:
        raise FileNotFoundError(f"no such object: {uri}")
    data_prefix = name[: -len(".mrxs")] + "/"
    data = _list(uri, bucket, data_prefix)
    if not data:
        raise FileNotFoundError(
            f"{uri}: MRXS slide without its data folder gs://{bucket}/{data_prefix}"
        )
    _check_size(uri, [obj, *data], max_bytes)
    for o in data:
        store.put(o)
    store.prune(bucket, data_prefix, {o.name for o in data})
    return store.put(obj)


def _stage_folder(
    uri: str, bucket: str, prefix: str, store: ObjectStore, max_bytes: int | None
) -> Path:
    objects = _list(uri, bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    _check_size(uri, objects, max_bytes)
    for o in objects:
        check_name(o.uri, o.name)
        store.put(o)
    store.prune(bucket, prefix, {o.name for o in objects})
    return store.folder(bucket, prefix)


def _list(
    uri: str, bucket: str, prefix: str, max_results: int | None = None, placeholders: bool = False
) -> list[RemoteObject]:
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
        return [RemoteObject.of(b) for b in it if placeholders or not b.name.endswith("/")]
    except gexc.NotFound:
        raise FileNotFoundError(f"no such object: {uri} (no bucket {bucket!r})") from None


def upload(path: str | Path, uri: str) -> RemoteObject:
    """Upload the file `path` to the object `uri` (the object appears whole or not at all);
    returns it with the generation and size the upload made. Retried on transient errors: a
    repeated upload of the same file writes the same bytes."""
    bucket_name, name = split_gcs(uri)
    blob = gcs_client().bucket(bucket_name).blob(name)
    blob.upload_from_filename(str(path), timeout=TIMEOUT, retry=_retry(DOWNLOAD_DEADLINE))
    return RemoteObject.of(blob)


def lookup(uri: str) -> RemoteObject | None:
    """The object `uri` at its current generation, or None when there is none."""
    return _get(*split_gcs(uri))


def _pinned(uri: str, generation: int | None) -> Any:
    bucket_name, name = split_gcs(uri)
    return gcs_client().bucket(bucket_name).blob(name, generation=generation)


def read_range(uri: str, generation: int | None, start: int, length: int) -> bytes:
    """`length` bytes of the object `uri` from byte `start` (one ranged GET, retried), of
    `generation` when given: a replaced object is then NotFound, never other bytes.

    Raises:
        google.api_core.exceptions.NotFound: no such object (or generation).
        OSError: fewer bytes than asked for (the object is shorter).
    """
    if length <= 0:
        return b""
    data = _pinned(uri, generation).download_as_bytes(
        start=start, end=start + length - 1, retry=_retry(DOWNLOAD_DEADLINE), timeout=TIMEOUT
    )
    if len(data) != length:
        raise OSError(f"{uri}: read {len(data)} bytes at {start}, expected {length}")
    return data


def open_read(uri: str, generation: int | None, chunk_size: int = 8 << 20) -> Any:
    """A file object streaming the object `uri` (of `generation` when given) in `chunk_size`
    ranged GETs: a sequential read of a large object without staging it on disk."""
    return _pinned(uri, generation).open(
        "rb", chunk_size=chunk_size, retry=_retry(DOWNLOAD_DEADLINE), timeout=TIMEOUT
    )

"""The slide cache: gs:// slides staged once on local disk, reused by generation, capped in size.

A `SlideCache(root, max_bytes)` is an object: the adapters (the CLI, the server, the KFP
components) make it, with `SlideCache.from_env()` (`EFCM_CACHE_DIR` and `EFCM_CACHE_MAX_BYTES`,
parsed by `efcm.limits`), and hand it down as `cache=`; the library never reads those variables.
A function given no cache resolves local paths only, and refuses a gs:// URI with a ValueError.

A gs:// slide is staged once (`efcm.io.gcs.stage` finds its objects: one object, an MRXS file and
its data folder, or a DICOM series folder) and reused while each object's generation matches: a
later call costs one metadata request and no bytes. Layout under `root`::

    gcs/<bucket>/<object>                    the staged bytes, under the object's own name
    gcs-meta/<bucket>/<object>.json          generation, size and mtime of the staged file
    gcs-meta/<bucket>/<object>.lock          held (flock) while one worker stages the object
    gcs-meta/<bucket>/<object>.use           shared flock while a `staged` block uses the object
                                             (its mtime is the last use)
    gcs-meta/<bucket>/<object>.<pid>.<hex>.part  bytes in flight (unique per download, renamed)

A download goes to a temporary name and is renamed into place only when complete, and its record
is written after the rename, so a killed download never looks complete. Workers (processes or
threads) staging the same object take turns on its lock: one downloads, the others then find it
current and reuse it.

Size cap (`staged`, used by `efcm predict` and the server): while a slide is used, a shared flock
on each of its objects' ``.use`` file marks it in use. Before an object is downloaded, the least
recently used objects are removed (record first, then bytes) until the cache holds at most
`max_bytes` minus that object's size, so the volume needs the cap, not the cap plus a slide in
flight; after staging the cache is trimmed to `max_bytes` again. An object whose ``.use`` lock
another request holds is never removed, so the cache can stay over the cap while every slide in
it is in use. A later request for an evicted slide downloads it again. `download` and
`local_path` (the batch stages) stage without the cap.

`SlideCache.stats` counts what this object downloaded and reused. A cache handed to worker
processes is copied: their downloads are counted in their copies.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from efcm.errors import TooLarge
from efcm.io.files import save_json
from efcm.io.gcs import RemoteObject, is_gcs, stage
from efcm.limits import cache_dir, cache_max_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadStats:
    """What one `SlideCache` staged from gs://."""

    objects: int = 0  # objects downloaded
    bytes: int = 0  # bytes downloaded
    reused: int = 0  # objects found current in the cache (no bytes moved)


@dataclass
class StagedSlide:
    """What `staged` yields: the local path OpenSlide opens, and the bytes this call downloaded
    (0 when the cache already held the slide, and for local paths)."""

    path: Path
    downloaded_bytes: int = 0


class SlideCache:
    """gs:// slides staged under `root`, at most `max_bytes` of them while `staged` is used."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"SlideCache max_bytes must be > 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._stats = DownloadStats()
        self._stats_lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SlideCache:
        """The cache `EFCM_CACHE_DIR` and `EFCM_CACHE_MAX_BYTES` configure (see `efcm.limits`).

        For the adapters: the CLI, the server and the components call it and pass the object on.
        """
        return cls(cache_dir(environ), cache_max_bytes(environ))

    def __repr__(self) -> str:
        return f"SlideCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_stats_lock"]  # a worker process counts in its own copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()

    @property
    def stats(self) -> DownloadStats:
        """Objects and bytes this cache object downloaded, and objects it reused."""
        return self._stats

    def _count(self, objects: int = 0, nbytes: int = 0, reused: int = 0) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = DownloadStats(s.objects + objects, s.bytes + nbytes, s.reused + reused)

    # -- staging ----------------------------------------------------------------------------------

    def download(self, uri: str, *, max_slide_bytes: int | None = None) -> Path:
        """Stage a gs:// slide (or any object) once; returns its local path: the file, the
        ``.mrxs`` file (its data folder beside it), or the folder of a series. Objects whose
        generation and size match the cache are reused without downloading.

        Raises:
            what `efcm.io.gcs.stage` raises (ValueError, FileNotFoundError, PermissionError,
            TooLarge over `max_slide_bytes`).
        """
        return stage(uri, _Staging(self, hold=False), max_bytes=max_slide_bytes)

    @contextmanager
    def staged(self, uri: str, *, max_slide_bytes: int | None = None) -> Iterator[StagedSlide]:
        """The local path of a slide, held in the cache for the duration of the block.

        A gs:// slide is staged (see `download`) and its objects are marked in use, so that no
        eviction removes them while the block runs; the cache is kept to `max_bytes` (see the
        module docstring). A local path is returned as it is (its size is checked too).

        Raises:
            TooLarge: the slide is over `max_slide_bytes`.
            and what `download` / `local_path` raise.
        """
        if not is_gcs(uri):
            yield _local_slide(uri, max_slide_bytes)
            return
        session = _Staging(self, hold=True)
        try:
            p = stage(uri, session, max_bytes=max_slide_bytes)
            path = dicom_series_file(p) if p.is_dir() else p
            self.evict()
            yield StagedSlide(path, session.downloaded_bytes)
        finally:
            session.release()

    # -- size and eviction ------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes of staged objects in the cache (by their records)."""
        return sum(e[1] for e in self._entries())

    def evict(self, cap_bytes: int | None = None) -> int:
        """Remove least recently used staged objects until the cache holds at most `cap_bytes`
        (default `max_bytes`); objects in use (their `.use` lock held by anyone) are skipped.
        Returns the bytes removed."""
        import fcntl

        cap = self.max_bytes if cap_bytes is None else cap_bytes
        entries = self._entries()
        total = sum(e[1] for e in entries)
        removed = 0
        for _, size, rec, data, use in entries:
            if total <= cap:
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
        if total > cap:
            log.warning(
                "cache: %d bytes over the cap of %d: every other slide is in use", total, cap
            )
        return removed

    def _entries(self) -> list[tuple[float, int, Path, Path, Path]]:
        """(last use, size, record, data, use-mark) of every staged object, oldest use first."""
        out = []
        meta_root, data_root = self.root / "gcs-meta", self.root / "gcs"
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

    # -- layout -----------------------------------------------------------------------------------

    def _data_path(self, bucket: str, name: str) -> Path:
        return self.root / "gcs" / bucket / PurePosixPath(name)

    def _meta_path(self, bucket: str, name: str, suffix: str) -> Path:
        p = self.root / "gcs-meta" / bucket / PurePosixPath(name)
        return p.with_name(p.name + suffix)


class _Staging:
    """One staging call (`efcm.io.gcs.ObjectStore`): puts objects into the cache; inside
    `SlideCache.staged` (`hold`), also marks each object in use and makes room before a download."""

    def __init__(self, cache: SlideCache, *, hold: bool) -> None:
        self.cache, self.hold = cache, hold
        self.downloaded_bytes = 0
        self._held: list[IO[str]] = []

    def folder(self, bucket: str, prefix: str) -> Path:
        return self.cache._data_path(bucket, prefix)

    def put(self, obj: RemoteObject) -> Path:
        """Download `obj` unless the cache already holds its generation."""
        cache = self.cache
        dest = cache._data_path(obj.bucket, obj.name)
        meta = cache._meta_path(obj.bucket, obj.name, ".json")
        if self.hold:
            self._hold(obj)  # in use from here on, never evicted
        if _is_current(dest, meta, obj.generation, obj.size):
            cache._count(reused=1)
            return dest
        with _locked(cache._meta_path(obj.bucket, obj.name, ".lock")):
            if _is_current(dest, meta, obj.generation, obj.size):  # staged while we waited
                cache._count(reused=1)
                return dest
            _remove_stale_parts(meta.parent, dest.name)
            if self.hold:
                # room first: the cache volume must hold the cap, not the cap plus this download
                cache.evict(cache.max_bytes - obj.size)
            t0 = time.perf_counter()
            tmp = cache._meta_path(
                obj.bucket, obj.name, f".{os.getpid()}.{secrets.token_hex(4)}.part"
            )
            try:
                obj.download(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            save_json(meta, _record(dest, obj.generation, obj.size))
        cache._count(objects=1, nbytes=obj.size)
        self.downloaded_bytes += obj.size
        log.info(
            "downloaded %s (generation %s, %d bytes, %.1f s)",
            obj.uri,
            obj.generation,
            obj.size,
            time.perf_counter() - t0,
        )
        return dest

    def prune(self, bucket: str, prefix: str, keep: set[str]) -> None:
        """Remove staged files under `prefix` whose objects are gone (a series must not gain
        stale files)."""
        cache = self.cache
        folder = cache._data_path(bucket, prefix)
        keep_paths = {cache._data_path(bucket, n) for n in keep}
        for p in folder.rglob("*"):
            if p.is_file() and p not in keep_paths:
                log.info("removing %s: its object is gone from gs://%s/%s", p, bucket, prefix)
                p.unlink(missing_ok=True)
                rel = p.relative_to(cache.root / "gcs" / bucket).as_posix()
                cache._meta_path(bucket, rel, ".json").unlink(missing_ok=True)

    def _hold(self, obj: RemoteObject) -> None:
        """Mark the object in use: a shared flock, released by `release`."""
        import fcntl

        use = self.cache._meta_path(obj.bucket, obj.name, ".use")
        use.parent.mkdir(parents=True, exist_ok=True)
        fh = open(use, "a")  # noqa: SIM115 (closed by `release`)
        fcntl.flock(fh, fcntl.LOCK_SH)
        self._held.append(fh)
        os.utime(use)  # the last use, for LRU

    def release(self) -> None:
        import fcntl

        held, self._held = self._held, []
        for fh in held:
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            finally:
                fh.close()


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
    """An exclusive advisory lock between processes, and between threads (each call opens the file
    anew: flock locks belong to the open file); a no-op where flock does not exist."""
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


def _remove_stale_parts(folder: Path, name: str) -> None:
    """Bytes left by a killed download of this object (we hold its lock: no one else writes)."""
    part = re.compile(rf"{re.escape(name)}\.\d+\.[0-9a-f]{{8}}\.part")
    for p in folder.glob(f"{glob.escape(name)}.*.part"):
        if part.fullmatch(p.name):
            log.info("removing %s: left by an interrupted download", p)
            p.unlink(missing_ok=True)


# -- local paths ----------------------------------------------------------------------------------


def _require(cache: SlideCache | None, uri: str) -> SlideCache:
    if cache is None:
        raise ValueError(
            f"{uri}: a gs:// URI is staged through a slide cache, and none was given "
            "(pass cache=SlideCache(...); the CLI, the server and the components pass "
            "SlideCache.from_env())"
        )
    return cache


def dicom_series_file(folder: Path) -> Path:
    """The file OpenSlide should open for a DICOM series folder: its first ``.dcm`` file (any file
    of the series opens the whole series); the folder itself when it has none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    return files[0] if files else Path(folder)


def local_path(
    uri: str, *, cache: SlideCache | None = None, base_dir: str | Path | None = None
) -> Path:
    """A local path for `uri`, ready for OpenSlide or `open`.

    gs:// is staged into `cache` (see `SlideCache.download`); a relative path is taken from
    `base_dir`. A folder holding a DICOM series (staged or local) becomes one of its ``.dcm``
    files.

    Raises:
        ValueError: an unsupported scheme, or a gs:// URI with no `cache`.
        and what `SlideCache.download` raises.
    """
    if is_gcs(uri):
        p = _require(cache, uri).download(uri)
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri!r} (use a local path or gs://)")
    else:
        p = Path(uri).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
    return dicom_series_file(p) if p.is_dir() else p


def _local_slide(uri: str, max_slide_bytes: int | None) -> StagedSlide:
    p = local_path(uri)
    if max_slide_bytes is not None and p.is_file() and p.stat().st_size > max_slide_bytes:
        raise TooLarge(
            f"{uri}: {p.stat().st_size} bytes, over the limit of {max_slide_bytes} bytes"
        )
    return StagedSlide(p)


def staged(
    uri: str, *, cache: SlideCache | None = None, max_slide_bytes: int | None = None
) -> AbstractContextManager[StagedSlide]:
    """`cache.staged(uri)` for a gs:// URI (`cache` required); a local path needs no cache."""
    if is_gcs(uri):
        return _require(cache, uri).staged(uri, max_slide_bytes=max_slide_bytes)
    return nullcontext(_local_slide(uri, max_slide_bytes))

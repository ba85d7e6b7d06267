"""What a served model may open, and how much one request may cost.

Slide access. A slide request makes the server read a file the client names, so it is off unless
the operator lists the places slides may come from: `EFCM_SLIDE_URI_PREFIXES`, a comma-separated
list of `gs://bucket/prefix/` URIs and local directories (`efcm serve --allow-slides DIR_OR_PREFIX`,
repeatable, adds to it). A URI is allowed when it lies under one of them: local paths are compared
after resolving `..` and symlinks (a symlink inside a root that points out of it is refused);
gs:// URIs may not contain `.`, `..` or empty segments. `file://`, `http(s)://` and every other
scheme are refused. A refusal is `Forbidden` (HTTP 403, gRPC PERMISSION_DENIED); its message
names the URI and the rule, never anything read from the file.

Limits (`ServingLimits.from_env`), each an env var with a safe default:

=========================  =================  ====================================================
env var                    default            what
=========================  =================  ====================================================
EFCM_MAX_REQUEST_BYTES     64 MiB             request body (REST) / message (gRPC); 413 past it
EFCM_MAX_PATCHES           100000             patches in one bag (features, patches or a slide)
EFCM_MAX_SLIDE_BYTES       8 GiB              size of one slide file (or staged gs:// slide)
EFCM_REQUEST_TIMEOUT_S     300                seconds one request may take (all its v1 instances
                                              together); 504 past it
EFCM_MAX_CONCURRENT_SLIDES 2                  slide requests at work at once (their own worker
                                              threads); 503 at once when all are busy
EFCM_CACHE_DIR             ~/.cache/efcm      where gs:// slides are staged (`efcm.io.gcs`)
EFCM_CACHE_MAX_BYTES       20 GiB             size cap of the staged slides, LRU eviction
=========================  =================  ====================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from efcm.errors import Forbidden
from efcm.io.gcs import CACHE_DIR_ENV, CACHE_MAX_BYTES_ENV, DEFAULT_CACHE_MAX_BYTES
from efcm.io.gcs import cache_max_bytes as cache_max_bytes_from_env

SLIDE_URI_PREFIXES_ENV = "EFCM_SLIDE_URI_PREFIXES"
MAX_REQUEST_BYTES_ENV = "EFCM_MAX_REQUEST_BYTES"
MAX_PATCHES_ENV = "EFCM_MAX_PATCHES"
MAX_SLIDE_BYTES_ENV = "EFCM_MAX_SLIDE_BYTES"
REQUEST_TIMEOUT_ENV = "EFCM_REQUEST_TIMEOUT_S"
MAX_CONCURRENT_SLIDES_ENV = "EFCM_MAX_CONCURRENT_SLIDES"

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_MAX_BYTES_ENV",
    "MAX_CONCURRENT_SLIDES_ENV",
    "MAX_PATCHES_ENV",
    "MAX_REQUEST_BYTES_ENV",
    "MAX_SLIDE_BYTES_ENV",
    "REQUEST_TIMEOUT_ENV",
    "SLIDE_URI_PREFIXES_ENV",
    "ServingLimits",
    "SlideAccessPolicy",
]

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits of the predictor; `from_env` reads them, with these defaults."""

    max_request_bytes: int = 64 * MiB
    max_patches: int = 100_000
    max_slide_bytes: int = 8 * GiB
    request_timeout_s: float = 300.0
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    max_concurrent_slides: int = 2

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_patches",
            "max_slide_bytes",
            "cache_max_bytes",
            "max_concurrent_slides",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServingLimits.{name} must be > 0, got {getattr(self, name)}")
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError(
                f"ServingLimits.request_timeout_s must be > 0, got {self.request_timeout_s}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        env = os.environ if environ is None else environ
        d = cls()

        def num(var: str, default: float, kind: type) -> float:
            raw = env.get(var, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{var} must be a positive {kind.__name__}, got {raw!r}") from None
            if not value > 0:
                raise ValueError(f"{var} must be a positive {kind.__name__}, got {raw!r}")
            return value

        return cls(
            max_request_bytes=num(MAX_REQUEST_BYTES_ENV, d.max_request_bytes, int),
            max_patches=num(MAX_PATCHES_ENV, d.max_patches, int),
            max_slide_bytes=num(MAX_SLIDE_BYTES_ENV, d.max_slide_bytes, int),
            request_timeout_s=num(REQUEST_TIMEOUT_ENV, d.request_timeout_s, float),
            cache_max_bytes=cache_max_bytes_from_env(env),  # the parser `efcm predict` uses too
            max_concurrent_slides=num(MAX_CONCURRENT_SLIDES_ENV, d.max_concurrent_slides, int),
        )


@dataclass(frozen=True)
class SlideAccessPolicy:
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()
    ) -> SlideAccessPolicy:
        """The prefixes of `EFCM_SLIDE_URI_PREFIXES` plus `extra` (`efcm serve --allow-slides`)."""
        raw = (os.environ if environ is None else environ).get(SLIDE_URI_PREFIXES_ENV, "")
        return cls.of([*(p.strip() for p in raw.split(",")), *extra])

    @classmethod
    def of(cls, prefixes: Iterable[str]) -> SlideAccessPolicy:
        out: list[str] = []
        for p in prefixes:
            p = p.strip()
            if not p:
                continue
            if p.startswith("gs://"):
                bucket = p[5:].partition("/")[0]
                if not bucket:
                    raise ValueError(
                        f"{SLIDE_URI_PREFIXES_ENV}: gs:// prefix needs a bucket: {p!r}"
                    )
                out.append(p if p.endswith("/") else p + "/")
            elif "://" in p:
                raise ValueError(
                    f"{SLIDE_URI_PREFIXES_ENV}: only gs:// and local directories, got {p!r}"
                )
            else:
                out.append(str(Path(p).expanduser().resolve()))
        return cls(tuple(dict.fromkeys(out)))

    @property
    def enabled(self) -> bool:
        return bool(self.prefixes)

    def check(self, uri: str) -> str:
        """Returns what to open for `uri` (a gs:// URI, or the resolved local path) when it may be
        opened; raises Forbidden otherwise."""
        if not self.enabled:
            raise Forbidden(
                f"slide_uri: slide input is disabled on this server (set {SLIDE_URI_PREFIXES_ENV})"
            )
        shown = uri if len(uri) <= 300 else uri[:300] + "..."
        if "\x00" in uri:
            raise Forbidden(f"slide_uri {shown!r}: contains a NUL byte")
        if uri.startswith("gs://"):
            if any(seg in ("", ".", "..") for seg in uri[5:].split("/")):
                raise Forbidden(
                    f"slide_uri {shown!r}: gs:// URIs may not contain empty, '.' or '..' segments"
                )
            if any(uri.startswith(p) for p in self.prefixes if p.startswith("gs://")):
                return uri
        elif "://" in uri or uri.lower().startswith(("file:", "http:", "https:")):
            scheme = uri.partition(":")[0]
            raise Forbidden(
                f"slide_uri {shown!r}: scheme {scheme!r} is not served (gs:// or an allowed "
                "local path only)"
            )
        else:
            path = Path(uri).expanduser()
            if path.is_absolute():
                resolved = path.resolve()  # `..` and every symlink on the way
                roots = [Path(p) for p in self.prefixes if not p.startswith("gs://")]
                if any(resolved.is_relative_to(r) for r in roots):
                    return str(resolved)
            else:
                raise Forbidden(f"slide_uri {shown!r}: local paths must be absolute")
        raise Forbidden(f"slide_uri {shown!r}: outside the allowed locations")

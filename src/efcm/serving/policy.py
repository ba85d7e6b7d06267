"""What a served model may open, and how much one request may cost.

Slide access. A slide request makes the server read a file the client names, so it is off unless
the operator lists the places slides may come from: `EFCM_SLIDE_URI_PREFIXES`, a comma-separated
list of `gs://bucket/prefix/` URIs and local directories (`efcm serve --allow-slides DIR_OR_PREFIX`,
repeatable, adds to it). A URI is allowed when it lies under one of them: local paths are compared
after resolving `..` and symlinks (a symlink inside a root that points out of it is refused);
gs:// URIs may not contain `.`, `..` or empty segments. `file://`, `http(s)://` and every other
scheme are refused. A refusal is `Forbidden` (HTTP 403, gRPC PERMISSION_DENIED); its message
names the URI and the rule, never anything read from the file.

The per-request limits and their env vars are `efcm.limits` (the deploy renders the same names).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from efcm.errors import Forbidden
from efcm.limits import SLIDE_URI_PREFIXES_ENV, parse_slide_uri_prefixes


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
        return cls(parse_slide_uri_prefixes(prefixes))

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

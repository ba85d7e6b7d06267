"""Which slides a served model may open.

A slide request makes the server read a file it is named by the client, so it is off unless the
operator lists the places slides may come from: `EFCM_SLIDE_URI_PREFIXES`, a comma-separated list of
`gs://bucket/prefix/` URIs and local directories. A URI is allowed when it lies under one of them
(local paths are compared after resolving `..` and symlinks; gs:// URIs may not contain `.` or `..`
segments). Anything else is refused with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "EFCM_SLIDE_URI_PREFIXES"


class AccessDenied(ValueError):
    """A slide URI the server is not allowed to open."""


@dataclass(frozen=True)
class SlideAccessPolicy:
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SlideAccessPolicy:
        raw = (os.environ if environ is None else environ).get(ENV_VAR, "")
        return cls.of(p.strip() for p in raw.split(","))

    @classmethod
    def of(cls, prefixes: Iterable[str]) -> SlideAccessPolicy:
        out = []
        for p in prefixes:
            if not p:
                continue
            if p.startswith("gs://"):
                out.append(p if p.endswith("/") else p + "/")
            elif "://" in p:
                raise ValueError(f"{ENV_VAR}: only gs:// and local directories, got {p!r}")
            else:
                out.append(str(Path(p).resolve()))
        return cls(tuple(out))

    @property
    def enabled(self) -> bool:
        return bool(self.prefixes)

    def check(self, uri: str) -> str:
        """Returns `uri` when it may be opened; raises AccessDenied otherwise."""
        if not self.enabled:
            raise AccessDenied(f"slide input is disabled on this server (set {ENV_VAR})")
        if uri.startswith("gs://"):
            if any(seg in (".", "..") for seg in uri[5:].split("/")):
                raise AccessDenied(f"slide URI may not contain '.' or '..' segments: {uri}")
            if any(uri.startswith(p) for p in self.prefixes if p.startswith("gs://")):
                return uri
        elif "://" not in uri:
            path = Path(uri).resolve()
            if any(path.is_relative_to(p) for p in self.prefixes if not p.startswith("gs://")):
                return uri
        raise AccessDenied(f"slide URI {uri} is outside the allowed locations")

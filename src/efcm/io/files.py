"""Files written so that a reader never sees half of one: atomic temporary names, stale-part
cleanup, JSON, and file hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_path(path: Path) -> Path:
    """A temporary sibling name to write to before `os.replace(tmp, path)`."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def remove_stale_parts(folder: Path) -> int:
    """Delete the temporary files of `atomic_path` (`.<name>.<pid>.part`) that a killed run left in
    `folder`; returns how many. A file whose writer is still alive is kept."""
    removed = 0
    for part in folder.glob(".*.part"):
        try:
            pid = int(part.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # its writer is alive
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        part.unlink(missing_ok=True)
        removed += 1
    return removed


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

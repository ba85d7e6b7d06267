"""Files written so that a reader never sees half of one: atomic temporary names, stale-part
cleanup, JSON, and file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def atomic_path(path: Path) -> Path:
    """A temporary sibling name to write to before `os.replace(tmp, path)`:
    `.<name>.<pid>.<thread>.part`, so that two writers of the same path, in two processes or in two
    threads of one, never write into the same temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_native_id()}.part")


def remove_stale_parts(folder: Path) -> int:
    """Delete the temporary files of `atomic_path` that a killed run left in `folder`; returns how
    many. A file whose writer is still alive (another process, or another thread of this one) is
    kept; one of the calling thread, or named otherwise, is removed."""
    others = {t.native_id for t in threading.enumerate()} - {threading.get_native_id()}
    removed = 0
    for part in folder.glob(".*.part"):
        pid, tid = part.name.split(".")[-3:-1]  # .<name>.<pid>.<thread>.part
        if pid.isdigit() and tid.isdigit() and _writer_alive(int(pid), int(tid), others):
            continue
        part.unlink(missing_ok=True)
        removed += 1
    return removed


def _writer_alive(pid: int, tid: int, other_threads: set[int | None]) -> bool:
    if pid == os.getpid():
        return tid in other_threads
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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

"""Atomic writes: temporary names per process and per thread, and the cleanup of stale ones."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from efcm.io.files import atomic_path, remove_stale_parts


def test_two_threads_writing_one_path_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    both_open = threading.Barrier(3, timeout=30)  # the two writers and this thread
    swept = threading.Event()
    parts: dict[int, Path] = {}
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            tmp = atomic_path(target)
            parts[i] = tmp
            tmp.write_text(f"writer {i} " * 1000)
            both_open.wait()  # both temporary files exist at once
            swept.wait(timeout=30)
            os.replace(tmp, target)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    both_open.wait()
    # a sweep while both are in flight keeps both: their writer threads are alive
    removed = remove_stale_parts(tmp_path)
    in_flight = sorted(p.name for p in tmp_path.glob(".*.part"))
    swept.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert parts[0] != parts[1]
    assert parts[0].parent == parts[1].parent == tmp_path
    assert removed == 0 and in_flight == sorted(p.name for p in parts.values())
    assert target.read_text() in {f"writer {i} " * 1000 for i in range(2)}  # one whole file
    assert not list(tmp_path.glob(".*.part"))


def test_stale_parts_of_dead_writers_go_and_live_ones_stay(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    dead = int(done.stdout)
    target = tmp_path / "features.h5"
    mine = atomic_path(target)  # the calling thread's own leftover: not in flight
    mine.write_bytes(b"half")
    stale = tmp_path / f".features.h5.{dead}.123.part"
    stale.write_bytes(b"half")
    parent = tmp_path / f".coords.h5.{os.getppid()}.456.part"  # a live process writing it
    parent.write_bytes(b"writing")
    odd = tmp_path / ".features.h5.part"  # no pid or thread: not ours to keep
    odd.write_bytes(b"?")
    assert remove_stale_parts(tmp_path) == 3
    assert not mine.exists() and not stale.exists() and not odd.exists()
    assert parent.exists()

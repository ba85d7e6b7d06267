"""Which files of a folder are opened, and when: Linux inotify (IN_OPEN), read by a thread.

Any process's open counts (a kfp.local task's subprocess, OpenSlide's C code), so a test can say
"no slide was opened after X" of a whole pipeline run without touching the code under test.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IN_OPEN = 0x00000020
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


@contextmanager
def watch_opens(folder: Path) -> Iterator[list[tuple[float, str]]]:
    """Inside the block, the list fills with (time.time(), file name) of every open of a file
    directly in `folder`."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    if libc.inotify_add_watch(fd, str(folder).encode(), IN_OPEN) < 0:
        os.close(fd)
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
    events: list[tuple[float, str]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            now = time.time()
            try:
                buf = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            k = 0
            while k < len(buf):
                _, mask, _, n = _EVENT.unpack_from(buf, k)
                name = buf[k + _EVENT.size : k + _EVENT.size + n].rstrip(b"\0").decode()
                if mask & IN_OPEN and name:
                    events.append((now, name))
                k += _EVENT.size + n

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield events
    finally:
        time.sleep(0.2)  # the last events in flight
        stop.set()
        thread.join()
        os.close(fd)

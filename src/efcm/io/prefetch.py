"""Reads ahead of their consumer: `prefetched(read, keys)` runs `read` on the next keys in a
background thread while the caller works on the current one (ETC's top-K bags: the pixels of the
next bag are read and decoded while the GPU trains on this one)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

K = TypeVar("K")
R = TypeVar("R")


def prefetched(read: Callable[[K], R], keys: Iterable[K], depth: int = 2) -> Iterator[R]:
    """`read(key)` for each key, in order, computed up to `depth` keys ahead in one background
    thread (so the reads themselves run one at a time, in order). An exception of `read` is
    raised where its result would have been yielded; when the consumer stops early (the
    generator is closed), the reads not yet started are cancelled and the thread is joined.

    The read must release the GIL for the overlap to pay (file and network reads, OpenCV's
    decoders and OpenSlide do)."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    it = iter(keys)
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for key in it:
                pending.append(pool.submit(read, key))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

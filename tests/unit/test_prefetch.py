"""efcm.io.prefetch: reads ahead of the consumer, in order, errors where they belong."""

from __future__ import annotations

import threading

import pytest

from efcm.io.prefetch import prefetched


def test_results_come_in_order_and_are_read_ahead_of_the_consumer():
    started: list[int] = []
    consumer = threading.get_ident()
    ahead = threading.Event()

    def read(k: int) -> int:
        assert threading.get_ident() != consumer  # in the background thread
        started.append(k)
        if k == 2:
            ahead.set()
        return k * k

    it = prefetched(read, range(6), depth=2)
    assert next(it) == 0
    # while the consumer holds result 0 and asks for nothing, keys 1 and 2 are read
    assert ahead.wait(10)
    assert [0, *it] == [k * k for k in range(6)] and started == list(range(6))


def test_an_error_is_raised_at_its_key_and_a_closed_consumer_stops_the_reads():
    seen = []

    def read(k: int) -> int:
        seen.append(k)
        if k == 3:
            raise OSError(f"key {k} unreadable")
        return k

    it = prefetched(read, range(100), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="key 3 unreadable"):
        next(it)
    it = prefetched(read, range(100, 200), depth=2)
    next(it)
    it.close()
    assert max(seen) <= 100 + 3  # not read to the end
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(read, [1], depth=0))

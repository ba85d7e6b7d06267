"""The one bounded executor of model work, and the time budget of a request.

Every request (features, patches or slide; a v1 request with all its instances) runs its model
work as one job on `ModelExecutor`: at most `size` jobs (`EFCM_MAX_CONCURRENT_SLIDES`, "requests
at model work at once") in as many threads, so the event loop stays free for health checks and
for answering. A request that finds every worker busy waits for one, within its own time budget
(504 when that runs out first), as long as fewer than `queue` requests (`EFCM_MAX_QUEUED_REQUESTS`)
are already waiting; past that it is refused at once (`Busy`, 503). The queue absorbs bursts of
small requests (a LIMS sending features bags) without letting a backlog build behind long slides:
its length bounds the memory held by waiting request bodies.

A worker stays busy until its job really ends: a request answered 504 (`Deadline`) leaves its
thread running to the job's next deadline check (the core checks between batches), and that
thread keeps its slot until then, so abandoned work is bounded by the pool too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from efcm.errors import Busy, Deadline
from efcm.limits import MAX_CONCURRENT_SLIDES_ENV, MAX_QUEUED_REQUESTS_ENV

T = TypeVar("T")

_POLL_S = 0.005  # how often a waiting request looks for a free worker


@dataclass(frozen=True)
class Budget:
    """The time budget of one request: `seconds` from its start, until `deadline` (a
    `time.monotonic()` value, what the core's `deadline` arguments take)."""

    seconds: float
    deadline: float

    @classmethod
    def start(cls, seconds: float) -> Budget:
        return cls(seconds, time.monotonic() + seconds)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exceeded(self) -> Deadline:
        return Deadline(f"the request ran past its time budget of {self.seconds:g} s")

    def check(self, during: str) -> None:
        """Raise `Deadline` when the budget is spent: the check a job makes between steps, worded
        as the core's own (`ModelExecutor.run` adds the budget's seconds)."""
        if self.left() <= 0:
            raise Deadline(f"the request ran past its time budget (during {during})")


class ModelExecutor:
    """At most `size` jobs at work at once, each in its own thread; up to `queue` more requests
    wait for a worker; `Busy` beyond that."""

    def __init__(self, size: int, queue: int = 0, name: str = "efcm-model") -> None:
        if size <= 0:
            raise ValueError(f"ModelExecutor size must be > 0, got {size}")
        if queue < 0:
            raise ValueError(f"ModelExecutor queue must be >= 0, got {queue}")
        self.size = size
        self.queue = queue
        self._pool = ThreadPoolExecutor(size, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._busy = 0
        self._waiting = 0

    @property
    def busy(self) -> int:
        """Workers at work now (including ones whose request was already answered 504)."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Requests waiting for a worker now."""
        return self._waiting

    async def run(self, fn: Callable[..., T], /, *args: Any, budget: Budget) -> T:
        """`fn(*args)` on a free worker, awaited at most until `budget` runs out.

        Raises:
            Busy: every worker is at work and the queue is full.
            Deadline: the budget ran out, while waiting for a worker, before the job, while it
                ran (answered on time even when the job is inside one long step), or in the
                job's own deadline check.
        """
        if budget.left() <= 0:
            raise budget.exceeded()
        await self._admit(budget)
        work = asyncio.wrap_future(self._submit(fn, *args))
        try:
            return await asyncio.wait_for(work, budget.left())
        except Deadline as err:  # the job's own check; before TimeoutError, its base class
            raise Deadline(f"{err} of {budget.seconds:g} s") from None
        except TimeoutError:
            raise budget.exceeded() from None

    def _take(self) -> bool:
        """Take a worker when one is free (under the lock)."""
        if self._busy < self.size:
            self._busy += 1
            return True
        return False

    async def _admit(self, budget: Budget) -> None:
        """Hold a worker for the caller: at once when one is free, else after waiting in the
        queue (polled: the workers are released from their own threads)."""
        with self._lock:
            if self._take():
                return
            if self._waiting >= self.queue:
                raise Busy(
                    f"all {self.size} model workers are busy ({MAX_CONCURRENT_SLIDES_ENV}) and "
                    f"{self._waiting} request(s) are waiting ({MAX_QUEUED_REQUESTS_ENV}); "
                    "retry later"
                )
            self._waiting += 1
        try:
            while True:
                await asyncio.sleep(_POLL_S)
                with self._lock:
                    if self._take():
                        return
                if budget.left() <= 0:
                    raise budget.exceeded()
        finally:
            with self._lock:
                self._waiting -= 1

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future:
        """Start the job on the worker `_admit` took for it."""
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        # released when the job really ends (or is cancelled before it starts), not when the
        # client is answered
        fut.add_done_callback(self._release)
        return fut

    def _release(self, _: Future | None) -> None:
        with self._lock:
            self._busy -= 1

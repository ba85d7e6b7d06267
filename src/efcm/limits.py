"""The serving limits and the environment variables that carry them: the one list of names that
the server reads (`efcm serve`, `ServingLimits.from_env`) and the deploy step renders into the
InferenceService (`ServingLimits.to_env`), so the two can never disagree on a name.

=========================  =================  ====================================================
env var                    default            what
=========================  =================  ====================================================
EFCM_SLIDE_URI_PREFIXES    (none)             where slide_uri requests may read from
                                              (`efcm.serving.policy.SlideAccessPolicy`)
EFCM_MAX_REQUEST_BYTES     64 MiB             request body (REST) / message (gRPC); 413 past it
EFCM_MAX_PATCHES           100000             patches in one bag (features, patches or a slide)
EFCM_MAX_SLIDE_BYTES       8 GiB              size of one slide file (or staged gs:// slide)
EFCM_REQUEST_TIMEOUT_S     300                seconds one request may take (all its v1 instances
                                              together); 504 past it
EFCM_MAX_CONCURRENT_SLIDES 2                  requests at model work at once
EFCM_MAX_QUEUED_REQUESTS   16                 requests waiting for a worker (within their time
                                              budget); 503 at once when this many are waiting
EFCM_CACHE_DIR             ~/.cache/efcm      where gs:// slides are staged (`efcm.io.cache`)
EFCM_CACHE_MAX_BYTES       20 GiB             size cap of the staged slides, LRU eviction
EFCM_RUNTIME               auto               torch, onnx or int8 (`efcm.runtimes`); auto: torch
                                              where it is installed, else int8, else onnx
EFCM_RUNTIME_THREADS       the cores          the runtime's intra-op threads
EFCM_READ_WORKERS          see below          threads reading, decoding and resizing a slide's
                                              patches ahead of the runtime
=========================  =================  ====================================================

"The cores" are this container's: its cgroup CPU quota (a pod's CPU limit), else the CPUs it may
run on (`available_cpus`). The read workers default to the cores the runtime's threads leave, and
to at least a quarter of the cores (2 from 2 cores up; `default_read_workers`).

Read only by the adapters (the CLI, the server, the components); the core is handed the values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR_ENV = "EFCM_CACHE_DIR"
CACHE_MAX_BYTES_ENV = "EFCM_CACHE_MAX_BYTES"
DEFAULT_CACHE_MAX_BYTES = 20 << 30  # 20 GiB of staged slides, least recently used evicted first

SLIDE_URI_PREFIXES_ENV = "EFCM_SLIDE_URI_PREFIXES"
MAX_REQUEST_BYTES_ENV = "EFCM_MAX_REQUEST_BYTES"
MAX_PATCHES_ENV = "EFCM_MAX_PATCHES"
MAX_SLIDE_BYTES_ENV = "EFCM_MAX_SLIDE_BYTES"
REQUEST_TIMEOUT_ENV = "EFCM_REQUEST_TIMEOUT_S"
MAX_CONCURRENT_SLIDES_ENV = "EFCM_MAX_CONCURRENT_SLIDES"
MAX_QUEUED_REQUESTS_ENV = "EFCM_MAX_QUEUED_REQUESTS"
RUNTIME_ENV = "EFCM_RUNTIME"
RUNTIME_THREADS_ENV = "EFCM_RUNTIME_THREADS"
READ_WORKERS_ENV = "EFCM_READ_WORKERS"
RUNTIME_CHOICES = ("auto", "torch", "onnx", "int8")  # efcm.runtimes: AUTO and RUNTIMES

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
    max_queued_requests: int = 16

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
        if self.max_queued_requests < 0:
            raise ValueError(
                f"ServingLimits.max_queued_requests must be >= 0, got {self.max_queued_requests}"
            )
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError(
                f"ServingLimits.request_timeout_s must be > 0, got {self.request_timeout_s}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        env = os.environ if environ is None else environ
        d = cls()

        def num(var: str, default: float, kind: type) -> float:
            return positive(env, var, default, kind)

        return cls(
            max_request_bytes=num(MAX_REQUEST_BYTES_ENV, d.max_request_bytes, int),
            max_patches=num(MAX_PATCHES_ENV, d.max_patches, int),
            max_slide_bytes=num(MAX_SLIDE_BYTES_ENV, d.max_slide_bytes, int),
            request_timeout_s=num(REQUEST_TIMEOUT_ENV, d.request_timeout_s, float),
            cache_max_bytes=cache_max_bytes(env),  # the parser `efcm predict` uses too
            max_concurrent_slides=num(MAX_CONCURRENT_SLIDES_ENV, d.max_concurrent_slides, int),
            max_queued_requests=int(
                nonnegative(env, MAX_QUEUED_REQUESTS_ENV, d.max_queued_requests)
            ),
        )

    def to_env(self) -> dict[str, str]:
        """These limits as the env vars `from_env` reads back (the deploy renders them)."""
        timeout = self.request_timeout_s
        return {
            MAX_REQUEST_BYTES_ENV: str(self.max_request_bytes),
            MAX_PATCHES_ENV: str(self.max_patches),
            MAX_SLIDE_BYTES_ENV: str(self.max_slide_bytes),
            MAX_CONCURRENT_SLIDES_ENV: str(self.max_concurrent_slides),
            MAX_QUEUED_REQUESTS_ENV: str(self.max_queued_requests),
            REQUEST_TIMEOUT_ENV: str(int(timeout)) if timeout == int(timeout) else str(timeout),
            CACHE_MAX_BYTES_ENV: str(self.cache_max_bytes),
        }


def positive(env: Mapping[str, str], var: str, default: float, kind: type = int) -> float:
    """The positive `kind` (int or float) in env var `var`, or `default` when it is unset or
    blank; ValueError naming the variable for anything else. The one parser of these variables."""
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{var} must be a positive {kind.__name__}, got {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{var} must be a positive {kind.__name__}, got {raw!r}")
    return value


def nonnegative(env: Mapping[str, str], var: str, default: int) -> int:
    """The integer >= 0 in env var `var`, or `default` when it is unset or blank."""
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{var} must be an integer >= 0, got {raw!r}")
    return int(raw)


def cache_max_bytes(environ: Mapping[str, str] | None = None) -> int:
    """`EFCM_CACHE_MAX_BYTES` (bytes, > 0) of `environ` (default `os.environ`), else 20 GiB."""
    env = os.environ if environ is None else environ
    return int(positive(env, CACHE_MAX_BYTES_ENV, DEFAULT_CACHE_MAX_BYTES, int))


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`EFCM_CACHE_DIR` of `environ` (default `os.environ`), else ~/.cache/efcm."""
    raw = (os.environ if environ is None else environ).get(CACHE_DIR_ENV, "").strip()
    return Path(raw) if raw else Path.home() / ".cache" / "efcm"


def parse_slide_uri_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The places slide requests may read from (`EFCM_SLIDE_URI_PREFIXES`, `--allow-slides`), in
    the form the server compares with: gs:// prefixes end in `/`, local directories are resolved.
    ValueError for another scheme or a gs:// prefix with no bucket. The server's check, and the
    deploy's before it renders them."""
    out: list[str] = []
    for p in prefixes:
        p = p.strip()
        if not p:
            continue
        if p.startswith("gs://"):
            bucket = p[5:].partition("/")[0]
            if not bucket:
                raise ValueError(f"{SLIDE_URI_PREFIXES_ENV}: gs:// prefix needs a bucket: {p!r}")
            out.append(p if p.endswith("/") else p + "/")
        elif "://" in p:
            raise ValueError(
                f"{SLIDE_URI_PREFIXES_ENV}: only gs:// and local directories, got {p!r}"
            )
        else:
            out.append(str(Path(p).expanduser().resolve()))
    return tuple(dict.fromkeys(out))


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: the cgroup v2 CPU quota (a pod's CPU limit, rounded up)
    where one is set, capped by the CPUs it may run on."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_read_workers(cpus: int, threads: int) -> int:
    """The threads that read a slide's patches ahead of a runtime with `threads` of `cpus` cores:
    the cores it leaves, and at least a quarter of them (2 from 2 cores up, 1 on one core).

    Why a quarter even when the runtime takes every core: reading costs up to ~40% of the INT8
    student's work per patch (a 20x slide read at level 0 and halved to 1 um/px), the ONNX
    runtimes' idle threads sleep (the readers run in their idle moments), and a reader with
    nothing to do waits on its queue for free. Measured on 2 cores beside INT8 on both: a 20x
    slide read at level 0 and halved, features step at ~0.75 of the model-only speed with 2
    readers against ~0.72 with 1; 224 px on 256-px patches, 0.90 against 0.89; a slide read at
    its level's own size, 0.95 against 0.97 (those two within the noise)."""
    return max(cpus - threads, math.ceil(cpus / 4), min(2, cpus), 1)


@dataclass(frozen=True)
class RuntimeSettings:
    """Which runtime serves the package (`efcm.runtimes`), its intra-op threads, and the threads
    that read a slide's patches ahead of it: by default the runtime takes every core and
    `default_read_workers` readers run beside it (see benchmarks/serving.py)."""

    runtime: str = "auto"
    threads: int | None = None
    read_workers: int = 2

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cpus: int | None = None,
        runtime: str | None = None,
        threads: int | None = None,
        read_workers: int | None = None,
    ) -> RuntimeSettings:
        """The settings of `environ` (default `os.environ`); `runtime`, `threads` and
        `read_workers` (a command line's) win over their variables, and the read workers'
        default follows the threads chosen. The one place the CLI and the server merge them."""
        env = os.environ if environ is None else environ
        runtime = runtime or env.get(RUNTIME_ENV, "").strip() or "auto"
        if runtime not in RUNTIME_CHOICES:
            raise ValueError(
                f"{RUNTIME_ENV} must be one of {list(RUNTIME_CHOICES)}, got {runtime!r}"
            )
        cpus = available_cpus() if cpus is None else cpus
        threads = threads or int(positive(env, RUNTIME_THREADS_ENV, cpus, int))
        readers = read_workers or int(
            positive(env, READ_WORKERS_ENV, default_read_workers(cpus, threads), int)
        )
        return cls(runtime, threads, readers)

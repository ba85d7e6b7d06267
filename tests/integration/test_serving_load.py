"""A bounded load test on loopback: 8 concurrent gRPC clients for 30 s, each sending 2,000 x 512
feature bags to `efcm serve` (a 512-d package built by `build_package`: the demo's tiny student
and CLAM, random weights; the default limits: 2 workers, the other clients wait in the queue).
Asserts no errors
and that the server's RSS does not grow beyond a generous bound; the latencies are printed, never
asserted (shared 2-core machines are noisy)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_serving import MODEL, build_package, serve_subprocess

pytestmark = pytest.mark.integration

CLIENTS = 8
SECONDS = 30.0
WARMUP = 3.0
BAG = (2_000, 512)
RSS_GROWTH_BOUND = 200 << 20  # bytes


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_eight_grpc_clients_for_30_s_without_errors_or_memory_growth(tmp_path):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    package = build_package(tmp_path / "pkg", dim=BAG[1])
    bags = [np.random.default_rng(i).normal(size=BAG).astype(np.float32) for i in range(CLIENTS)]
    # the default limits: 2 requests at model work, the others wait in the queue (none is 503)
    env: dict[str, str] = {}
    with serve_subprocess(package, tmp_path / "server.log", env=env) as server:

        async def run() -> tuple[list[float], list[str], int, int]:
            latencies: list[float] = []
            errors: list[str] = []
            t0 = time.monotonic()
            rss: dict[str, int] = {}

            async def client(i: int) -> None:
                c = InferenceGRPCClient(server.grpc, timeout=60)
                try:
                    while time.monotonic() - t0 < SECONDS:
                        inp = InferInput("features", list(BAG), "FP32")
                        inp.set_data_from_numpy(bags[i], binary_data=True)
                        start = time.perf_counter()
                        try:
                            res = await c.infer(InferRequest(MODEL, [inp]))
                            assert res.outputs[0].as_numpy().shape == (1, 2)
                        except Exception as err:
                            errors.append(f"{type(err).__name__}: {err}")
                            continue
                        if time.monotonic() - t0 > WARMUP:
                            latencies.append(time.perf_counter() - start)
                finally:
                    await c.close()

            async def sample() -> None:
                await asyncio.sleep(WARMUP)
                rss["start"] = _rss(server.pid)
                while time.monotonic() - t0 < SECONDS:
                    await asyncio.sleep(1)
                rss["end"] = _rss(server.pid)

            await asyncio.gather(sample(), *(client(i) for i in range(CLIENTS)))
            return latencies, errors, rss["start"], rss["end"]

        latencies, errors, rss0, rss1 = asyncio.run(run())
    assert not errors, errors[:5]
    assert len(latencies) > CLIENTS
    ms = np.asarray(latencies) * 1e3
    print(
        f"\n{CLIENTS} gRPC clients x {SECONDS:.0f} s, bags {BAG[0]} x {BAG[1]} FP32: "
        f"{len(ms)} requests after warm-up, p50 {np.percentile(ms, 50):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms; server RSS {rss0 >> 20} -> {rss1 >> 20} MiB"
    )
    assert rss1 - rss0 < RSS_GROWTH_BOUND, (rss0, rss1)

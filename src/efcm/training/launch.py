"""What torchrun tells a process, and the check of a process count against the global batch.

Without torch: the `efcm distill --nproc-per-node N` launcher checks its arguments with these
before it starts torchrun, and need not import torch for that (efcm.training.distributed holds the
process group and the epoch plan).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from efcm.config import ConfigError

__all__ = ["Launch", "check_world", "torchrun"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process: its global rank, its rank on the node, the world size."""

    rank: int
    local_rank: int
    world: int

    @classmethod
    def from_torchrun(cls, environ: Mapping[str, str]) -> Launch | None:
        """The launch torchrun describes in `environ` (RANK, LOCAL_RANK, WORLD_SIZE); None when
        the process was not started by torchrun (no WORLD_SIZE)."""
        if "WORLD_SIZE" not in environ:
            return None
        values = {}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            text = environ.get(key, "0")
            try:
                values[key] = int(text)
            except ValueError:
                raise ConfigError(
                    f"torchrun environment: {key}={text!r} is not an integer"
                ) from None
        launch = cls(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
        if launch.world < 1 or not 0 <= launch.rank < launch.world or launch.local_rank < 0:
            raise ConfigError(
                f"torchrun environment: RANK={launch.rank}, LOCAL_RANK={launch.local_rank}, "
                f"WORLD_SIZE={launch.world} is not a valid launch"
            )
        return launch


def check_world(batch_size: int, world: int, name: str = "distill.batch_size") -> int:
    """A rank's share of a global batch (the param `name`); a ConfigError when the batch does not
    divide evenly."""
    if world < 1:
        raise ConfigError(f"world size {world}: must be at least 1")
    if batch_size % world:
        raise ConfigError(
            f"{name} {batch_size} does not divide by the {world} processes: every "
            "process takes an equal share of each global batch (make it a multiple of "
            f"{world})"
        )
    return batch_size // world


def torchrun(argv: list[str], nproc: int) -> int:
    """`efcm <argv>` under `torchrun --standalone` with `nproc` processes on this node (one per
    GPU); its exit status (non-zero when a process failed). A SIGTERM to this process (a pod
    being stopped) is passed on, so torchrun stops its workers cleanly. For several nodes, run
    torchrun itself with the cluster's rendezvous (see efcm.deploy.training_job)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "efcm.cli",
        *argv,
    ]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)

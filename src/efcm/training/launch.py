"""What torchrun tells a process, and the check of a process count against the global batch.

Without torch: the `efcm distill --nproc-per-node N` launcher checks its arguments with these
before it starts torchrun, and need not import torch for that (efcm.training.distributed holds the
process group and the epoch plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from efcm.config import ConfigError

__all__ = ["Launch", "check_world"]


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


def check_world(batch_size: int, world: int) -> int:
    """A rank's share of a global batch; a ConfigError when the batch does not divide evenly."""
    if world < 1:
        raise ConfigError(f"world size {world}: must be at least 1")
    if batch_size % world:
        raise ConfigError(
            f"distill.batch_size {batch_size} does not divide by the {world} processes: every "
            "process takes an equal share of each global batch (make it a multiple of "
            f"{world})"
        )
    return batch_size // world

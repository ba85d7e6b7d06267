"""Data-parallel training under torchrun: the process group, the world a process is in, and the
plan of an epoch's items across the ranks.

`torchrun` (torch.distributed.run) starts one process per device and tells each, in its
environment, its RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR / MASTER_PORT for the
rendezvous). The adapter (efcm.cli) reads them (`Launch.from_torchrun(os.environ)`) and opens the
process group around the stage (`process_group`): NCCL on CUDA, gloo on the CPU. Core code asks
`World.current()`: a process outside a group is world size 1 and takes the single-process path.

The items of an epoch across ranks (`plan_epoch`): one global permutation per (seed, epoch); every
global batch of `batch_size` items is cut into `world` equal consecutive parts, part r for rank r.
So optimiser step k sees the same items whatever the world size (a 2-process step is the
1-process step, split in two), every planned item is seen once per epoch across the ranks, and a
rank's batch is batch_size / world. As the single-process loader always did, the tail of an epoch
that does not fill a global batch (fewer than batch_size items, a new set each epoch) is left out,
unless the whole epoch is one short batch.

A training source (`TrainSource`) gives each rank its batches of an epoch, from any step (resume);
a map-style dataset is one (`MapSource`). A streamed source whose ranks get different numbers of
batches says so (`uneven`); the training loop then joins the ranks with
torch.distributed.algorithms.Join.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Dataset

from efcm.config import ConfigError
from efcm.training.launch import Launch, check_world

__all__ = [
    "EpochPlan",
    "Launch",
    "MapSource",
    "RankBatch",
    "TrainSource",
    "World",
    "check_world",
    "epoch_seed",
    "plan_epoch",
    "process_group",
    "rank_bounds",
    "sum_gradients",
]


# -- the processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The processes one training runs on, seen from one of them (size 1: no process group)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The default process group's world, or size 1 outside one."""
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and outputs."""
        return self.rank == 0

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo CPU ones
        if tdist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (a collective: every rank calls it);
        the values themselves in a world of one."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        tdist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        """Wait for every rank (nothing in a world of one)."""
        if self.size > 1:
            tdist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (any picklable object), in rank order, on every rank (a
        collective); [obj] in a world of one."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (any picklable object)."""
        if self.size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]


def sum_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Sum each parameter's gradient over the ranks, in place, in one all-reduce (a collective).

    Used instead of DistributedDataParallel where ranks may run no backward at all in a step (a
    short last step) or leave parameters unused (CLAM's instance classifiers of the other
    classes): a gradient that is None on a rank counts as zero there, and one that is None on
    every rank stays None, so the optimiser skips that parameter as a single process would.
    """
    if world.size == 1 or not params:
        return
    has = [p.grad is not None for p in params]
    flat = torch.cat(
        [
            *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params),
            torch.tensor(has, dtype=params[0].dtype, device=params[0].device),
        ]
    )
    tdist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    for p, used in zip(params, flat[offset:].tolist(), strict=True):
        if not used:
            p.grad = None


@contextlib.contextmanager
def process_group(launch: Launch | None, timeout: timedelta | None = None) -> Iterator[World]:
    """The default process group of a torchrun launch, open for the block: NCCL on CUDA (this
    process on the GPU of its LOCAL_RANK), gloo on the CPU; MASTER_ADDR / MASTER_PORT come from
    torchrun's environment (init_method env://). No group for a plain process or a world of one.
    `timeout`: how long a collective waits for the other ranks (torch's default when None: 10
    minutes for NCCL, 30 for gloo); a stage where rank 0 works alone for long between collectives
    (ETC's per-fold CLAM) gives a longer one.
    """
    if launch is None or launch.world == 1:
        yield World()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {launch.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()} (start at most that many processes per node)"
            )
        torch.cuda.set_device(launch.local_rank)
    tdist.init_process_group(
        "nccl" if cuda else "gloo",
        rank=launch.rank,
        world_size=launch.world,
        **({"timeout": timeout} if timeout is not None else {}),
    )
    try:
        yield World.current()
    finally:
        tdist.destroy_process_group()


# -- the epoch plan -------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's random stream (its order, then MCM's masks)."""
    return seed * 1000 + epoch


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Optimiser steps of an epoch: the full global batches, or one short batch when the items
    do not fill one."""
    return n_items // batch_size if n_items > batch_size else 1


def rank_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s rows [start, stop) of `n` consecutive rows cut into `world` near-equal
    consecutive parts (equal when `world` divides `n`; a rank may get none when n < world)."""
    cuts = np.floor(np.linspace(0, n, world + 1) + 1e-9).astype(int)
    return int(cuts[rank]), int(cuts[rank + 1])


@dataclass(frozen=True)
class EpochPlan:
    """Which items each rank takes at each step of an epoch."""

    order: np.ndarray  # (n_items,) int64: the epoch's global permutation of the item indices
    batch_size: int  # items of a global batch (the items, when the epoch is one short batch)
    world: int
    steps: int
    rng_state: torch.Tensor  # the epoch's random stream after the permutation (MCM's masks)

    def global_batch(self, step: int) -> np.ndarray:
        """The items of global step `step`, in order; rank r takes its r-th part."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} of an epoch of {self.steps} steps")
        return self.order[step * self.batch_size : (step + 1) * self.batch_size]

    def bounds(self, step: int, rank: int) -> tuple[int, int]:
        """Rank `rank`'s rows [start, stop) of global batch `step`."""
        # equal parts (batch_size divides by world); near-equal for a short lone batch
        return rank_bounds(len(self.global_batch(step)), self.world, rank)

    def part(self, step: int, rank: int) -> np.ndarray:
        """The items rank `rank` trains on at step `step`."""
        start, stop = self.bounds(step, rank)
        return self.global_batch(step)[start:stop]


@functools.lru_cache(maxsize=2)
def _permutation(n_items: int, seed: int, epoch: int) -> tuple[np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    # One int64 first: the single-process DataLoader of earlier versions drew its workers' base
    # seed from this generator before its shuffle, so world-1 runs keep their exact order.
    torch.empty((), dtype=torch.int64).random_(generator=g)
    order = torch.randperm(n_items, generator=g).numpy()
    order.flags.writeable = False
    return order, g.get_state()


def plan_epoch(n_items: int, batch_size: int, world: int, seed: int, epoch: int) -> EpochPlan:
    """The items of every rank at every step of one epoch (see the module docstring).

    Args:
        n_items: items of the training set.
        batch_size: the global batch (all ranks together) of one optimiser step.
        world: number of processes; must divide batch_size.
        seed, epoch: the permutation is a function of these (and n_items) only.

    Raises:
        ConfigError: batch_size does not divide by world, or fewer items than processes.
    """
    check_world(batch_size, world)
    if n_items < world:
        raise ConfigError(
            f"{n_items} training items cannot be shared by {world} processes (at least one each)"
        )
    order, state = _permutation(n_items, seed, epoch)
    steps = steps_per_epoch(n_items, batch_size)
    return EpochPlan(order, min(batch_size, n_items), world, steps, state)


# -- the sources of training batches --------------------------------------------------------------


@dataclass
class RankBatch:
    """One rank's share of a global batch: its tensors, and how many rows of the global batch
    the lower and the higher ranks hold (the loop skips their draws of the shared random stream,
    so every rank draws its own rows' MCM masks, as a single process would)."""

    tensors: list[torch.Tensor]
    rows_before: int = 0
    rows_after: int = 0


class TrainSource(Protocol):
    """The training items of a distillation, as each rank's batches of each epoch.

    `uneven`: ranks may get different numbers of batches in an epoch (a streamed source); the
    loop then joins them (torch.distributed.algorithms.Join) and checkpoints mid-epoch only within
    the steps every rank takes.
    """

    uneven: bool

    def __len__(self) -> int:
        """Items of an epoch, over all ranks."""
        ...

    def steps_per_epoch(self, world: int) -> int:
        """Optimiser steps of an epoch that every rank takes (uneven: the fewest)."""
        ...

    def mask_generator(self, epoch: int) -> torch.Generator:
        """The epoch's random stream (MCM's masks) at the start of the epoch, the same on every
        rank."""
        ...

    def epoch_batches(
        self, epoch: int, rank: int, world: int, start_step: int = 0
    ) -> Iterator[RankBatch]:
        """Rank `rank`'s batches of epoch `epoch`, from step `start_step` (a resumed run skips
        the steps done without reading their items)."""
        ...


class MapSource:
    """A map-style dataset (efcm.training.distill's PairDataset, WindowDataset) as a training
    source: `plan_epoch` shares the items, a DataLoader reads a rank's parts (workers, pinned
    memory)."""

    uneven = False

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def plan(self, epoch: int, world: int) -> EpochPlan:
        return plan_epoch(len(self), self.batch_size, world, self.seed, epoch)

    def steps_per_epoch(self, world: int) -> int:
        return self.plan(0, world).steps

    def mask_generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.plan(epoch, 1).rng_state)
        return g

    def epoch_batches(
        self, epoch: int, rank: int, world: int, start_step: int = 0
    ) -> Iterator[RankBatch]:
        plan = self.plan(epoch, world)
        steps = range(start_step, plan.steps)
        parts = [plan.part(s, rank).tolist() for s in steps]
        loader = DataLoader(
            self.dataset,
            batch_sampler=parts,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # the workers' base seed comes from here, not from the global generator
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)),
        )
        for step, batch in zip(steps, loader, strict=True):
            start, stop = plan.bounds(step, rank)
            yield RankBatch(list(batch), start, len(plan.global_batch(step)) - stop)

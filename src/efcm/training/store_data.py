"""Distillation's training items streamed from the patch-shard store (efcm.io.store).

The store holds one shard per slide. A rank streams the shards `assign_shards` gives it (balanced
by item count, the same on every rank without communication), `store.interleave` at once, through
a shuffle buffer of `store.shuffle_buffer` items (`efcm.io.store.mix`): sequential reads of whole
shards instead of random reads into the slides. DataLoader workers split the rank's shards
between them. Items are kept encoded in the buffer and decoded on the way out (a buffer of
decoded 224 px patches would take GBs).

- VFD / FPD: (uint8 patch (S, S, 3), teacher feature (D,)); the feature is the teacher features
  h5's row the sample names.
- MCM-KD: the s x s windows of neighbouring patches of each slide (`grid_windows` over the
  slide's coords), as `WindowDataset` gives them: (uint8 (n, S, S, 3), targets (n, D), valid (n,)).
  A shard is read whole (one slide) before its windows are cut.

Every item of the rank's shards is yielded once per epoch; the ranks' item counts differ by at
most one slide's, which distillation evens out with DDP's `Join`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from efcm.config import DistillParams, StoreParams
from efcm.features import read_features
from efcm.io.store import Codec, ShardIndex, StoreError, assign_shards, iter_shard, mix, read_index
from efcm.models.mcm import grid_windows


class StoreStream(IterableDataset):
    """The training (or validation) items of `slide_ids`, streamed from the store `store_dir`.

    Call `set_epoch(epoch, rank, world)` before iterating: the epoch seeds the order, and the
    rank picks its shards.
    """

    def __init__(
        self,
        store_dir: Path,
        teacher_dir: Path,
        slide_ids: list[str],
        cfg: DistillParams,
        store: StoreParams,
        seed: int,
        *,
        steps0: dict[str, int | None] | None = None,
        shuffle: bool = True,
    ) -> None:
        self.teacher_dir = teacher_dir
        self.slide_ids = list(slide_ids)
        self.indexes: list[ShardIndex] = [read_index(store_dir, s) for s in self.slide_ids]
        self.mcm = cfg.method == "mcm"
        self.window, self.min_valid = cfg.mcm.window, cfg.mcm.min_valid
        self.seed = seed
        self.interleave = store.interleave if shuffle else 1
        self.buffer = store.shuffle_buffer if shuffle else 1
        self.shuffle = shuffle
        self.windows: list[np.ndarray] = []
        if self.mcm:
            for sid, idx in zip(self.slide_ids, self.indexes, strict=True):
                step0 = (steps0 or {}).get(sid)
                if step0 is None:
                    raise ValueError(
                        f"{sid}: its coords are not a regular grid (MCM needs neighbouring patches)"
                    )
                self.windows.append(grid_windows(idx.coords, step0, self.window, self.min_valid))
        self.sizes = [len(w) for w in self.windows] if self.mcm else [len(i) for i in self.indexes]
        self.epoch, self.rank, self.world = 0, 0, 1

    def set_epoch(self, epoch: int, rank: int = 0, world: int = 1) -> None:
        self.epoch, self.rank, self.world = epoch, rank, world

    def __len__(self) -> int:
        """Items of every shard (all ranks)."""
        return sum(self.sizes)

    def rank_shards(self, rank: int, world: int) -> list[int]:
        return assign_shards(self.sizes, world)[rank]

    def rank_items(self, rank: int, world: int) -> int:
        return sum(self.sizes[i] for i in self.rank_shards(rank, world))

    def _targets(self, k: int) -> np.ndarray:
        feats, coords = read_features(self.teacher_dir / "features" / f"{self.slide_ids[k]}.h5")
        idx = self.indexes[k]
        if len(feats) <= int(idx.row.max(initial=-1)) or not np.array_equal(
            coords[idx.row], idx.coords
        ):
            raise StoreError(
                f"{idx.shard}: the shard of slide {self.slide_ids[k]} does not match its teacher "
                "features (rerun teacher extraction)"
            )
        return feats

    def _pairs(self, k: int) -> Iterator[tuple[bytes, np.ndarray]]:
        feats = self._targets(k)
        for row, data in iter_shard(self.indexes[k].shard):
            yield data, feats[row]

    def _windows(self, k: int) -> Iterator[tuple[list[bytes | None], np.ndarray, np.ndarray]]:
        feats = self._targets(k)
        idx = self.indexes[k]
        by_row = dict(iter_shard(idx.shard))
        data = [by_row[int(r)] for r in idx.row]  # position in the index = coords position
        for w in self.windows[k]:
            valid = w >= 0
            targets = np.zeros((len(w), feats.shape[1]), np.float32)
            targets[valid] = feats[idx.row[w[valid]]]
            yield [data[int(i)] if i >= 0 else None for i in w], targets, valid

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        shards = self.rank_shards(self.rank, self.world)
        info = get_worker_info()
        worker = 0
        if info is not None:  # the workers split the rank's shards
            shards, worker = shards[info.id :: info.num_workers], info.id
        opener = self._windows if self.mcm else self._pairs
        if not self.shuffle:
            items: Iterator[Any] = (it for k in shards for it in opener(k))
        else:
            items = mix(
                len(shards),
                lambda i: opener(shards[i]),
                seed=self.seed * 1000 + worker,
                epoch=self.epoch,
                interleave=self.interleave,
                buffer=self.buffer,
            )
        for item in items:
            yield self._decode(item)

    def _decode(self, item: tuple) -> tuple[torch.Tensor, ...]:
        if not self.mcm:
            data, target = item
            return torch.from_numpy(np.ascontiguousarray(Codec.decode(data))), torch.from_numpy(
                np.asarray(target, np.float32)
            )
        datas, targets, valid = item
        size = self.indexes[0].patch_size
        blank = np.zeros((size, size, 3), np.uint8)
        patches = np.stack([Codec.decode(d) if d is not None else blank for d in datas])
        return torch.from_numpy(patches), torch.from_numpy(targets), torch.from_numpy(valid)


class StoreSource:
    """The store stream as distillation's training source (`efcm.training.distributed`): each
    rank streams its shards in batches of `batch_size / world` items; the last batch of a rank
    may be short, and the ranks' batch counts differ (`uneven`: the loop joins them), so every
    item is seen exactly once per epoch. Rank 0 gets the heaviest share of shards, so it is the
    last to run out of batches and its optimiser state holds every step of the epoch."""

    uneven = True

    def __init__(
        self,
        stream: StoreStream,
        batch_size: int,
        seed: int,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.stream)

    def _rank_batches(self, world: int) -> list[int]:
        per = max(1, self.batch_size // world)
        return [-(-self.stream.rank_items(r, world) // per) for r in range(world)]

    def steps_per_epoch(self, world: int) -> int:
        """The fewest batches any rank has (the steps every rank takes)."""
        return max(1, min(self._rank_batches(world)))

    def mask_generator(self, epoch: int) -> torch.Generator:
        from efcm.training.distributed import epoch_seed

        return torch.Generator().manual_seed(epoch_seed(self.seed, epoch))

    def epoch_batches(self, epoch: int, rank: int, world: int, start_step: int = 0):
        from torch.utils.data import DataLoader

        from efcm.training.distributed import RankBatch

        per = max(1, self.batch_size // world)
        self.stream.set_epoch(epoch, rank, world)
        loader = DataLoader(
            self.stream,
            batch_size=per,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for step, batch in enumerate(loader):
            if step < start_step:  # a resumed epoch: the same stream, its done steps skipped
                continue
            # the shared mask stream: this rank's rows sit after the lower ranks' (as in a map
            # source), so the ranks draw different masks
            yield RankBatch(list(batch), rank * per, (world - rank - 1) * per)


def target_stats(teacher_dir: Path, slide_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (unbiased) of the teacher features of `slide_ids`, one slide
    at a time (a cohort's features need not fit in memory)."""
    total = sq = None
    n = 0
    for sid in slide_ids:
        feats, _ = read_features(teacher_dir / "features" / f"{sid}.h5")
        f = feats.astype(np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
        n += len(f)
    if total is None or n < 2:
        raise ValueError(f"distill: too few teacher features in {teacher_dir} to standardise")
    mean = total / n
    var = np.maximum(sq - n * mean * mean, 0) / (n - 1)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(
        np.sqrt(var).astype(np.float32)
    )

"""plan_shards + gather: fan the slides out to shards and collect the shards' outputs (CPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_shards(manifest: Input[Dataset], shard_size: int) -> list:
    """The shard indices [0 .. n_shards - 1] of `shard_size` slides each: the ParallelFor items."""
    from efcm.dataset import shard_indices

    return shard_indices(manifest.path, shard_size)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather(shards: Input[list[Dataset]], merged: Output[Dataset]):
    """One output folder (and one status.csv) from the shards' patch or extract folders."""
    from efcm.dataset import merge_outputs, status_counts

    rows = merge_outputs([s.path for s in shards], merged.path)
    merged.metadata.update({"shards": len(shards), **status_counts(rows)})

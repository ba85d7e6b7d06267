"""plan_shards + gather: fan the slides out to shards and collect the shards' outputs (CPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_shards(manifest: Input[Dataset], shard_size: int) -> list:
    """The shard indices [0 .. n_shards - 1] of `shard_size` slides each: the ParallelFor items."""
    from efcm.io.dataset import shard_indices

    return shard_indices(manifest.path, shard_size)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather(
    shards: Input[list[Dataset]], stage: str, dataset: dict, patch: dict, merged: Output[Dataset]
):
    """One output folder (and one status.csv) from the shards' `stage` (patch or extract)
    folders; fails as the unsharded stage would (`patch.fail_on` for patch, every slide failed for
    extract)."""
    from efcm import config, stages
    from efcm.io.dataset import status_counts

    params = config.params_for_stage("gather", {"dataset": dataset, "patch": patch})
    fail_on = params.patch.fail_on if stage == "patch" else "all"
    rows = stages.gather([s.path for s in shards], merged.path, stage, fail_on)
    merged.metadata.update({"shards": len(shards), **status_counts(rows)})

"""patch: tissue segmentation + patch grid of every slide of the manifest, or of one shard (CPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def patch(
    manifest: Input[Dataset],
    dataset: dict,
    patch: dict,
    patches: Output[Dataset],
    workers: int = 1,
    shard: int = -1,
    shard_size: int = 0,
):
    """`patches/<slide_id>.h5`, `qc/` and `status.csv` in the `patches` directory; with
    `shard` >= 0, only the slides of that shard (`shard_size` slides per shard). The artifact's
    metadata has the slide counts by status and the start and end times (epoch s)."""
    import time

    from efcm import config, stages
    from efcm.io.cache import SlideCache
    from efcm.io.dataset import status_counts

    started = time.time()
    params = config.params_for_stage("patch", {"dataset": dataset, "patch": patch})
    rows = stages.patch(
        manifest.path,
        patches.path,
        params,
        workers=workers,
        shard=(shard, shard_size) if shard >= 0 else None,
        cache=SlideCache.from_env(),
    )
    patches.metadata.update(
        {"shard": shard, "started": started, "finished": time.time(), **status_counts(rows)}
    )

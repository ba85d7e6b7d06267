"""patch: tissue segmentation + patch grid of every slide (CPU)."""

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
):
    """`patches/<slide_id>.h5`, `qc/` and `status.csv` in the `patches` directory."""
    from efcm import config, stages

    params = config.params_from_struct({"dataset": dataset, "patch": patch}, "patch")
    stages.patch(manifest.path, patches.path, params, workers=workers)

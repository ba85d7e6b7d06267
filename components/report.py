"""report: the run's HTML page for the Kubeflow UI: the audit, attention heatmaps and QC (CPU)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(
    patches: Input[Dataset],
    strategies: Input[list[Model]],
    package: Input[Model],
    evaluation: Input[Artifact],
    verdict: Input[Artifact],
    dataset: dict,
    page: Output[HTML],
):
    """One self-contained page (`efcm.stages.report`): the comparison table with the paired
    deltas, the ROC curves, the gate's verdict and rule, the efficiency figures, then the exported
    strategy's out-of-fold attention heatmaps and every slide's patching status and QC."""
    from efcm import config, stages

    params = config.params_for_stage("report", {"dataset": dataset})
    stages.report(
        patches.path,
        [s.path for s in strategies],
        package.path,
        page.path,
        params,
        evaluation_dir=evaluation.path,
        gate_dir=verdict.path,
    )

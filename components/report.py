"""report: the run's HTML page for the Kubeflow UI: attention heatmaps and patching QC (CPU)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(patches: Input[Dataset], student_mil: Input[Model], dataset: dict, page: Output[HTML]):
    """The exported model's (Retrain CLAM's) out-of-fold attention heatmaps and every slide's
    patching status and QC thumbnail, in one self-contained page (`efcm.stages.report`)."""
    from efcm import config, stages

    params = config.params_from_struct({"dataset": dataset}, "report")
    stages.report(patches.path, student_mil.path, page.path, params)

"""KFP components: one small typed lightweight component per pipeline stage.

Each component converts its artifacts to paths and its `dict` parameters (params.yaml sections)
to a validated `efcm.config.Params` holding only its stage's sections
(`efcm.config.params_for_stage`: a component's `dict` parameters are exactly
`efcm.config.STAGE_SECTIONS[stage]`, a test checks), then makes ONE call into
`efcm.stages` (or `efcm.io.manifest`, `efcm.deploy.rollout`). Function bodies import only
`efcm` (and kserve in `deploy`): KFP ships the body alone to the container, and kfp.local runs it
in a subprocess of the current interpreter.

The component objects are re-exported here under the stage names (`components.patch` is the
component, not its module).
"""

from components.deploy import deploy
from components.distill import distill, image_distill
from components.distill_job import distill_job
from components.evaluate import evaluate, image_evaluate
from components.export import export, image_export
from components.extract import extract, image_extract
from components.gate import gate
from components.image import IMAGE, SERVING_IMAGE
from components.patch import patch
from components.report import report
from components.resolve_dataset import image_resolve_dataset, resolve_dataset, resolve_version
from components.shards import gather, plan_shards
from components.splits import image_splits, splits
from components.strategy import image_strategy, plan_image_strategies, plan_strategies, strategy
from components.train_mil import image_train_mil, train_mil

ALL = (
    resolve_version,
    resolve_dataset,
    plan_shards,
    patch,
    extract,
    distill,
    distill_job,
    splits,
    train_mil,
    plan_strategies,
    strategy,
    gather,
    evaluate,
    report,
    gate,
    export,
    deploy,
    # the image path's variants (pipelines/image_pipeline.py)
    image_resolve_dataset,
    image_extract,
    image_distill,
    image_splits,
    image_train_mil,
    plan_image_strategies,
    image_strategy,
    image_evaluate,
    image_export,
)

__all__ = [
    "ALL",
    "IMAGE",
    "SERVING_IMAGE",
    "deploy",
    "distill",
    "distill_job",
    "evaluate",
    "export",
    "extract",
    "gate",
    "gather",
    "image_distill",
    "image_evaluate",
    "image_export",
    "image_extract",
    "image_resolve_dataset",
    "image_splits",
    "image_strategy",
    "image_train_mil",
    "patch",
    "plan_image_strategies",
    "plan_shards",
    "plan_strategies",
    "report",
    "resolve_dataset",
    "resolve_version",
    "splits",
    "strategy",
    "train_mil",
]

"""KFP components: one small typed lightweight component per pipeline stage.

Each component converts its artifacts to paths and its `dict` parameters (params.yaml sections)
to a validated `efcm.config.Params` (`efcm.config.params_from_struct`), then makes ONE call into
`efcm.stages` (or `efcm.manifest`, `efcm.deploy`). Function bodies import only `efcm` (and kserve in
`deploy`): KFP ships the body alone to the container, and kfp.local runs it in a subprocess of the
current interpreter.

The component objects are re-exported here under the stage names (`components.patch` is the
component, not its module).
"""

from components.deploy import deploy
from components.distill import distill
from components.etc import etc
from components.evaluate import evaluate
from components.export import export
from components.extract import extract
from components.gate import gate
from components.image import IMAGE, SERVING_IMAGE
from components.patch import patch
from components.report import report
from components.resolve_dataset import resolve_dataset, resolve_version
from components.reuse import reuse
from components.shards import gather, plan_shards
from components.splits import splits
from components.train_mil import train_mil

ALL = (
    resolve_version,
    resolve_dataset,
    plan_shards,
    patch,
    extract,
    distill,
    splits,
    train_mil,
    reuse,
    etc,
    gather,
    evaluate,
    report,
    gate,
    export,
    deploy,
)

__all__ = [
    "ALL",
    "IMAGE",
    "SERVING_IMAGE",
    "deploy",
    "distill",
    "etc",
    "evaluate",
    "export",
    "extract",
    "gate",
    "gather",
    "patch",
    "plan_shards",
    "report",
    "resolve_dataset",
    "resolve_version",
    "reuse",
    "splits",
    "train_mil",
]

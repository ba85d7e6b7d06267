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
from components.image import IMAGE, SERVING_IMAGE
from components.load_manifest import load_manifest
from components.patch import patch
from components.reuse import reuse
from components.splits import splits
from components.train_mil import train_mil

ALL = (
    load_manifest,
    patch,
    extract,
    distill,
    splits,
    train_mil,
    reuse,
    etc,
    evaluate,
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
    "load_manifest",
    "patch",
    "reuse",
    "splits",
    "train_mil",
]

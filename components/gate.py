"""gate: the promotion gate before deploy, on the exported package (CPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(
    package: Input[Model], deploy: dict, verdict: Output[Artifact], decision: Output[Markdown]
) -> bool:
    """True when the exported package may be deployed (`efcm.evaluation.gate`: the lower bound of
    its paired student-minus-teacher AUROC interval is >= -`deploy.max_auc_drop`, and its AUROC is
    above `deploy.min_auc`). `decision.json` and `decision.md` go to `verdict`; the Markdown also to
    `decision`, which the UI shows, deployed or not."""
    import shutil
    from pathlib import Path

    from efcm import config, stages

    params = config.params_for_stage("gate", {"deploy": deploy})
    result = stages.gate(package.path, verdict.path, params)
    Path(decision.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(verdict.path) / "decision.md", decision.path)
    for out in (decision, verdict):
        out.metadata.update({"promote": result.promote, "reason": result.reason})
    return result.promote

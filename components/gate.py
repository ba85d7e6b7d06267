"""gate: the promotion gate before deploy (CPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact], distill: dict, deploy: dict, decision: Output[Markdown]
) -> bool:
    """True when the exported student may be deployed (`efcm.gate`: its AUROC is at least the
    teacher's minus `deploy.max_auc_drop` and above `deploy.min_auc`). The decision and its reason
    are the `decision` Markdown the UI shows, deployed or not."""
    import shutil
    import tempfile
    from pathlib import Path

    from efcm import config, stages

    params = config.params_from_struct({"distill": distill, "deploy": deploy}, "gate")
    with tempfile.TemporaryDirectory() as tmp:
        result = stages.gate(Path(evaluation.path) / "metrics.json", tmp, params)
        Path(decision.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "decision.md", decision.path)
    decision.metadata.update({"promote": result.promote, "reason": result.reason})
    return result.promote

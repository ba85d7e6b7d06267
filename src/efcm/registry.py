"""The table of slide-level strategies: the one place that names them.

timm's model registry is the example: each strategy is one `Strategy` entry, and everything that
needs to know the strategies reads this table: config validation (`mil.strategies`,
`export.strategy`), the `strategy` stage of `efcm.stages` and its CLI command, the rendered
`dvc.yaml`, the Kubeflow graph (one `strategy` task per resolved entry), the evaluation rows, the
export and the gate. No other module spells a strategy or evaluation-row name.

Adding a strategy is one entry here plus its function: a callable
`run(inputs: StrategyInputs, out_dir, params, *, cache) -> summary dict` (`cache`: the
`efcm.io.cache.SlideCache` that stages gs:// slides, or None) that writes what `train_mil`
writes (fold_<k>.pt, predictions.csv with the out-of-fold predictions, attention.h5,
summary.json with `"strategy": name`), and `student_fold_<k>.pt` when `per_fold_student`.

This module imports no torch: config validation and the CPU serving path read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The inputs a strategy may take, besides the manifest and the splits every strategy reads.
INPUTS = ("patches", "teacher_features", "teacher_mil", "student", "student_features")
# The evaluation row of the teacher baseline (the CLAM trained on the teacher's features); every
# student row is `student.<distill.method>.<strategy>` (`Strategy.row`).
TEACHER_ROW = "teacher"
STUDENT_ROW_PREFIX = "student."
# The image teacher fine-tuned end to end (`image.teacher_finetune`): `efcm train-mil --kind
# image` writes it into <out>/TEACHER_FINETUNE_DIR, and the image evaluation adds its row when it
# is there. Student rows of end-to-end strategies (`fine_tuned_row`) get paired deltas against it
# too, under keys ending TEACHER_FINETUNE_DELTA (`delta_auc_vs_teacher_finetune`, ...), next to
# their `delta_*` against the probe (`TEACHER_ROW`), which the gate reads.
TEACHER_FINETUNE_ROW = "teacher.finetune"
TEACHER_FINETUNE_DIR = "finetune"
TEACHER_FINETUNE_DELTA = "_vs_teacher_finetune"


def is_student_row(row: str) -> bool:
    return row.startswith(STUDENT_ROW_PREFIX)


def fine_tuned_row(row: str) -> bool:
    """The student row of an image strategy that fine-tunes the student end to end
    (`per_fold_student`: `finetune`), the one compared with `TEACHER_FINETUNE_ROW` too."""
    if not is_student_row(row):
        return False
    entry = IMAGE_STRATEGIES.get(row.rsplit(".", 1)[-1])
    return entry is not None and entry.per_fold_student


@dataclass(frozen=True)
class Strategy:
    """One slide-level strategy on top of the distilled student.

    Attributes:
        name: the word used in params (`mil.strategies`, `export.strategy`), the CLI
            (`efcm strategy NAME`), dvc.yaml (`strategy_NAME`) and the evaluation row.
        summary: one line for --help, the README and the report.
        needs_teacher_space: it applies the teacher's CLAM to student features, so only a student
            that outputs the teacher's feature space can use it (VFD, FPD; not MCM-KD).
        runner: "module:function" of its implementation (imported when it runs).
        inputs: what it reads among `INPUTS`.
        per_fold_student: it fine-tunes the student per fold (`student_fold_<k>.pt`): the package
            carries one student per fold, each paired with its fold's CLAM.
        gpu: it trains or embeds patches (Kubeflow gives its task a GPU).
        distributed: it runs as one process per GPU of its pod (`pipeline.etc_gpus`, `efcm
            strategy NAME --nproc-per-node N`); the others run as one process.
    """

    name: str
    summary: str
    needs_teacher_space: bool
    runner: str
    inputs: tuple[str, ...]
    per_fold_student: bool = False
    gpu: bool = True
    distributed: bool = False

    def applies_to(self, method: str) -> str | None:
        """None when the strategy applies to distillation `method`, else the reason it does not."""
        if self.needs_teacher_space and method == "mcm":
            return (
                f"{self.name!r} applies the teacher's CLAM to the student's features, but an "
                "MCM-KD student does not output the teacher's feature space (only vfd and fpd do)"
            )
        return None

    def unavailable(self) -> str | None:
        """None when the strategy can run, else why not (see `ImageStrategy.available`)."""
        return None

    def row(self, method: str) -> str:
        """The evaluation row: `student.<distill.method>.<strategy>`."""
        return f"{STUDENT_ROW_PREFIX}{method}.{self.name}"

    def run(self) -> Callable[..., dict[str, Any]]:
        module, _, fn = self.runner.partition(":")
        return getattr(importlib.import_module(module), fn)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "reuse",
            "Reuse CLAM: the teacher's fold CLAMs, unchanged, on the student's features",
            needs_teacher_space=True,
            runner="efcm.training.strategies:run_reuse",
            inputs=("teacher_mil", "student_features"),
            gpu=False,
        ),
        Strategy(
            "retrain",
            "Retrain CLAM: a new CLAM per fold on the frozen student's features",
            needs_teacher_space=False,
            runner="efcm.training.strategies:run_retrain",
            inputs=("student_features",),
        ),
        Strategy(
            "etc",
            "End2end Train CLAM: student + CLAM fine-tuned on the IB top-K patches per fold, "
            "then a new CLAM on the fine-tuned student's features",
            needs_teacher_space=False,
            runner="efcm.training.strategies:run_etc",
            inputs=("patches", "teacher_features", "student"),
            per_fold_student=True,
            distributed=True,
        ),
    )
}
NAMES: tuple[str, ...] = tuple(STRATEGIES)
# what `efcm export` ships unless `export.strategy` says otherwise: it applies to every method
DEFAULT_EXPORT = "retrain"


def get(name: str, *, image: bool = False) -> Strategy:
    """The slide strategy `name`, or with `image` the image strategy (ValueError if unknown)."""
    table: Mapping[str, Strategy] = IMAGE_STRATEGIES if image else STRATEGIES
    if name not in table:
        raise ValueError(f"unknown {'image ' * image}strategy {name!r}; known: {list(table)}")
    return table[name]


def row_name(method: str, name: str) -> str:
    """The evaluation row of strategy `name` (a slide or an image strategy: rows are spelled
    alike) on a `method` student."""
    entry = STRATEGIES.get(name) or IMAGE_STRATEGIES.get(name)
    if entry is None:
        known = sorted({*STRATEGIES, *IMAGE_STRATEGIES})
        raise ValueError(f"unknown strategy {name!r}; known: {known}")
    return entry.row(method)


def resolve(method: str, strategies: str | tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The strategies a run compares, and those left out with the reason.

    `strategies` is `"auto"` (every registered strategy that applies to `method`) or an explicit
    list: there a strategy that does not apply is an error (ValueError naming it and why).
    """
    return _resolve(STRATEGIES, "mil.strategies", method, strategies)


def _resolve(
    table: Mapping[str, Strategy], key: str, method: str, strategies: str | tuple[str, ...]
) -> tuple[list[str], dict[str, str]]:
    """`resolve` over one strategy table whose selection is the params key `key`."""

    def why_not(s: Strategy) -> str | None:
        if (missing := s.unavailable()) is not None:
            return missing
        why = s.applies_to(method)
        return None if why is None else f"does not apply to distill.method {method!r}: {why}"

    if strategies == "auto":
        run = [n for n, s in table.items() if why_not(s) is None]
        left_out = {n: why for n, s in table.items() if (why := why_not(s)) is not None}
        return run, left_out
    for n in strategies:
        if n not in table:
            raise ValueError(f"unknown strategy {n!r} in {key}; known: {list(table)}")
        if (why := table[n].unavailable()) is not None:
            raise ValueError(f"{key} includes {n!r}, which {why}; drop it")
        if (why := table[n].applies_to(method)) is not None:
            raise ValueError(
                f"{key} includes {n!r} but distill.method is {method!r}: {why}; drop "
                f"{n!r}, or set {key}: auto to compare every strategy that applies"
            )
    left_out = {n: f"not in {key}" for n in table if n not in strategies}
    return list(strategies), left_out


@dataclass(frozen=True)
class StrategyInputs:
    """The files a strategy reads: the manifest and splits, plus those its entry names."""

    manifest: Path
    splits: Path
    patches: Path | None = None
    teacher_features: Path | None = None
    teacher_mil: Path | None = None
    student: Path | None = None
    student_features: Path | None = None

    @classmethod
    def of(cls, manifest: Any, splits: Any, **given: Any) -> StrategyInputs:
        unknown = set(given) - set(INPUTS)
        if unknown:
            raise ValueError(f"unknown strategy inputs {sorted(unknown)}; known: {list(INPUTS)}")
        paths = {k: Path(v) for k, v in given.items() if v is not None and str(v) != ""}
        return cls(Path(manifest), Path(splits), **paths)

    def require(self, strategy: Strategy) -> None:
        missing = [k for k in strategy.inputs if getattr(self, k) is None]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ValueError(f"strategy {strategy.name!r} needs {flags}")


# --- the image-level strategies (issue 16) -------------------------------------------------
# The twins of the slide strategies for image tasks (`image` params), with the same names where
# they are the same idea, so an image run's evaluation rows read like a slide run's
# (`student.<distill.method>.<strategy>`, `Strategy.row`). Their runners have the signature
# `run(job: efcm.training.image_heads.ImageJob) -> summary dict` and write what
# `efcm.training.image_heads.train_heads` writes (fold_<k>.pt, predictions.csv,
# val_predictions.csv, summary.json). The teacher baseline, the teacher's
# linear probe (`efcm train-mil --kind image`), is the `TEACHER_ROW`, not a strategy.
IMAGE_INPUTS = ("teacher_heads", "student", "student_features")
# the strategy an image run ships and its gate judges unless `image.export_strategy` says so
DEFAULT_IMAGE_EXPORT = "retrain"


@dataclass(frozen=True)
class ImageStrategy(Strategy):
    """One image-level strategy (see `Strategy` for the shared fields; `inputs` among
    `IMAGE_INPUTS`).

    Attributes:
        available: False for a strategy that is named (so params and the docs can say it is
            coming) but has no implementation yet: `image.strategies: auto` leaves it out with
            that reason, and naming it explicitly is a configuration error.
    """

    available: bool = True

    def unavailable(self) -> str | None:
        if self.available:
            return None
        return f"is not available yet (its runner {self.runner} has not landed)"


IMAGE_STRATEGIES: dict[str, ImageStrategy] = {
    s.name: s
    for s in (
        ImageStrategy(
            "reuse",
            "Reuse head: the teacher's fold linear heads, unchanged, on the student's projected "
            "features",
            needs_teacher_space=True,
            runner="efcm.training.image_heads:run_reuse",
            inputs=("teacher_heads", "student_features"),
            gpu=False,
        ),
        ImageStrategy(
            "retrain",
            "Retrain head: a new linear head per fold on the frozen student's features",
            needs_teacher_space=False,
            runner="efcm.training.image_heads:run_retrain",
            inputs=("student_features",),
            gpu=False,
        ),
        # End-to-end fine-tuning of the student with its head (issue 16 point 4), the image twin
        # of ETC (`efcm.training.image_finetune`)
        ImageStrategy(
            "finetune",
            "Fine-tune: the student and a linear head trained end to end per fold (early stages "
            "frozen, a smaller backbone learning rate)",
            needs_teacher_space=False,
            runner="efcm.training.image_finetune:run_finetune",
            inputs=("student",),
            per_fold_student=True,
        ),
    )
}
IMAGE_NAMES: tuple[str, ...] = tuple(IMAGE_STRATEGIES)


def resolve_image(
    method: str, strategies: str | tuple[str, ...]
) -> tuple[list[str], dict[str, str]]:
    """`resolve` for the image strategies (`image.strategies`): one that is not available is left
    out by `auto` (with the reason) and an error when named."""
    return _resolve(IMAGE_STRATEGIES, "image.strategies", method, strategies)


@dataclass(frozen=True)
class ImageStrategyInputs:
    """The files an image strategy reads besides the manifest and splits: the teacher probe's
    output (`teacher_heads`), the distilled student (`student`: its checkpoint), the student's
    image features (`student_features`: an `efcm extract --kind image` output)."""

    teacher_heads: Path | None = None
    student: Path | None = None
    student_features: Path | None = None

    @classmethod
    def of(cls, **given: Any) -> ImageStrategyInputs:
        unknown = set(given) - set(IMAGE_INPUTS)
        if unknown:
            raise ValueError(
                f"unknown image strategy inputs {sorted(unknown)}; known: {list(IMAGE_INPUTS)}"
            )
        return cls(**{k: Path(v) for k, v in given.items() if v is not None and str(v) != ""})

    def require(self, strategy: Strategy) -> None:
        missing = [k for k in strategy.inputs if getattr(self, k) is None]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ValueError(f"image strategy {strategy.name!r} needs {flags}")


def summary_strategy(summary: Mapping[str, Any], where: str) -> str:
    """The strategy name a strategy output's summary.json records (ValueError if none)."""
    name = summary.get("strategy")
    if name not in STRATEGIES and name not in IMAGE_STRATEGIES:
        raise ValueError(f"{where}: summary.json names no known strategy (got {name!r})")
    return str(name)

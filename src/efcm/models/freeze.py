"""Freezing a student's early stages and its BatchNorm statistics (for ETC fine-tuning).

What a "stage" is, for any timm backbone: the parameter groups of timm's own
`model.group_matcher(coarse=True)`, ordered by `timm.models._manipulate.group_parameters` (the
grouping timm uses for layer-wise learning-rate decay). timm's matchers list a `stem` first, then
the `blocks`, and map every parameter they do not match (the neck and head) to one last group:

- stem: group 0. ResNet `conv1`, `bn1`; EfficientNet `conv_stem`, `bn1`; ConvNeXt `stem`;
  ViT `patch_embed`, `cls_token`, `reg_token`, `pos_embed`, `norm_pre`.
- stages: the groups after it. ResNet `layer1`..`layer4`; EfficientNet `blocks.0`..`blocks.6`
  (one per block row, whether or not its resolution drops); ConvNeXt `stages.0`..`stages.3`;
  ViT one transformer block each, `blocks.0`..`blocks.<depth-1>`. Layers timm attaches to the
  last stage go with it (ViT's final `norm`, EfficientNet's `conv_head` / `bn2`).
- head: the parameters no rule matches (e.g. ConvNeXt's `head.norm`, MobileNetV3's `conv_head`):
  never frozen here. (A matcher that is a function, as CaiT's, has no rules to read: its last
  group counts as a stage.)

`feature_info` is not used because it is not uniform across families: ResNet lists its stem as
feature 0, EfficientNet lists only the block rows where the resolution drops, a ViT every block.

A backbone without a `group_matcher` is searched for a submodule that has one (timm's
`FeatureGetterNet` wraps its model) or for a timm features-only net (`pretrained_cfg` names its
architecture, and it keeps that model's parameter names: `StageFeatures`, e.g. `resnet50_trunc`),
whose architecture's matcher is read from a copy built on the meta device (no memory, no weights).

`freeze_stages(student, n)` freezes the stem and the first `n` stages of `student.backbone`; the
projection, later stages and the head stay trainable. `n` above the backbone's number of stages is
a `ValueError` naming both (rather than freezing everything silently); `n` equal to it is allowed
(a VFD student still trains its projection). Only BatchNorm is special (`freeze_batchnorm`: eval
mode, affine weights frozen); other norms (LayerNorm, GroupNorm) are ordinary parameters of their
stage. FPD students have no `backbone`: their shallow CNN is frozen by construction and only
their TransScan projection trains, whatever `n`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models._manipulate import group_parameters
from torch import nn

from efcm.models.students import FPDStudent


@dataclass(frozen=True)
class BackboneStages:
    """A backbone's parameter names (relative to the backbone), split as timm groups them."""

    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]


def _rules(matcher: Any) -> list[re.Pattern[str]]:
    """The regexes of a timm dict matcher (values: a regex, or a list of (regex, suffix)); a
    callable matcher has none we can read."""
    if not isinstance(matcher, dict):
        return []
    rules = []
    for spec in matcher.values():
        if isinstance(spec, str):
            rules.append(re.compile(spec))
        elif isinstance(spec, list | tuple):
            rules += [re.compile(s[0]) for s in spec]
    return rules


def _arch_name(module: nn.Module) -> str:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(module).__name__)


def _find_matcher(backbone: nn.Module) -> tuple[str, nn.Module, Any]:
    """(prefix, submodule, its coarse group matcher): the outermost submodule with a timm
    `group_matcher`, else the outermost timm features-only net (matcher of its architecture)."""
    for prefix, sub in backbone.named_modules():
        if callable(getattr(sub, "group_matcher", None)):
            return prefix, sub, sub.group_matcher(coarse=True)
    for prefix, sub in backbone.named_modules():
        arch = (getattr(sub, "pretrained_cfg", None) or {}).get("architecture")
        if arch:
            try:
                with torch.device("meta"):  # only the matcher is wanted: no memory, no init
                    model = timm.create_model(arch, pretrained=False)
                return prefix, sub, model.group_matcher(coarse=True)
            except (RuntimeError, AttributeError, NotImplementedError) as err:
                raise ValueError(
                    f"cannot read the stages of {arch!r} (inside {type(backbone).__name__}): {err}"
                ) from None
    raise ValueError(
        f"cannot freeze stages of {_arch_name(backbone)}: neither it nor a submodule has a timm "
        "group_matcher"
    )


def backbone_stages(backbone: nn.Module) -> BackboneStages:
    """Split a timm backbone's parameters into stem, stages and head (see the module docstring)."""
    prefix, sub, matcher = _find_matcher(backbone)
    lead = f"{prefix}." if prefix else ""
    grouped = group_parameters(sub, matcher)  # layer id -> parameter names, in forward order
    rules = _rules(matcher)
    groups = [tuple(grouped[i]) for i in sorted(grouped)]
    head: tuple[str, ...] = ()
    if rules and groups and not any(r.match(n) for r in rules for n in groups[-1]):
        head = groups.pop()  # timm puts every unmatched parameter (neck, head) in one last group
    stem = groups.pop(0) if groups else ()
    # parameters of a wrapper outside the matched submodule (none in timm's wrappers) stay with
    # the head: trainable
    outside = tuple(n for n, _ in backbone.named_parameters() if not n.startswith(lead))
    return BackboneStages(
        tuple(lead + n for n in stem),
        tuple(tuple(lead + n for n in g) for g in groups),
        tuple(lead + n for n in head) + outside,
    )


def freeze_stages(student: nn.Module, n: int) -> list[str]:
    """Freeze the stem and the first `n` stages of `student.backbone` (`requires_grad=False`);
    returns the names of the student's parameters left trainable.

    Raises:
        ValueError: `n` is negative or above the backbone's number of stages.
        TypeError: `student` has no `backbone` and is not an FPD student.
    """
    if n < 0:
        raise ValueError(f"freeze_stages must be >= 0, got {n}")
    if not isinstance(student, FPDStudent):  # FPD: the shallow CNN is frozen already
        backbone = getattr(student, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"freeze_stages: {type(student).__name__} has no timm `backbone`")
        split = backbone_stages(backbone)
        if n > len(split.stages):
            raise ValueError(
                f"freeze_stages={n}: the student's {_arch_name(backbone)} has only "
                f"{len(split.stages)} stages after its stem (use 0..{len(split.stages)})"
            )
        frozen = {f"backbone.{name}" for group in (split.stem, *split.stages[:n]) for name in group}
        for name, p in student.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
    return [name for name, p in student.named_parameters() if p.requires_grad]


def freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm keeps its running statistics (eval mode) and affine weights frozen."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

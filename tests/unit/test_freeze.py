"""Freezing a student's stem and first stages, for any timm backbone (efcm.models.freeze)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efcm.config import params_from_dict
from efcm.models.freeze import freeze_batchnorm, freeze_stages
from efcm.models.students import build_fpd, build_vfd

SIZE = 32
# arch, timm kwargs, its number of stages after the stem, what freeze_stages(student, 2) freezes
CASES = {
    "resnet": (
        "test_resnet",
        {},
        4,
        ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2."),
    ),
    "efficientnet": (
        "test_efficientnet",
        {},
        5,
        ("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1."),
    ),
    "convnext": (
        "test_convnext",
        {},
        4,
        ("backbone.stem.", "backbone.stages.0.", "backbone.stages.1."),
    ),
    "vit": (  # stem = patch and position embeddings and the class token; a stage = one block
        "test_vit",
        {"img_size": SIZE},
        6,
        (
            "backbone.cls_token",
            "backbone.pos_embed",
            "backbone.patch_embed.",
            "backbone.blocks.0.",
            "backbone.blocks.1.",
        ),
    ),
}


def _student(arch: str, kwargs: dict) -> nn.Module:
    params = params_from_dict(
        {"student": {"arch": arch, "input_size": SIZE, "model_kwargs": kwargs}}
    )
    torch.manual_seed(0)
    return build_vfd(params.student, 8, warn_random=False)


def _batchnorm(model: nn.Module) -> tuple[set[str], set[str]]:
    """(parameter names, buffer names) of every BatchNorm in `model`."""
    bns = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    return (
        {f"{name}.{p}" for name, m in bns for p, _ in m.named_parameters()},
        {f"{name}.{b}" for name, m in bns for b, _ in m.named_buffers()},
    )


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_changes_only_the_unfrozen_stages_and_no_batchnorm_statistic(case):
    arch, kwargs, _, frozen_prefixes = CASES[case]
    student = _student(arch, kwargs)
    trainable = set(freeze_stages(student, 2))
    names = {n for n, _ in student.named_parameters()}
    frozen = {n for n in names if n.startswith(frozen_prefixes)}
    assert frozen and trainable == names - frozen
    assert any(n.startswith("backbone.") for n in trainable)

    student.train()
    freeze_batchnorm(student)
    bn_params, bn_stats = _batchnorm(student)
    assert bn_stats or case in ("convnext", "vit")  # these two use LayerNorm
    before = {k: v.clone() for k, v in student.state_dict().items()}
    params = dict(student.named_parameters())
    stepped = {n for n, p in params.items() if p.requires_grad}
    assert stepped == trainable - bn_params  # other norms (LayerNorm) are ordinary parameters
    opt = torch.optim.AdamW([params[n] for n in sorted(stepped)], lr=1e-2)
    torch.manual_seed(1)
    x, target = torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 8)
    F.mse_loss(student(x), target).backward()
    opt.step()

    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed & frozen, sorted(changed & frozen)[:5]
    assert not changed & bn_stats, sorted(changed & bn_stats)[:5]
    assert stepped <= changed, sorted(stepped - changed)[:5]


@pytest.mark.parametrize("case", list(CASES))
def test_more_stages_freeze_more_parameters_and_never_the_projection(case):
    arch, kwargs, stages, _ = CASES[case]
    student = _student(arch, kwargs)
    total = sum(1 for _ in student.parameters())
    frozen = []
    for n in range(stages + 1):
        for p in student.parameters():
            p.requires_grad_(True)
        trainable = freeze_stages(student, n)
        frozen.append(total - len(trainable))
        assert {"proj.weight", "proj.bias"} <= set(trainable)
    assert frozen[0] > 0  # n = 0 still freezes the stem
    assert all(a < b for a, b in itertools.pairwise(frozen)), frozen


def test_convnext_head_norm_stays_trainable_with_every_stage_frozen():
    arch, kwargs, stages, _ = CASES["convnext"]
    trainable = freeze_stages(_student(arch, kwargs), stages)
    head = ["backbone.head.norm.bias", "backbone.head.norm.weight"]
    assert sorted(trainable) == [*head, "proj.bias", "proj.weight"]


def test_more_stages_than_the_backbone_has_is_an_error_naming_both():
    arch, kwargs, stages, _ = CASES["resnet"]
    student = _student(arch, kwargs)
    with pytest.raises(ValueError, match=rf"freeze_stages={stages + 1}: .*only {stages} stages"):
        freeze_stages(student, stages + 1)
    with pytest.raises(ValueError, match="freeze_stages must be >= 0, got -1"):
        freeze_stages(student, -1)
    assert all(p.requires_grad for p in student.parameters())  # nothing frozen on the way


def test_truncated_resnet_stages_come_from_its_architecture():
    """`resnet50_trunc` is not a timm model but a features-only net cut after layer3."""
    student = _student("resnet50_trunc", {})
    trainable = freeze_stages(student, 2)
    assert trainable and all(n.startswith(("backbone.body.layer3.", "proj.")) for n in trainable)
    assert any(n.startswith("backbone.body.layer3.") for n in trainable)
    with pytest.raises(ValueError, match="only 3 stages"):
        freeze_stages(student, 4)


def test_fpd_student_trains_only_its_projection_whatever_n():
    params = params_from_dict(
        {
            "student": {"arch": "test_resnet", "input_size": SIZE},
            "distill": {
                "method": "fpd",
                "fpd": {"shallow_stage": 2, "embed_dim": 32, "depth": 1, "heads": 2},
            },
        }
    )
    student = build_fpd(params.student, 8, params.distill.fpd, warn_random=False)
    projection = {f"projection.{n}" for n, _ in student.projection.named_parameters()}
    for n in (0, 2, 9):
        assert set(freeze_stages(student, n)) == projection


def test_student_without_a_backbone_is_refused():
    with pytest.raises(TypeError, match="Linear has no timm `backbone`"):
        freeze_stages(nn.Linear(2, 2), 0)

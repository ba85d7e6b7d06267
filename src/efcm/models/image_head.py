"""The linear head of an image-level task: standardise the features, then one linear layer.

It is the RETFound / MRM linear probe (their BatchNorm without affine parameters, at inference, is
the same standardisation): the mean and std of the training split's features are buffers of the
head, so a head travels with its standardisation, and Reuse applies both, unchanged, to the
student's projected features. Training is `efcm.training.image_heads`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from efcm.io.checkpoints import load_module, save_module

FORMAT = "efcm.image_head/1"
#: The smallest std a feature is divided by: a constant feature is centred, not blown up.
MIN_STD = 1e-6


class LinearHead(nn.Module):
    """(N, in_dim) features -> (N, n_classes) logits; `probabilities` applies softmax
    (multi-class) or a sigmoid per class (multi-label)."""

    def __init__(self, in_dim: int, n_classes: int, multi_label: bool = False) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.multi_label = in_dim, n_classes, multi_label
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, n_classes)
        # as the MAE / RETFound linear probe: weights near 0, so no feature starts with a say
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def config(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "n_classes": self.n_classes, "multi_label": self.multi_label}

    def standardise_with(self, features: torch.Tensor) -> None:
        """Set the mean and std from `features` (N, in_dim): the training split's."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False).clamp_min(MIN_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"the head takes (N, {self.in_dim}) features, got {list(x.shape)}")
        return self.linear((x - self.mean) / self.std)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, 1)


def save_head(path: str | Path, head: LinearHead, extra: dict[str, Any] | None = None) -> None:
    save_module(path, FORMAT, head, extra)


def _from_config(c: dict[str, Any]) -> LinearHead:
    return LinearHead(int(c["in_dim"]), int(c["n_classes"]), bool(c["multi_label"]))


def load_head(path: str | Path) -> LinearHead:
    """A head saved by `save_head`, in eval mode; ValueError naming the file otherwise."""
    return load_module(path, FORMAT, "image head", _from_config)


class ImageHeadEnsemble(nn.Module):
    """An image package's k fold heads as one, in the interface of the slides'
    `FoldEnsembleCLAM` (so runtimes, ONNX export and parity treat both alike): forward(bag) ->
    dict(probs (1, C), logits (1, C) = log probs, attention (N,)).

    A bag is one image's student features, (1, D) (an image is a bag of one); with `split` (one
    fine-tuned student per fold), (1, k x D) and member k reads columns k*D:(k+1)*D. Each member's
    probabilities (softmax, or a sigmoid per class) are averaged over the members; a bag of N > 1
    rows (views of one image) is averaged over its rows too, each weighing 1/N (`attention`)."""

    def __init__(self, members: list[LinearHead], *, split: bool) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one head")
        shapes = {(m.in_dim, m.n_classes, m.multi_label) for m in members}
        if len(shapes) != 1:
            raise ValueError("the fold heads of an ensemble must share in_dim, classes and task")
        self.members = nn.ModuleList(members)
        self.split = split
        self.member_dim, self.n_classes, self.multi_label = shapes.pop()
        self.in_dim = self.member_dim * (len(members) if split else 1)

    def member(self, k: int) -> ImageHeadEnsemble:
        """Fold k's head alone, as an ensemble of one (it reads the whole bag it is given)."""
        return ImageHeadEnsemble([self.members[k]], split=False)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        if bag.ndim != 2 or bag.shape[-1] != self.in_dim:
            raise ValueError(f"the heads take (N, {self.in_dim}) features, got {list(bag.shape)}")
        d = self.member_dim
        probs = torch.stack(
            [
                m.probabilities(bag[:, k * d : (k + 1) * d] if self.split else bag)
                for k, m in enumerate(self.members)
            ]
        ).mean(0)  # (N, C)
        probs = probs.mean(0, keepdim=True)  # (1, C)
        attention = torch.ones(bag.shape[0], dtype=probs.dtype) / bag.shape[0]
        return {"probs": probs, "logits": probs.clamp_min(1e-12).log(), "attention": attention}

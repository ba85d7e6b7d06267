"""CLAM-SB: gated-attention multiple-instance learning with instance-level clustering.

fc: Linear(D, hidden) + ReLU + Dropout; gated attention: tanh branch x sigmoid branch -> 1 score per
instance; softmax over instances; attention pooling; one bag classifier. Instance clustering: the
top-B and bottom-B attended instances of the true class are pseudo-labelled positive / negative for
that class's instance classifier (CE loss); B shrinks for bags smaller than 2B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedAttention(nn.Module):
    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h)).squeeze(-1)  # (N, dim) -> (N,) raw scores


class CLAMSB(nn.Module):
    """Single-branch CLAM. forward(bag (N, D)) -> dict(logits (1, C), probs (1, C), attention
    (N,))."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
    ) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.k_sample = in_dim, n_classes, k_sample
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def config(self) -> dict[str, int | float]:
        return {
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "hidden": self.fc[0].out_features,
            "attn_dim": self.attention.c.in_features,
            "dropout": self.fc[2].p,
            "k_sample": self.k_sample,
        }

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, torch.Tensor]:
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(
                f"CLAM expects a bag of shape [N, {self.in_dim}], got {list(bag.shape)}"
            )
        if bag.shape[0] == 0:
            raise ValueError("CLAM got an empty bag (0 instances)")
        h = self.fc(bag)  # (N, hidden)
        scores = self.attention(h)  # (N,)
        attn = torch.softmax(scores, dim=0)
        pooled = attn @ h  # (hidden,)
        logits = self.classifier(pooled).unsqueeze(0)  # (1, C)
        out = {
            "logits": logits,
            "probs": torch.softmax(logits, -1),
            "attention": attn,
            "scores": scores,
        }
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, scores, label)
        return out

    def instance_loss(self, h: torch.Tensor, scores: torch.Tensor, label: int) -> torch.Tensor:
        """CE on the top-B (positive) and bottom-B (negative) attended instances of the true
        class."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.new_zeros(())
        top = torch.topk(scores, k).indices
        bottom = torch.topk(-scores, k).indices
        x = torch.cat([h[top], h[bottom]])
        y = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(
            h.device
        )
        return F.cross_entropy(self.instance_classifiers[label](x), y)

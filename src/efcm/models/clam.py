"""CLAM (Lu et al. 2021): gated-attention multiple-instance learning with instance-level clustering.

Both variants share (`CLAMBase`): fc = Linear(D, hidden) + ReLU + Dropout; gated attention
(tanh branch x sigmoid branch -> one raw score per instance and attention branch), softmax over the
instances; one binary instance classifier per class; the instance-clustering loss.

- CLAM-SB (`CLAMSB`): one attention branch; the attention-pooled vector (hidden,) goes to one bag
  classifier Linear(hidden, C).
- CLAM-MB (`CLAMMB`): one attention branch per class (attention (C, N)); class c's pooled vector
  goes to its own bag classifier Linear(hidden, 1), giving logit c. Its `attention` output (for
  heatmaps) is the predicted class's row; `attention_all` has all of them.

Instance clustering (when `forward` gets the bag's label y), with B = min(k_sample, N // 2):
  - class y: the top-B instances by class y's attention (SB: the single attention) are pseudo-
    labelled 1 (in-class), the bottom-B 0, for instance classifier y;
  - with `subtyping`, every other class c: its top-B instances are pseudo-labelled 0 for instance
    classifier c (out-of-class evidence: what c attends to in a bag of another class is not c).
  The loss is the sum over these terms (each a mean over its instances), divided by C when
  `subtyping` is set; B = 0 (a bag of one instance) gives 0.
  Each term is `ce` (cross-entropy) or `svm`, the smooth top-1 multiclass SVM of Berrada et al.
  2018 (see `smooth_top1_svm`), which CLAM uses by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efcm.config import TrainMilParams
from efcm.io.checkpoints import load_module, save_module

INSTANCE_LOSSES = ("ce", "svm")


def smooth_top1_svm(
    scores: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss, mean over the rows of scores (M, K), targets (M,):

        L(s, y) = tau * log sum_j exp((s_j + alpha * [j != y] - s_y) / tau)

    the log-sum-exp smoothing (temperature tau) of the hinge max_j(s_j + alpha [j != y]) - s_y =
    max(0, max_{j != y}(alpha + s_j - s_y)), to which it tends as tau -> 0. It is smooth, always
    > 0 and tends to 0 when s_y beats every other score by much more than the margin alpha; for
    K = 2 and d = s_y - s_other it is tau * log(1 + exp((alpha - d) / tau)).
    """
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise ValueError(
            f"smooth_top1_svm expects scores [M, K] and targets [M], got "
            f"{list(scores.shape)} and {list(target.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    target = target.long()
    margin = alpha * (1.0 - F.one_hot(target, scores.shape[1]).to(scores.dtype))
    true = scores.gather(1, target[:, None])
    return (tau * torch.logsumexp((scores + margin - true) / tau, dim=1)).mean()


class GatedAttention(nn.Module):
    """tanh(Wa h) * sigmoid(Wb h) -> Wc: raw attention scores, (N,) for n_out = 1 (one branch),
    (n_out, N) otherwise (one row per branch)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float, n_out: int = 1) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(attn_dim, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.c(self.a(h) * self.b(h))  # (N, n_out)
        return s.squeeze(-1) if s.shape[-1] == 1 else s.T


class CLAMBase(nn.Module):
    """What CLAM-SB and CLAM-MB share: the fc layer, the instance classifiers, the bag check, the
    instance-clustering loss and the config used by save/load. Subclasses set `attention` and
    implement `forward`."""

    kind = ""
    multi_branch = False  # one attention branch per class (MB) or a single one (SB)

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        instance_loss: str = "ce",
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"CLAM needs at least 2 classes, got {n_classes}")
        if instance_loss not in INSTANCE_LOSSES:
            raise ValueError(
                f"instance_loss must be one of {list(INSTANCE_LOSSES)}, got {instance_loss!r}"
            )
        self.in_dim, self.n_classes, self.k_sample = in_dim, n_classes, k_sample
        self.instance_loss_kind, self.subtyping = instance_loss, bool(subtyping)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(
            hidden, attn_dim, dropout, n_out=n_classes if self.multi_branch else 1
        )
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def config(self) -> dict[str, str | int | float | bool]:
        return {
            "model": self.kind,
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "hidden": self.fc[0].out_features,
            "attn_dim": self.attention.c.in_features,
            "dropout": self.fc[2].p,
            "k_sample": self.k_sample,
            "instance_loss": self.instance_loss_kind,
            "subtyping": self.subtyping,
        }

    def _embed(self, bag: torch.Tensor) -> torch.Tensor:
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(
                f"CLAM expects a bag of shape [N, {self.in_dim}], got {list(bag.shape)}"
            )
        if bag.shape[0] == 0:
            raise ValueError(f"CLAM got an empty bag (0 instances); expected [N, {self.in_dim}]")
        return self.fc(bag)  # (N, hidden)

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.instance_loss_kind == "svm":
            return smooth_top1_svm(logits, target, alpha=1.0, tau=1.0)
        return F.cross_entropy(logits, target)

    def instance_loss(
        self, h: torch.Tensor, scores: torch.Tensor, label: int | torch.Tensor
    ) -> torch.Tensor:
        """Instance-clustering loss (see the module docstring). h (N, hidden); scores: raw
        attention, (N,) (one branch, used for every class) or (C, N) (one row per class)."""
        label = int(label)
        if not 0 <= label < self.n_classes:
            raise ValueError(f"label {label} out of range for {self.n_classes} classes")
        n = h.shape[0]
        k = min(self.k_sample, n // 2)
        if k == 0:
            return h.new_zeros(())
        if scores.ndim == 1:
            scores = scores.expand(self.n_classes, n)
        ones = torch.ones(k, dtype=torch.long, device=h.device)
        total = h.new_zeros(())
        for c in range(self.n_classes):
            if c == label:
                order = torch.argsort(scores[c], descending=True)
                idx = torch.cat([order[:k], order[n - k :]])  # top-B then bottom-B, disjoint
                target = torch.cat([ones, torch.zeros_like(ones)])
            elif self.subtyping:
                idx = torch.topk(scores[c], k).indices
                target = torch.zeros_like(ones)
            else:
                continue
            total = total + self._criterion(self.instance_classifiers[c](h[idx]), target)
        if self.subtyping:
            total = total / self.n_classes
        return total


class CLAMSB(CLAMBase):
    """Single-branch CLAM. forward(bag (N, D), label=None) -> dict(logits (1, C), probs (1, C),
    attention (N,) (sums to 1), scores (N,) raw attention, and instance_loss () when a label is
    given)."""

    kind = "clam_sb"

    def __init__(self, in_dim: int, n_classes: int, **kw: Any) -> None:
        """Keywords as `CLAMBase`: hidden, attn_dim, dropout, k_sample, instance_loss,
        subtyping."""
        super().__init__(in_dim, n_classes, **kw)
        self.classifier = nn.Linear(self.fc[0].out_features, n_classes)

    def forward(
        self, bag: torch.Tensor, label: int | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        h = self._embed(bag)
        scores = self.attention(h)  # (N,)
        attn = torch.softmax(scores, dim=0)
        logits = self.classifier(attn @ h).unsqueeze(0)  # (1, C)
        out = {
            "logits": logits,
            "probs": torch.softmax(logits, -1),
            "attention": attn,
            "scores": scores,
        }
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, scores, label)
        return out


class CLAMMB(CLAMBase):
    """Multi-branch CLAM. forward(bag (N, D), label=None) -> dict(logits (1, C), probs (1, C),
    attention (N,) and scores (N,) of the predicted class, attention_all (C, N) (each row sums to
    1), scores_all (C, N), and instance_loss () when a label is given)."""

    kind = "clam_mb"

    multi_branch = True

    def __init__(self, in_dim: int, n_classes: int, **kw: Any) -> None:
        """Keywords as `CLAMBase`: hidden, attn_dim, dropout, k_sample, instance_loss,
        subtyping."""
        super().__init__(in_dim, n_classes, **kw)
        hidden = self.fc[0].out_features
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def forward(
        self, bag: torch.Tensor, label: int | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        h = self._embed(bag)
        scores = self.attention(h)  # (C, N)
        attn = torch.softmax(scores, dim=1)
        pooled = attn @ h  # (C, hidden): one pooled vector per class
        logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])[None]
        pred = logits.argmax(-1)  # (1,): a tensor, not an int, so that ONNX export traces it
        out = {
            "logits": logits,
            "probs": torch.softmax(logits, -1),
            "attention": attn.index_select(0, pred)[0],
            "scores": scores.index_select(0, pred)[0],
            "attention_all": attn,
            "scores_all": scores,
        }
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, scores, label)
        return out


MODELS: dict[str, type[CLAMBase]] = {"clam_sb": CLAMSB, "clam_mb": CLAMMB}


def clam_from_config(c: dict[str, Any]) -> CLAMBase:
    """Build an (untrained) CLAM from `CLAMBase.config()`; configs without `model` are CLAM-SB."""
    kind = str(c.get("model", "clam_sb"))
    if kind not in MODELS:
        raise ValueError(f"unknown CLAM model {kind!r}; expected one of {list(MODELS)}")
    return MODELS[kind](
        int(c["in_dim"]),
        int(c["n_classes"]),
        hidden=int(c["hidden"]),
        attn_dim=int(c["attn_dim"]),
        dropout=float(c["dropout"]),
        k_sample=int(c["k_sample"]),
        instance_loss=str(c.get("instance_loss", "ce")),
        subtyping=bool(c.get("subtyping", False)),
    )


def build_clam(in_dim: int, n_classes: int, cfg: TrainMilParams) -> CLAMBase:
    """CLAM-SB or CLAM-MB per `cfg.model`, with the configured instance loss and subtyping."""
    if cfg.model not in MODELS:
        raise ValueError(f"train_mil.model must be one of {list(MODELS)}, got {cfg.model!r}")
    return MODELS[cfg.model](
        in_dim,
        n_classes,
        hidden=cfg.hidden,
        attn_dim=cfg.attn_dim,
        dropout=cfg.dropout,
        k_sample=cfg.k_sample,
        instance_loss=cfg.instance_loss,
        subtyping=cfg.subtyping,
    )


def save_clam(path: Path, model: CLAMBase, extra: dict[str, Any] | None = None) -> None:
    save_module(path, "efcm.clam/1", model, extra)


def load_clam(path: str | Path) -> CLAMBase:
    """A CLAM-SB or CLAM-MB saved by `save_clam` (checkpoints without a model kind are SB)."""
    return load_module(path, "efcm.clam/1", "CLAM", clam_from_config)

"""The k fold models of a strategy as one model: what a package ships.

Cross-validation trains one CLAM per fold and scores each on its test fold only; the package
ships all k of them as one ensemble, so that every model the evaluation scored is in it, unchanged:
`members` exposes each one (a test checks a member's prediction for a slide of its test fold
equals the evaluation's out-of-fold prediction).

- One student for every fold (Reuse, Retrain CLAM): `FoldEnsembleCLAM(members, split=False)`
  feeds the same bag to every CLAM.
- One fine-tuned student per fold (ETC): `FoldEnsembleEncoder` concatenates the k students'
  features (B, k x D) and `FoldEnsembleCLAM(members, split=True)` gives member k its slice, so the
  rest of the stack (features in, CLAM out) is unchanged. Serving then costs k student passes per
  patch; `model.json` says so.

The ensemble averages the members' class probabilities, and their attention maps (for CLAM-MB,
each member's attention for the class the ensemble predicts).
"""

from __future__ import annotations

import torch
from torch import nn

from efcm.models.clam import CLAMBase


class FoldEnsembleEncoder(nn.Module):
    """k encoders (uint8 patches -> (B, D) each) -> their features side by side, (B, k x D)."""

    def __init__(self, encoders: list[nn.Module]) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("an ensemble needs at least one encoder")
        self.members = nn.ModuleList(encoders)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(patches) for m in self.members], dim=1)


class FoldEnsembleCLAM(nn.Module):
    """k CLAMs as one: forward(bag) -> dict(probs (1, C), logits (1, C) = log probs,
    attention (N,)); with `split`, the bag is (N, k x D) and member k reads columns k*D:(k+1)*D."""

    def __init__(self, members: list[CLAMBase], *, split: bool) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one CLAM")
        dims = {m.in_dim for m in members}
        if len(dims) != 1 or len({m.n_classes for m in members}) != 1:
            raise ValueError("the fold CLAMs of an ensemble must share in_dim and n_classes")
        self.members = nn.ModuleList(members)
        self.split = split
        self.member_dim = dims.pop()
        self.in_dim = self.member_dim * (len(members) if split else 1)
        self.n_classes = members[0].n_classes

    def member(self, k: int) -> FoldEnsembleCLAM:
        """Fold k's CLAM alone, as an ensemble of one (it reads the whole bag it is given)."""
        return FoldEnsembleCLAM([self.members[k]], split=False)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        if bag.shape[-1] != self.in_dim:
            raise ValueError(f"the ensemble takes {self.in_dim}-d features, got {bag.shape[-1]}")
        d = self.member_dim
        outs = [
            m(bag[:, k * d : (k + 1) * d] if self.split else bag)
            for k, m in enumerate(self.members)
        ]
        probs = torch.stack([o["probs"] for o in outs]).mean(0)  # (1, C)
        pred = probs.argmax(-1)  # (1,): a tensor, not an int, so that ONNX export traces it
        attention = torch.stack(
            [
                o["attention_all"].index_select(0, pred)[0]
                if "attention_all" in o
                else o["attention"]
                for o in outs
            ]
        ).mean(0)  # (N,), sums to 1 as each member's does
        return {"probs": probs, "logits": probs.clamp_min(1e-12).log(), "attention": attention}

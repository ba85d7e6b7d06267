"""MCM-KD: Masked Context Modelling with Knowledge Distillation.

The student embeds every visible patch of an s x s window of neighbouring tissue patches; a
random share of the window's positions is replaced by a learned mask token; a fixed 2-D
sine-cosine position embedding says where each token sits; a transformer encoder reads the
window and a predictor maps every position to the teacher's feature space. The loss is L1 on the
masked positions only, so the student learns features from which the context can be predicted.
After training, the transformer and predictor are dropped: the student backbone alone is the
encoder (`efcm.models.students.BackboneStudent`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from efcm.models.transscan import sincos_2d, token_transformer


def grid_windows(coords: np.ndarray, step0: int, window: int, min_valid: float = 0.5) -> np.ndarray:
    """Tile a slide's patch grid into non-overlapping s x s windows of neighbouring patches.

    Args:
        coords: (N, 2) level-0 top-left of the tissue patches (a regular grid of step `step0`).
        step0: the grid step in level-0 px.
        window: s.
        min_valid: the least share of a window's s*s positions that must hold a tissue patch.

    Returns:
        (W, s*s) int64 patch indices in row-major window order; -1 where the position has no
        tissue patch.
    """
    if len(coords) == 0:
        return np.zeros((0, window * window), np.int64)
    origin = coords.min(0)
    grid = np.round((coords - origin) / step0).astype(np.int64)  # (N, 2) grid x, y
    gw, gh = grid.max(0) + 1
    lookup = np.full((gh, gw), -1, np.int64)
    lookup[grid[:, 1], grid[:, 0]] = np.arange(len(coords))
    pad_h, pad_w = -gh % window, -gw % window
    lookup = np.pad(lookup, ((0, pad_h), (0, pad_w)), constant_values=-1)
    h, w = lookup.shape
    tiles = lookup.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(-1, window * window)
    keep = (tiles >= 0).mean(1) >= min_valid
    return tiles[keep]


def random_mask(
    valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, n) bool: exactly round(ratio * n_valid) masked positions per window, at least one, and at
    least one valid position left visible; invalid positions are never masked."""
    b, n = valid.shape
    scores = torch.rand(b, n, generator=generator, device="cpu").to(valid.device)
    scores = scores.masked_fill(~valid, 2.0)  # invalid positions sort last
    order = scores.argsort(1)
    n_valid = valid.sum(1)
    k = torch.clamp(torch.round(n_valid * ratio).long(), min=1)
    k = torch.minimum(k, (n_valid - 1).clamp(min=1))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=valid.device).expand(b, n))
    return (ranks < k[:, None]) & valid


class MaskedContextModel(nn.Module):
    """forward(patches (B, n, 3, H, W), valid (B, n), mask (B, n)) -> (B, n, teacher_dim)."""

    def __init__(
        self,
        backbone: nn.Module,
        teacher_dim: int,
        *,
        window: int = 4,
        embed_dim: int = 256,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if embed_dim % heads or embed_dim % 4:
            raise ValueError(f"MCM embed_dim {embed_dim} must be divisible by heads and by 4")
        self.backbone = backbone
        self.window = window
        self.embed = nn.Linear(backbone.num_features, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_2d(window, window, embed_dim), persistent=False)
        self.encoder = token_transformer(embed_dim, heads, 2.0, depth)
        self.predictor = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, teacher_dim),
        )

    def forward(
        self, patches: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, n = valid.shape
        if n != self.window**2:
            raise ValueError(f"MCM expects windows of {self.window**2} positions, got {n}")
        visible = valid & ~mask
        tokens = self.mask_token.to(patches.dtype).expand(b, n, -1).clone()
        if visible.any():  # the student embeds the visible patches only: masked ones are replaced
            feats = self.backbone(patches[visible])  # (V, 3, H, W) -> (V, d)
            tokens[visible] = self.embed(feats).to(tokens.dtype)
        tokens = tokens + self.pos.to(tokens.dtype)
        out = self.encoder(tokens, src_key_padding_mask=~valid)
        return self.predictor(out)  # (B, n, teacher_dim)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 over the masked positions only (mean over their elements); unmasked targets are unused."""
    if not mask.any():
        return pred.sum() * 0.0
    return F.l1_loss(pred[mask], target[mask])

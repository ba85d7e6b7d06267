"""TransScan: the trainable projection of Feature Projection Distillation (FPD).

It reads a feature map of the student's shallow, frozen CNN and maps it to the teacher's feature
space: a 1x1 convolution to `embed_dim`, a selective-kernel block (parallel 3x3 convolutions with
dilation 1 and 2, fused by attention over the branches: the receptive field adapts per channel and
per image), transformer encoder layers over the spatial tokens (with a 2-D sine-cosine position
embedding), mean pooling over tokens, and a linear map to the teacher's dimension.
"""

from __future__ import annotations

import torch
from torch import nn


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(h * w, dim) fixed 2-D sine-cosine position embedding (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine embedding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    out = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None]
        out += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(out, 1)


def token_transformer(
    embed_dim: int, heads: int, mlp_ratio: float, depth: int
) -> nn.TransformerEncoder:
    """Pre-norm transformer encoder over (B, tokens, embed_dim), GELU, no dropout."""
    layer = nn.TransformerEncoderLayer(
        embed_dim,
        heads,
        int(embed_dim * mlp_ratio),
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class SelectiveKernel(nn.Module):
    """Two 3x3 branches (dilation 1 and 2) fused by a softmax attention over the branches.

    `forward_with_attention` also returns the branch weights, (B, 2, C): how much of each channel
    came from the small and from the large receptive field. They are returned, never kept on the
    module: one module serves several threads at once (the predictor), and state written by one
    call would be read by another.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=d, dilation=d, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for d in (1, 2)
        )
        hidden = max(channels // reduction, 8)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.select = nn.Linear(hidden, channels * len(self.branches))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> the fused map (B, C, H, W) and the branch weights (B, 2, C)."""
        b, c = x.shape[:2]
        feats = torch.stack([branch(x) for branch in self.branches], 1)  # (B, 2, C, H, W)
        summary = feats.sum(1).mean((2, 3))  # (B, C)
        attn = self.select(self.squeeze(summary)).view(b, len(self.branches), c).softmax(1)
        return (feats * attn[..., None, None]).sum(1), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]  # (B, C, H, W)


class TransScan(nn.Module):
    """(B, C_in, H, W) feature map -> (B, out_dim)."""

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        *,
        embed_dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        if embed_dim % heads or embed_dim % 4:
            raise ValueError(
                f"TransScan embed_dim {embed_dim} must be divisible by heads ({heads}) and by 4"
            )
        self.inp = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, 1, bias=False), nn.BatchNorm2d(embed_dim)
        )
        self.sk = SelectiveKernel(embed_dim, reduction)
        self.encoder = token_transformer(embed_dim, heads, mlp_ratio, depth)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)
        self.embed_dim = embed_dim

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.sk(self.inp(fmap))  # (B, E, H, W)
        _, e, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, E)
        tokens = tokens + sincos_2d(h, w, e, x.device).to(tokens.dtype)
        tokens = self.norm(self.encoder(tokens))
        return self.head(tokens.mean(1))  # (B, out_dim)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

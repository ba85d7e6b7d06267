"""Patch encoders built by timm, checkpoint loading, and the input transform.

The teacher is a timm backbone with its classifier removed (`num_classes=0`: pooled features). The
students built on these backbones are in `efcm.models.students`.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from efcm.config import EncoderParams
from efcm.io.cache import SlideCache, local_path
from efcm.io.files import sha256_file

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "backbone.", "encoder.")


def _state_dict_of(ckpt: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap the common checkpoint layouts into a flat state dict."""
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model", "teacher", "student"):
            if key in ckpt and isinstance(ckpt[key], dict):
                return _state_dict_of(ckpt[key], source)
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise ValueError(
        f"{source}: not a checkpoint (expected a state dict, or one under 'model', "
        "'state_dict', 'teacher' or 'student')"
    )


def load_weights(model: nn.Module, uri: str, *, cache: SlideCache | None = None) -> str:
    """Load a checkpoint (local path, or gs:// staged into `cache`) into `model`; returns the
    file's sha256.

    Strips `module.`, `backbone.` and `encoder.` prefixes, logs missing and unexpected keys, and
    fails
    on a shape mismatch naming the key.
    """
    path = local_path(uri, cache=cache)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {uri}")
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), uri)
    clean = {}
    for k, v in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p) :], True
        clean[k] = v
    own = model.state_dict()
    for k, v in clean.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"{uri}: shape mismatch for {k!r}: checkpoint {tuple(v.shape)}, "
                f"model {tuple(own[k].shape)}"
            )
    result = model.load_state_dict(clean, strict=False)
    if result.missing_keys:
        log.warning(
            "%s: %d missing keys: %s", uri, len(result.missing_keys), result.missing_keys[:10]
        )
    if result.unexpected_keys:
        log.warning(
            "%s: %d unexpected keys: %s",
            uri,
            len(result.unexpected_keys),
            result.unexpected_keys[:10],
        )
    return sha256_file(path)


class StageFeatures(nn.Module):
    """A timm CNN cut after one feature stage, average-pooled: (B, 3, H, W) -> (B, C).

    `resnet50_trunc` is ResNet-50 cut after layer3 (1024-d), the encoder CLAM uses. Its state dict
    has the full model's key names, so a standard ResNet-50 checkpoint loads (the dropped layer4
    and fc are reported as unexpected keys).
    """

    def __init__(self, arch: str, stage: int, **kwargs: Any) -> None:
        super().__init__()
        self.body = timm.create_model(
            arch, pretrained=False, features_only=True, out_indices=(stage,), **kwargs
        )
        self.num_features = int(self.body.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[0].mean((2, 3))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.body.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.body.load_state_dict(state, strict=strict, assign=assign)


# architectures that are not plain timm names
_CUSTOM = {"resnet50_trunc": ("resnet50", 3)}


def create_timm(arch: str, **kwargs: Any) -> nn.Module:
    """timm.create_model(arch, pretrained=False, num_classes=0) with clear errors."""
    try:
        if arch in _CUSTOM:
            base, stage = _CUSTOM[arch]
            return StageFeatures(base, stage, **kwargs)
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(f"encoder arch {arch!r}: {err}") from None
    except TypeError as err:
        raise ValueError(f"encoder {arch!r}: bad model_kwargs {kwargs}: {err}") from None


def build_backbone(
    spec: EncoderParams, *, warn_random: bool = True, cache: SlideCache | None = None
) -> tuple[nn.Module, str | None]:
    """A timm model with pooled-feature output; returns (model, weights sha256 or None). gs://
    weights are staged into `cache`."""
    model = create_timm(spec.arch, **spec.model_kwargs)
    sha = None
    if spec.weights:
        sha = load_weights(model, spec.weights, cache=cache)
    elif warn_random:
        log.warning(
            "encoder %s has NO pretrained weights: random initialisation (demo only)", spec.arch
        )
    return model, sha


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "out_dim", None) or model.num_features)


class PatchTransform(nn.Module):
    """uint8 (B, H, W, 3) patches -> normalised float (B, 3, S, S): optional resize, centre crop."""

    def __init__(self, spec: EncoderParams) -> None:
        super().__init__()
        self.resize = spec.resize
        self.size = spec.input_size
        self.register_buffer(
            "mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False
        )
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(
                x,
                size=(self.resize, self.resize),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        elif h > self.size or w > self.size:
            top, left = (h - self.size) // 2, (w - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class EncoderWithTransform(nn.Module):
    """uint8 patches in, features out: what extraction, serving and benchmarks run."""

    def __init__(self, encoder: nn.Module, spec: EncoderParams) -> None:
        super().__init__()
        self.transform = PatchTransform(spec)
        self.encoder = encoder

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.transform(patches))  # (B, H, W, 3) uint8 -> (B, D)

"""A variational information-bottleneck (IB) MIL head that picks each slide's top-K instances.

Model: an instance encoder (Linear(D, hidden) + ReLU) embeds every instance; a linear map gives
each instance a keep logit ``l_i``. During training, ``samples`` relaxed-Bernoulli (Concrete,
Gumbel-sigmoid) masks are drawn per bag and step::

    m_i = sigmoid((l_i + log u - log(1 - u)) / temperature),   u ~ U(0, 1)

so a low temperature gives masks close to 0/1. The masked bag is the mask-weighted mean of the
instance embeddings, and a linear bag classifier maps it to C logits. The loss is

    CE(bag logits, label)  (averaged over the mask samples)
    + beta * mean_i KL( Bernoulli(sigmoid(l_i)) || Bernoulli(prior) )

so an instance is kept only when it carries class information worth its cost against the prior
keep-rate. At evaluation no mask is sampled: the keep probability is ``sigmoid(l_i)`` and the bag
is the keep-probability-weighted mean.

The keep bias starts at 0 (keep probability 0.5, well away from the usual prior of 0.1), so
training visibly moves it. Training (`train_ib`) runs Adam over the training bags, one bag per step
in a seeded random order; it is deterministic on CPU for a seed.

Output (`write_top_k`): ``<out>/topk/<slide_id>.h5`` with datasets ``indices`` (K,) int64 (rows of
the slide's features / coords, by descending keep probability), ``coords`` (K, 2) int64 and
``keep_probability`` (K,) float32, K = min(k, N). Attributes passed as ``coords_attrs`` (e.g. those
of the slide's patches h5) are copied onto ``coords``, which makes the file itself a coords h5 that
`efcm.slides.patching.read_coords` opens, so the top-K patches can be read from the slide.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from efcm.config import IbParams
from efcm.io.checkpoints import load_module, save_module

log = logging.getLogger(__name__)

_EPS = 1e-6
_MAX_Z = 20.0


def check_bag(bag: torch.Tensor, what: str = "bag") -> None:
    if bag.ndim != 2 or bag.shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty (N, D) bag, got shape {list(bag.shape)}")


def relaxed_bernoulli(
    logits: torch.Tensor,
    temperature: float,
    samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(samples, N) Concrete / Gumbel-sigmoid masks in (0, 1] for keep logits (N,).

    The pre-sigmoid value is clipped to +-`_MAX_Z`: at a low temperature it reaches hundreds, and
    masks (and their gradients) of 1e-40 are float32 denormals that make CPU training ~100x slower.
    A mask of sigmoid(-20) = 2e-9 is as good as 0 for the pooled mean.
    """
    u = torch.rand(
        (samples, *logits.shape), generator=generator, dtype=logits.dtype, device=logits.device
    ).clamp(_EPS, 1 - _EPS)
    z = (logits + torch.log(u) - torch.log1p(-u)) / temperature
    return torch.sigmoid(z.clamp(-_MAX_Z, _MAX_Z))


def bernoulli_kl(logits: torch.Tensor, prior: float) -> torch.Tensor:
    """KL( Bernoulli(sigmoid(logits)) || Bernoulli(prior) ), elementwise, computed from logits."""
    p = torch.sigmoid(logits)
    log_p, log_q = -F.softplus(-logits), -F.softplus(logits)  # log p, log(1 - p)
    return p * (log_p - math.log(prior)) + (1 - p) * (log_q - math.log1p(-prior))


class IBHead(nn.Module):
    """forward(bag (N, D)) -> dict(logits (S, C), keep_logits (N,), masks (S, N)).

    In training mode S = `samples` sampled masks; in eval mode S = 1 and the mask is the keep
    probability.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden: int = 128,
        temperature: float = 0.1,
        samples: int = 10,
        prior: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 < prior < 1:
            raise ValueError(f"prior keep-rate must be in (0, 1), got {prior}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_dim, self.n_classes, self.hidden = in_dim, n_classes, hidden
        self.temperature, self.samples, self.prior = float(temperature), int(samples), float(prior)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.keep = nn.Linear(hidden, 1)
        nn.init.zeros_(self.keep.bias)  # keep probability starts near 0.5, away from the prior
        self.classifier = nn.Linear(hidden, n_classes)

    def config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "hidden": self.hidden,
            "temperature": self.temperature,
            "samples": self.samples,
            "prior": self.prior,
        }

    def _encode(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_bag(bag)
        h = self.encoder(bag)  # (N, D) -> (N, hidden)
        return h, self.keep(h).squeeze(-1)  # (N,) keep logits

    def keep_logits(self, bag: torch.Tensor) -> torch.Tensor:
        return self._encode(bag)[1]

    @torch.no_grad()
    def keep_probability(self, bag: torch.Tensor) -> torch.Tensor:
        """(N,) sigmoid of the keep logits: no sampling, whatever the module's mode."""
        return torch.sigmoid(self.keep_logits(bag.float()))

    def forward(
        self,
        bag: torch.Tensor,
        *,
        samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        h, logits = self._encode(bag)
        if self.training:
            masks = relaxed_bernoulli(
                logits, self.temperature, samples or self.samples, generator
            )  # (S, N)
        else:
            masks = torch.sigmoid(logits).unsqueeze(0)  # (1, N)
        pooled = masks @ h / (masks.sum(1, keepdim=True) + _EPS)  # (S, hidden)
        return {"logits": self.classifier(pooled), "keep_logits": logits, "masks": masks}

    def loss(
        self,
        bag: torch.Tensor,
        label: int,
        beta: float,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The IB objective of one bag: `loss` = `ce` + beta * `kl` (plus the `keep_logits`)."""
        out = self(bag, generator=generator)
        target = torch.full((out["logits"].shape[0],), int(label), dtype=torch.long)
        ce = F.cross_entropy(out["logits"], target)  # mean over the mask samples
        kl = bernoulli_kl(out["keep_logits"], self.prior).mean()
        return {"loss": ce + beta * kl, "ce": ce, "kl": kl, "keep_logits": out["keep_logits"]}


def build_ib(in_dim: int, n_classes: int, cfg: IbParams) -> IBHead:
    return IBHead(
        in_dim,
        n_classes,
        hidden=cfg.hidden,
        temperature=cfg.temperature,
        samples=cfg.samples,
        prior=cfg.prior,
    )


def save_ib(path: str | Path, model: IBHead, extra: dict[str, Any] | None = None) -> None:
    save_module(path, "efcm.ib/1", model, extra)


def _ib_from_config(c: dict[str, Any]) -> IBHead:
    return IBHead(
        int(c["in_dim"]),
        int(c["n_classes"]),
        hidden=int(c["hidden"]),
        temperature=float(c["temperature"]),
        samples=int(c["samples"]),
        prior=float(c["prior"]),
    )


def load_ib(path: str | Path) -> IBHead:
    return load_module(path, "efcm.ib/1", "IB", _ib_from_config)


def select_top_k(
    head: IBHead, bag: torch.Tensor, coords: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The min(k, N) instances with the highest keep probability.

    Returns:
        (indices (K,) int64 by descending keep probability, ties by index; coords (K, 2) of those).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bag = torch.as_tensor(bag)
    check_bag(bag)
    coords = np.asarray(coords).reshape(-1, 2)
    if len(coords) != len(bag):
        raise ValueError(f"bag has {len(bag)} instances but {len(coords)} coords")
    probs = head.keep_probability(bag)
    order = torch.argsort(probs, descending=True, stable=True)[:k].numpy().astype(np.int64)
    return order, coords[order]

"""Training the information-bottleneck head of ETC, and the top-K patch files it selects
(`efcm.models.ib` is the module alone)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from efcm.config import IbParams
from efcm.features import read_features
from efcm.io.files import atomic_path
from efcm.models.ib import IBHead, build_ib, check_bag, select_top_k

log = logging.getLogger(__name__)


def train_ib(
    bags: Mapping[str, torch.Tensor],
    labels: dict[str, int],
    train_ids: list[str],
    n_classes: int,
    cfg: IbParams,
    seed: int,
) -> IBHead:
    """Train an IB head on the bags of `train_ids` (Adam, `cfg.epochs` epochs); returns it in eval
    mode; `bags` may read on access (`efcm.training.mil.FeatureBags`). History (per-epoch mean
    loss, CE, KL and keep probability) is logged at debug level."""
    if not train_ids:
        raise ValueError("train_ib needs at least one training slide")
    missing = [s for s in train_ids if s not in bags or s not in labels]
    if missing:
        raise ValueError(f"no bag or label for training slides {missing[:5]}")
    for s in train_ids:
        check_bag(bags[s], f"slide {s}")
        if not 0 <= labels[s] < n_classes:
            raise ValueError(f"slide {s}: label {labels[s]} outside [0, {n_classes})")
    dims = {int(bags[s].shape[1]) for s in train_ids}
    if len(dims) != 1:
        raise ValueError(f"training bags have different feature dims {sorted(dims)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_ib(dims.pop(), n_classes, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch in tqdm(range(cfg.epochs), desc="train-ib", unit="epoch", disable=None):
        model.train()
        sums = np.zeros(4)
        for i in rng.permutation(len(train_ids)):
            s = train_ids[int(i)]
            out = model.loss(bags[s].float(), labels[s], cfg.beta, generator=gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            keep = torch.sigmoid(out["keep_logits"].detach()).mean().item()  # before the step
            sums += [out["loss"].item(), out["ce"].item(), out["kl"].item(), keep]
        m = sums / len(train_ids)
        log.debug(
            "ib epoch %d: loss %.4f ce %.4f kl %.4f keep %.3f", epoch + 1, m[0], m[1], m[2], m[3]
        )
    return model.eval()


def write_top_k(
    head: IBHead,
    slide_id: str,
    bag: torch.Tensor,
    coords: np.ndarray,
    out_dir: str | Path,
    k: int,
    coords_attrs: dict[str, Any] | None = None,
) -> Path:
    """Select the slide's top-K instances and write ``<out_dir>/topk/<slide_id>.h5`` atomically.

    Args:
        coords_attrs: attributes to copy onto the ``coords`` dataset (e.g. the patches h5's), so
            `read_coords` can open the file.
    """
    bag = torch.as_tensor(bag)
    try:
        check_bag(bag)
    except ValueError as err:
        raise ValueError(f"slide {slide_id}: {err}") from None
    indices, top_coords = select_top_k(head, bag, coords, k)
    keep = head.keep_probability(bag).numpy()[indices].astype(np.float32)
    path = Path(out_dir) / "topk" / f"{slide_id}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("indices", data=indices)
        d = f.create_dataset("coords", data=top_coords.astype(np.int64))
        d.attrs.update(coords_attrs or {})
        f.create_dataset("keep_probability", data=keep)
        f.attrs.update({"slide_id": slide_id, "k": int(k), "n_instances": len(bag)})
    os.replace(tmp, path)
    return path


def write_top_k_slides(
    head: IBHead,
    features_dir: str | Path,
    slide_ids: list[str],
    out_dir: str | Path,
    k: int,
    patches_dir: str | Path | None = None,
) -> list[Path]:
    """`write_top_k` for every slide of `features_dir`/features/<slide_id>.h5; with `patches_dir`,
    the attributes of `patches_dir`/patches/<slide_id>.h5's ``coords`` are copied (so the top-K
    file opens with `read_coords`)."""
    paths = []
    for sid in tqdm(slide_ids, desc="ib top-k", unit="slide", disable=None):
        feats, coords = read_features(Path(features_dir) / "features" / f"{sid}.h5")
        attrs: dict[str, Any] = {}
        if patches_dir is not None:
            with h5py.File(Path(patches_dir) / "patches" / f"{sid}.h5", "r") as f:
                attrs = dict(f["coords"].attrs)
        paths.append(write_top_k(head, sid, torch.from_numpy(feats), coords, out_dir, k, attrs))
    return paths


def read_top_k(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices (K,), coords (K, 2), keep_probability (K,)) from a top-K h5."""
    with h5py.File(path, "r") as f:
        missing = [d for d in ("indices", "coords", "keep_probability") if d not in f]
        if missing:
            raise ValueError(f"{path}: not a top-K h5 (missing {missing})")
        return (
            np.asarray(f["indices"][:], np.int64),
            np.asarray(f["coords"][:], np.int64).reshape(-1, 2),
            np.asarray(f["keep_probability"][:], np.float32),
        )

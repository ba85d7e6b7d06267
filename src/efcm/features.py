"""The extraction engine: coords h5 -> batches of patch pixels -> encoder -> features h5.

DataLoader workers each open their own slide handle and read whole batches; the encoder runs in
`inference_mode` with channels_last, under autocast on CUDA. The same engine extracts teacher and
student features. A rerun reuses a slide's features h5 only when it is complete and its stored
extraction settings (encoder, weights, input transform, float16, the coords it read) equal the
current ones; any other slide is redone and the log says why. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from tqdm import tqdm

from efcm.config import ExtractParams, StoreParams
from efcm.errors import InvalidInput
from efcm.io.cache import SlideCache
from efcm.io.files import atomic_path, remove_stale_parts
from efcm.io.gcs import is_gcs
from efcm.io.manifest import Manifest, SlideEntry
from efcm.io.store import (
    STORE_DIR,
    Codec,
    ShardWriter,
    fidelity_count,
    read_index,
    shard_complete,
    write_store_meta,
)
from efcm.slides.batch import ALREADY_DONE, SlideLoop
from efcm.slides.patches import SlidePatches, StorePatches, open_patches
from efcm.slides.patching import CoordsFile, made_with, parse_settings, read_coords

log = logging.getLogger(__name__)

Patches = SlidePatches | StorePatches  # where a slide's patch pixels come from

# The features h5's root attribute that holds the settings which made it (a JSON object).
SETTINGS_ATTR = "efcm_extract_settings"
_HASH_ROWS = 65536  # rows per read when hashing a features dataset (bounded memory)


class _BatchDataset(Dataset):
    """Item = a list of patch indices -> uint8 (B, S, S, 3) tensor (whole batches per read); with
    a `codec`, (that tensor, the patches encoded for the store), encoded in the DataLoader worker
    that read them."""

    def __init__(self, patches: Patches, codec: Codec | None = None) -> None:
        self.patches = patches
        self.codec = codec

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, indices: list[int]) -> torch.Tensor | tuple[torch.Tensor, list[bytes]]:
        pixels = self.patches.read_batch(indices)
        if self.codec is None:
            return torch.from_numpy(pixels)
        return torch.from_numpy(pixels), self.codec.encode_batch(pixels)


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def embed_batches(
    model: nn.Module,
    batches,
    *,
    total: int | None = None,
    desc: str = "extract",
    cpu_bf16: bool = False,
) -> np.ndarray:
    """Run `model` (uint8 patches in, features out) over an iterable of uint8 batches: under
    autocast on CUDA (bf16 where supported, else fp16), and on the CPU under bf16 autocast only
    with `cpu_bf16` (the serving runtime sets it where the package's export measured its parity).

    Returns:
        (N, D) float32.
    """
    device = device_of(model)
    out = []
    if device.type == "cuda":
        amp = True
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp, dtype = cpu_bf16, torch.bfloat16
    bar = tqdm(total=total, desc=desc, unit="patch", disable=None, leave=False)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            out.append(model(batch).float())  # stays on the device: no sync per batch
            bar.update(len(batch))
    bar.close()
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), np.float32)


class StoreTap:
    """What teacher extraction hands the patch-shard store while it reads a slide: every batch's
    encoded patches go into the slide's shard, and a few (evenly spaced) are kept encoded, to
    measure what the codec does to the features: `keep` patches, at most 5% of the slide's (at
    least one), so the check costs under 5% more forwards on any slide."""

    def __init__(self, writer: ShardWriter, n_patches: int, keep: int) -> None:
        self.writer = writer
        k = fidelity_count(keep, n_patches)
        rows = np.linspace(0, n_patches - 1, k).round().astype(int) if k else []
        self.keep = {int(r) for r in rows}
        self.kept: dict[int, bytes] = {}
        self.row = 0

    def take(self, encoded: list[bytes]) -> None:
        self.writer.add_batch(self.row, encoded)
        for k, data in enumerate(encoded):
            if self.row + k in self.keep:
                self.kept[self.row + k] = data
        self.row += len(encoded)

    def fidelity(self, model: nn.Module, feats: np.ndarray) -> dict[str, Any]:
        """{"cosine_mean", "cosine_min", "n"}: `model`'s features of the kept patches decoded
        from the shard against `feats` (the slide pixels' features, just extracted); empty when
        none were kept."""
        if not self.kept:
            return {}
        rows = sorted(self.kept)
        dec = torch.from_numpy(np.stack([Codec.decode(self.kept[r]) for r in rows]))
        b = embed_batches(model, [dec], desc="store fidelity")
        a = feats[rows]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "n": len(cos)}


def extract_slide(
    model: nn.Module,
    patches: Patches,
    params: ExtractParams,
    tap: StoreTap | None = None,
) -> np.ndarray:
    """Features of every patch of one slide, (N, D) float32. With `tap`, every patch read is
    also written, encoded with the store's codec, into the slide's shard."""
    sampler = BatchSampler(
        SequentialSampler(range(len(patches))), params.batch_size, drop_last=False
    )
    loader = DataLoader(
        _BatchDataset(patches, tap.writer.codec if tap is not None else None),
        sampler=sampler,
        batch_size=None,
        num_workers=params.num_workers,
        pin_memory=device_of(model).type == "cuda",
        persistent_workers=False,
    )

    def pixels():
        for item in loader:
            if tap is None:
                yield item
                continue
            batch, encoded = item
            tap.take(encoded)
            yield batch

    return embed_batches(model, pixels(), total=len(patches), desc=patches.coords.name)


def features_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "features" in f and "coords" in f and len(f["features"]) == len(f["coords"])
    except OSError:
        return False


def coords_identity(coords: CoordsFile) -> dict[str, Any]:
    """What extraction reads from a coords file: a sha256 of the coords (int64, little-endian),
    their number, and the read geometry (level, read size, size handed to the transform).

    Hashing the coords rather than comparing the coords file's stored patch settings also covers
    CLAM/TRIDENT files (which have none) and a grid that changed under the same settings (a
    replaced slide); it costs one read of N x 2 int64, which extraction reads anyway.
    """
    data = np.ascontiguousarray(coords.coords, dtype="<i8")
    return {
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "n": len(data),
        "patch_level": coords.patch_level,
        "read_size": coords.read_size,
        "patch_size": coords.patch_size,
    }


def extract_settings(
    attrs: dict[str, Any], params: ExtractParams, coords: CoordsFile | None = None
) -> dict[str, Any]:
    """The settings that make a slide's features: the caller's `attrs` (encoder, arch, weights
    sha256, input transform...), `float16` (the stored dtype) and `coords` (see
    `coords_identity`; None for whole images, which have none). Batch size and workers are left
    out: they do not change the features.

    Returns:
        A JSON-plain dict, equal to what the features h5 stores.
    """
    data = {**attrs, "float16": params.float16}
    if coords is not None:
        data["coords"] = coords_identity(coords)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def read_extract_settings(path: str | Path) -> dict[str, Any] | None:
    """The extraction settings stored in a features h5 (see `extract_settings`), or None for a file
    without them (another tool, or an efcm older than the attribute)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        return parse_settings(f.attrs.get(SETTINGS_ATTR), f"{path}: attribute {SETTINGS_ATTR}")


def features_identity(path: str | Path) -> dict[str, Any]:
    """What tells one features h5 from another, cheaply: the features' shape and dtype and the
    stored extraction settings (weights sha256, transform, coords sha256...), which determine the
    features without reading them. A file without stored settings (another tool, an older efcm)
    is identified by a sha256 of its features instead (read in blocks)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise InvalidInput(f"{path}: no 'features' dataset")
        d = f["features"]
        ident: dict[str, Any] = {"shape": list(d.shape), "dtype": str(d.dtype)}
        settings = parse_settings(f.attrs.get(SETTINGS_ATTR), f"{path}: attribute {SETTINGS_ATTR}")
        if settings is not None:
            ident["settings"] = settings
        else:
            h = hashlib.sha256()
            for i in range(0, len(d), _HASH_ROWS):
                h.update(np.ascontiguousarray(d[i : i + _HASH_ROWS]).tobytes())
            ident["features_sha256"] = h.hexdigest()
    return ident


def write_features(
    path: Path,
    feats: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    float16: bool = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Write a features h5 atomically: `attrs` as plain attributes (a mapping as a JSON string,
    None left out), `settings` (see `extract_settings`) as JSON in `efcm_extract_settings`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float16 if float16 else np.float32))
        f.create_dataset("coords", data=coords.astype(np.int64))
        write_attrs(f, attrs, settings)
    os.replace(tmp, path)


def write_attrs(f: h5py.File, attrs: dict[str, Any], settings: dict[str, Any] | None) -> None:
    """A features h5's root attributes: `attrs` as plain attributes (a mapping as a JSON string,
    None left out), `settings` (see `extract_settings`) as JSON in `efcm_extract_settings`."""
    f.attrs.update(
        {
            k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
            for k, v in attrs.items()
            if v is not None
        }
    )
    if settings is not None:
        f.attrs[SETTINGS_ATTR] = json.dumps(settings, sort_keys=True)


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2) int64)."""
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise InvalidInput(f"{path}: no 'features' dataset")
        return np.asarray(f["features"][:], np.float32), np.asarray(f["coords"][:], np.int64)


def _extract(
    entry: SlideEntry,
    row: dict[str, Any],
    model: nn.Module,
    base_dir: Path,
    patches_dir: Path,
    out: Path,
    params: ExtractParams,
    attrs: dict[str, Any],
    overwrite: bool,
    cache: SlideCache | None = None,
    store: StoreParams | None = None,
    read_store: Path | None = None,
) -> None:
    """Extract one slide's features, unless they can be reused (a `SlideWork`). With `store`
    (enabled), also write the slide's patch-shard store shard; with `read_store`, read the
    pixels from that store instead of the slide."""
    coords_path = patches_dir / "patches" / f"{entry.slide_id}.h5"
    dest = out / "features" / f"{entry.slide_id}.h5"
    if not coords_path.is_file():
        row.update(
            status="no_patches", reason=f"no coords file {coords_path.name} (see patch status)"
        )
        return
    coords = read_coords(coords_path)
    if len(coords.coords) == 0:
        row.update(status="no_tissue", reason="its coords file has no patches")
        return
    settings = extract_settings(attrs, params, coords)
    codec = Codec(store.format, store.quality) if store is not None else None
    store_dir = out / STORE_DIR
    if (
        not overwrite
        and features_complete(dest)
        and made_with(
            entry.slide_id, dest, "extraction", read_extract_settings, settings, "an older efcm"
        )
        and (
            codec is None
            or shard_complete(store_dir, entry.slide_id, codec, coords.coords, coords.patch_size)
        )
    ):
        with h5py.File(dest, "r") as f:
            row.update(reason=ALREADY_DONE, n_patches=len(f["features"]))
        if codec is not None:
            fidelity = read_index(store_dir, entry.slide_id).extra.get("fidelity") or {}
            row["store_cosine"] = round(fidelity["cosine_min"], 6) if fidelity else ""
        return
    sp = open_patches(entry.slide_id, entry.uri, coords, base_dir, cache, read_store)
    try:
        if codec is None:
            feats = extract_slide(model, sp, params)
        else:
            with ShardWriter(
                store_dir, entry.slide_id, coords.coords, codec, coords.patch_size, root=store.uri
            ) as w:
                tap = StoreTap(w, len(sp), store.fidelity_patches)
                feats = extract_slide(model, sp, params, tap)
                w.extra["fidelity"] = fidelity = tap.fidelity(model, feats)
            row["store_cosine"] = round(fidelity["cosine_min"], 6) if fidelity else ""
    finally:
        sp.close()
    write_features(
        dest,
        feats,
        coords.coords,
        {**attrs, "coords_file": str(coords_path.name), "slide_id": entry.slide_id},
        params.float16,
        settings,
    )
    row["n_patches"] = len(feats)


def extract_manifest(
    model: nn.Module,
    manifest: Manifest,
    patches_dir: str | Path,
    out_dir: str | Path,
    params: ExtractParams,
    attrs: dict[str, Any],
    *,
    overwrite: bool = False,
    cache: SlideCache | None = None,
    store: StoreParams | None = None,
    read_store: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Extract features for every slide with a coords h5 into out_dir/features/<slide_id>.h5 (a
    gs:// slide is staged into `cache`). With `store` (its `enabled` true), also write every
    patch into the patch-shard store out_dir/store (see `efcm.io.store`; the status gets each
    slide's `store_cosine`, the lowest feature cosine slide vs shard pixels). With `read_store`
    (a store folder), read the pixels from it: no slide is opened.

    `model` takes uint8 patches (see EncoderWithTransform). `attrs` (encoder name, weights
    hash, input transform...) go into every features h5, and with `float16` and the coords read
    they are the settings a rerun compares to reuse a slide's features (see `extract_settings`).
    Writes out_dir/status.csv.

    Raises:
        BatchFailed: an unexpected error hit most slides (see `efcm.slides.batch.SlideLoop`).
    """
    out = Path(out_dir)
    remove_stale_parts(out / "features")  # half-written files of a killed run
    columns: dict[str, Any] = {"n_patches": 0}
    if store is not None and store.enabled:
        remove_stale_parts(out / STORE_DIR)  # a shard cut off by a kill is redone, not kept
        if store.uri and not is_gcs(store.uri) and Path(store.uri).is_dir():
            remove_stale_parts(Path(store.uri))
        write_store_meta(out / STORE_DIR, Codec(store.format, store.quality))
        columns["store_cosine"] = ""
    else:
        store = None
    model.eval()
    work = partial(
        _extract,
        model=model,
        base_dir=manifest.base_dir,
        patches_dir=Path(patches_dir),
        out=out,
        params=params,
        attrs=attrs,
        overwrite=overwrite,
        cache=cache,
        store=store,
        read_store=Path(read_store) if read_store is not None else None,
    )
    loop = SlideLoop("extract", work, columns)
    return loop.run(manifest.slides, out / "status.csv")

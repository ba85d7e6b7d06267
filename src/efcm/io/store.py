"""The patch-shard store: the patch pixels of every slide, written once, read many times.

Teacher extraction reads every patch of every slide anyway; with `store.enabled` it also writes
them, encoded (JPEG, WebP or lossless PNG at `store.quality`), into one shard per slide beside the
features: `<extract out>/store/<slide_id>.tar`. Every later step that needs pixels (distillation,
ETC, student extraction, the export's parity checks) then reads the shards instead of opening
the slides: sequential reads of ~100 MB files instead of random reads into terabytes of slides.

Format. A shard is a plain POSIX tar in the WebDataset layout: one member per sample, named
`<slide_id>/<row:08d>.<ext>` (the WebDataset key is `<slide_id>/<row:08d>`, the part before the
first dot of the base name), in row order, so `webdataset.WebDataset`, `tar tf` and any tar reader
read it. `row` is the patch's row in the slide's coords file and in its teacher features h5.

Index. Beside each shard, `<slide_id>.h5` (datasets `coords` (N, 2), `row`, `offset`, `size`
(byte offset and length of each sample's data in the tar), and attributes naming the shard, its
size, the codec and the patch size): random access to any sample (ETC's top-K, the export's
parity patches) by one ranged read per run of neighbouring samples.

Where the shards go (`store.uri`). By default beside their indexes, in the extraction output's
`store/` folder. With `store.uri` a folder or a gs:// prefix, the shards go there
(`<uri>/<slide_id>.tar`) and the output keeps only the indexes (kB per slide), each naming its
shard by full path or URI: a step given the teacher features (a KFP input artifact, which the
backend copies into the pod) then receives the index, not terabytes of pixels, and reads the
samples it needs by URI: whole shards streamed (distillation), a slide's top-K by ranged reads
(ETC, the export). A gs:// shard is written locally, uploaded (an object appears whole or not at
all), and its index records the object's generation: reads fetch exactly that generation, so a
shard replaced since (another run writing to the same prefix) fails loudly instead of giving
other pixels. On KFP with a gs:// pipeline root and no `store.uri`, the extract step puts the
shards at `<its output artifact's URI>.shards/` (`shard_root`).

Atomicity. The shard is written under a temporary name and renamed (or uploaded), then the index
likewise; a shard counts as written only when its index exists and the shard has the size (and
for gs://, the generation) the index records. A killed write leaves a temporary file (removed by
the next run) and no index: the slide is redone, never half-kept.

This module knows tar, the codec and the index; `efcm.slides.patches.StorePatches` reads a
slide's patches through it with the interface of `SlidePatches`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import h5py
import numpy as np

from efcm.errors import InvalidInput
from efcm.io import gcs
from efcm.io.files import atomic_path, save_json

STORE_DIR = "store"  # the store's folder inside an extraction output folder
STORE_META = "store.json"  # the codec and what wrote the store
EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}
MAX_GAP = 1 << 20  # bytes between two samples still read by one ranged read (ETC's top-K)
MAX_GAP_REMOTE = 4 << 20  # on gs://: a GET costs ~30 ms, in which ~4 MB more would stream
REMOTE_READERS = 16  # concurrent ranged GETs of one read_rows call on gs://
T = TypeVar("T")
_END = object()


class StoreError(InvalidInput):
    """A store, shard or index is missing, incomplete, or made with other settings."""


# -- the codec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """How patch pixels are encoded: `format` jpeg | webp | png (lossless), `quality` 1..100."""

    format: str = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.format not in EXTENSIONS:
            raise ValueError(
                f"store format must be one of {sorted(EXTENSIONS)}, got {self.format!r}"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"store quality must be 1..100, got {self.quality}")

    @property
    def ext(self) -> str:
        return EXTENSIONS[self.format]

    def _flags(self) -> list[int]:
        if self.format == "jpeg":
            return [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        if self.format == "webp":
            return [cv2.IMWRITE_WEBP_QUALITY, self.quality]
        return [cv2.IMWRITE_PNG_COMPRESSION, 1]  # lossless: fast, a little larger

    def encode(self, rgb: np.ndarray) -> bytes:
        """uint8 (S, S, 3) RGB -> the encoded bytes."""
        ok, buf = cv2.imencode("." + self.ext, np.ascontiguousarray(rgb[..., ::-1]), self._flags())
        if not ok:
            raise ValueError(f"cannot encode a {rgb.shape} patch as {self.format}")
        return buf.tobytes()

    def encode_batch(self, batch: np.ndarray) -> list[bytes]:
        return [self.encode(p) for p in batch]

    @staticmethod
    def decode(data: bytes, where: str = "a store sample") -> np.ndarray:
        """Encoded bytes -> uint8 (S, S, 3) RGB."""
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise StoreError(f"{where}: not a decodable image ({len(data)} bytes)")
        return img[..., ::-1]

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "quality": self.quality}


# -- writing one slide's shard --------------------------------------------------------------------


def shard_path(store_dir: Path, slide_id: str) -> Path:
    return store_dir / f"{slide_id}.tar"


def shard_root(uri: str, artifact_uri: str | None = None) -> str:
    """Where shard tars go (`store.uri`): `uri` when set; else, for an output artifact on gs://
    (a KFP step whose pipeline root is a bucket), the sibling prefix `<artifact_uri>.shards`,
    outside the artifact, so the steps that take the features as input are given the indexes
    only; else "" (beside the indexes)."""
    if uri:
        return uri.rstrip("/")
    if artifact_uri and gcs.is_gcs(artifact_uri):
        return artifact_uri.rstrip("/") + ".shards"
    return ""


@dataclass(frozen=True)
class ShardFile:
    """Where one shard's bytes are: a local file, or a gs:// object pinned to `generation`."""

    location: str
    generation: int | None = None

    def __str__(self) -> str:
        return self.location

    @property
    def remote(self) -> bool:
        return gcs.is_gcs(self.location)

    def size(self) -> int | None:
        """Its size in bytes now; None when it is missing (or, on gs://, replaced by another
        generation)."""
        if not self.remote:
            p = Path(self.location)
            return p.stat().st_size if p.is_file() else None
        obj = gcs.lookup(self.location)
        if obj is None or (self.generation is not None and obj.generation != self.generation):
            return None
        return obj.size

    def reader(self) -> _Reader:
        return _Reader(self)

    def stream(self) -> Any:
        """A file object reading it from the start, sequentially (a local file, or a gs://
        object in 8 MB ranged GETs)."""
        if not self.remote:
            return open(self.location, "rb")
        return gcs.open_read(self.location, self.generation)


class _Reader:
    """Ranged reads of one shard: `pread` on a local file, a ranged GET on gs://. A gs:// shard
    that is gone (or replaced) is a StoreError naming it."""

    def __init__(self, shard: ShardFile) -> None:
        self.shard = shard
        self._f = None if shard.remote else open(shard.location, "rb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()

    def read(self, start: int, length: int) -> bytes:
        if self._f is not None:
            return os.pread(self._f.fileno(), length, start)
        from google.api_core import exceptions as gexc

        try:
            return gcs.read_range(self.shard.location, self.shard.generation, start, length)
        except gexc.NotFound:
            raise StoreError(_gone(self.shard)) from None


def _gone(shard: ShardFile) -> str:
    what = f"generation {shard.generation} of " if shard.generation is not None else ""
    return (
        f"{shard}: {what}the shard is gone (deleted, or replaced by another run writing to the "
        "same store.uri): rerun teacher extraction with the store enabled"
    )


def index_path(store_dir: Path, slide_id: str) -> Path:
    return store_dir / f"{slide_id}.h5"


def sample_name(slide_id: str, row: int, ext: str) -> str:
    """The tar member of one sample: `<slide_id>/<row:08d>.<ext>` (WebDataset key + extension)."""
    return f"{slide_id}/{row:08d}.{ext}"


class ShardWriter:
    """Writes one slide's shard and then its index, atomically (see the module docstring).

    Use as a context manager: `add` samples in row order; on a clean exit the shard and its
    index are renamed into place, on an exception the temporary files are removed.
    """

    def __init__(
        self,
        store_dir: Path,
        slide_id: str,
        coords: np.ndarray,
        codec: Codec,
        patch_size: int,
        extra: dict[str, Any] | None = None,
        root: str = "",
    ) -> None:
        self.store_dir, self.slide_id, self.codec = Path(store_dir), slide_id, codec
        self.root = root.rstrip("/")  # where the tar goes ("": beside the index; see shard_root)
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self.patch_size = patch_size
        self.extra = dict(extra or {})
        self.rows: list[int] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self._tmp: Path | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        local = self.root and not gcs.is_gcs(self.root)
        folder = Path(self.root) if local else self.store_dir  # a gs:// shard is uploaded
        folder.mkdir(parents=True, exist_ok=True)
        self._tmp = atomic_path(shard_path(folder, self.slide_id))
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, row: int, data: bytes) -> None:
        """One sample: the encoded patch of coords row `row`."""
        assert self._tar is not None, "ShardWriter used outside its `with` block"
        if self.rows and row <= self.rows[-1]:
            raise ValueError(f"{self.slide_id}: shard rows must increase ({self.rows[-1]}, {row})")
        info = tarfile.TarInfo(sample_name(self.slide_id, row, self.codec.ext))
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # same bytes on every run
        self._tar.addfile(info, io.BytesIO(data))
        # addfile writes a copy of `info`: the data's offset is where the padded data ends
        # minus its padded length
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.rows.append(row)
        self.offsets.append(self._tar.offset - padded)
        self.sizes.append(len(data))

    def add_batch(self, first_row: int, encoded: Iterable[bytes]) -> None:
        for k, data in enumerate(encoded):
            self.add(first_row + k, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        name = f"{self.slide_id}.tar"
        if not self.root:
            final = shard_path(self.store_dir, self.slide_id)
            os.replace(self._tmp, final)
            self._write_index(name, final.stat().st_size, None)
        elif gcs.is_gcs(self.root):
            try:
                obj = gcs.upload(self._tmp, f"{self.root}/{name}")
            finally:
                self._tmp.unlink(missing_ok=True)
            self._write_index(obj.uri, obj.size, obj.generation)
        else:
            final = Path(self.root).resolve() / name
            os.replace(self._tmp, final)
            self._write_index(str(final), final.stat().st_size, None)

    def _write_index(self, shard: str, shard_bytes: int, generation: int | None) -> None:
        path = index_path(self.store_dir, self.slide_id)
        tmp = atomic_path(path)
        rows = np.asarray(self.rows, np.int64)
        with h5py.File(tmp, "w") as f:
            f.create_dataset("row", data=rows)
            f.create_dataset("coords", data=self.coords[rows] if len(rows) else self.coords[:0])
            f.create_dataset("offset", data=np.asarray(self.offsets, np.int64))
            f.create_dataset("size", data=np.asarray(self.sizes, np.int64))
            f.attrs.update(
                {
                    "slide_id": self.slide_id,
                    "shard": shard,  # a name beside the index, or a full path / gs:// URI
                    "shard_bytes": shard_bytes,
                    "shard_generation": -1 if generation is None else generation,
                    "patch_size": self.patch_size,
                    "codec": json.dumps(self.codec.as_dict(), sort_keys=True),
                    "extra": json.dumps(self.extra, sort_keys=True),
                }
            )
        os.replace(tmp, path)


# -- the index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one slide's shard lies."""

    slide_id: str
    shard: ShardFile
    shard_bytes: int
    patch_size: int
    codec: Codec
    row: np.ndarray  # (N,) coords / teacher-features row of each sample
    coords: np.ndarray  # (N, 2) level-0 top-left
    offset: np.ndarray  # (N,) byte offset of the sample's data in the shard
    size: np.ndarray  # (N,) its length
    extra: dict[str, Any]

    def __len__(self) -> int:
        return len(self.row)

    @property
    def nbytes(self) -> int:
        return int(self.size.sum())


def read_index(store_dir: str | Path, slide_id: str, *, check: bool | None = None) -> ShardIndex:
    """The index of one slide's shard, checked against the shard (`check`; by default a local
    shard is checked, a gs:// one is not: that costs a request per slide, and an object is whole
    or absent; a read of a gs:// shard that is gone fails with a StoreError naming it).

    Raises:
        StoreError: no index, or the shard is missing or not the size the index records (a
            shard whose write was cut off, or a store copied in part).
    """
    store_dir = Path(store_dir)
    path = index_path(store_dir, slide_id)
    if not path.is_file():
        raise StoreError(f"{store_dir}: no shard index for slide {slide_id} ({path.name})")
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
        idx = ShardIndex(
            slide_id=str(a["slide_id"]),
            shard=_shard_file(store_dir, str(a["shard"]), int(a.get("shard_generation", -1))),
            shard_bytes=int(a["shard_bytes"]),
            patch_size=int(a["patch_size"]),
            codec=Codec(**json.loads(a["codec"])),
            row=np.asarray(f["row"][:], np.int64),
            coords=np.asarray(f["coords"][:], np.int64).reshape(-1, 2),
            offset=np.asarray(f["offset"][:], np.int64),
            size=np.asarray(f["size"][:], np.int64),
            extra=json.loads(a.get("extra", "{}")),
        )
    if check is False or (check is None and idx.shard.remote):
        return idx
    got = idx.shard.size()
    if got is None and idx.shard.remote:
        raise StoreError(_gone(idx.shard))
    if got != idx.shard_bytes:
        raise StoreError(
            f"{idx.shard}: the shard of slide {slide_id} is "
            + ("missing" if got is None else f"{got} bytes, its index says {idx.shard_bytes}")
            + " (rerun teacher extraction with the store enabled)"
        )
    return idx


def _shard_file(store_dir: Path, shard: str, generation: int) -> ShardFile:
    if gcs.is_gcs(shard) or os.path.isabs(shard):
        return ShardFile(shard, generation if generation >= 0 else None)
    return ShardFile(str(store_dir / shard))


def shard_complete(
    store_dir: str | Path, slide_id: str, codec: Codec, coords: np.ndarray, patch_size: int
) -> bool:
    """Whether the slide's shard is written, whole, with this codec and patch size, and holds
    every row of `coords` (a rerun reuses it only then)."""
    try:
        idx = read_index(store_dir, slide_id, check=True)
    except (StoreError, OSError, KeyError, ValueError):
        return False
    return (
        idx.codec == codec
        and idx.patch_size == patch_size
        and len(idx) == len(coords)
        and np.array_equal(idx.coords, np.asarray(coords, np.int64).reshape(-1, 2))
    )


def read_rows(idx: ShardIndex, positions: Iterable[int] | np.ndarray) -> list[bytes]:
    """The encoded samples at index `positions` (not rows: positions into the index), in the
    order given. Samples close together in the shard are read with one read (less than
    `MAX_GAP` bytes apart on a local shard, `MAX_GAP_REMOTE` on gs://, where a request costs
    tens of milliseconds): a slide's top-K costs a few reads, a whole slide one sequential pass.
    The ranged GETs of a gs:// shard run `REMOTE_READERS` at a time. A local shard is opened for
    the call (an open costs microseconds, far less than decoding one sample) and closed, so a
    stage that holds thousands of slides' readers (ETC) holds no file descriptors."""
    pos = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions)
    pos = pos.astype(np.int64).reshape(-1)
    if len(pos) == 0:
        return []
    if pos.min() < 0 or pos.max() >= len(idx):
        raise StoreError(f"{idx.shard}: sample positions out of range 0..{len(idx) - 1}")
    spans = read_spans(idx, pos, MAX_GAP_REMOTE if idx.shard.remote else MAX_GAP)
    out: list[bytes | None] = [None] * len(pos)
    with idx.shard.reader() as f:
        if idx.shard.remote and len(spans) > 1:
            bufs = list(_remote_pool().map(lambda sp: f.read(sp[0], sp[1] - sp[0]), spans))
        else:
            bufs = [f.read(start, end - start) for start, end, _ in spans]
    for (start, _, members), buf in zip(spans, bufs, strict=True):
        for j in members:
            o = int(idx.offset[pos[j]]) - start
            out[j] = buf[o : o + int(idx.size[pos[j]])]
    return out  # type: ignore[return-value]


def read_spans(idx: ShardIndex, pos: np.ndarray, max_gap: int) -> list[tuple[int, int, list[int]]]:
    """The byte ranges (start, end, the indices into `pos` they hold) that read the samples at
    index positions `pos`: samples in shard order, a new range wherever the gap to the next
    sample is over `max_gap` bytes."""
    order = np.argsort(idx.offset[pos], kind="stable")
    spans: list[tuple[int, int, list[int]]] = []
    for j in order.tolist():
        start = int(idx.offset[pos[j]])
        end = start + int(idx.size[pos[j]])
        if spans and start - spans[-1][1] <= max_gap:
            s0, e0, members = spans[-1]
            spans[-1] = (s0, max(e0, end), [*members, j])
        else:
            spans.append((start, end, [j]))
    return spans


_pool: tuple[int, Any] | None = None  # (pid, ThreadPoolExecutor) for gs:// ranged reads


def _remote_pool() -> Any:
    """One thread pool per process for ranged GETs: its threads keep their clients (and their
    connections: `efcm.io.gcs.gcs_client` is per thread) from call to call."""
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    if _pool is None or _pool[0] != os.getpid():  # a forked DataLoader worker makes its own
        _pool = (os.getpid(), ThreadPoolExecutor(REMOTE_READERS, thread_name_prefix="store-get"))
    return _pool[1]


def iter_shard(shard: ShardFile | str | Path) -> Iterator[tuple[int, bytes]]:
    """(row, encoded bytes) of every sample of a shard (a local file or a gs:// object), in file
    order, read as one stream (no seeks).

    Raises:
        StoreError: the shard is missing (or a gs:// one was replaced), or holds a member that is
            not `<slide>/<row>.<ext>`.
    """
    from google.api_core import exceptions as gexc

    shard = shard if isinstance(shard, ShardFile) else ShardFile(str(shard))
    try:
        with shard.stream() as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, _ = base.partition(".")
                if not key.isdigit():
                    raise StoreError(f"{shard}: member {member.name!r} is not <slide>/<row>.<ext>")
                data = tar.extractfile(member)
                assert data is not None
                yield int(key), data.read()
    except (FileNotFoundError, gexc.NotFound):
        raise StoreError(_gone(shard)) from None


# -- the store as a whole -------------------------------------------------------------------------


def fidelity_count(keep: int, n_patches: int) -> int:
    """How many of a slide's `n_patches` the codec's fidelity check compares: `keep`
    (`store.fidelity_patches`) but at most 5% of the slide's (at least one), so the check costs
    under 5% more forwards on any slide; 0 when `keep` is 0."""
    if keep <= 0 or n_patches <= 0:
        return 0
    return min(keep, max(1, n_patches // 20), n_patches)


def write_store_meta(store_dir: Path, codec: Codec) -> None:
    """`store.json`: the codec the store's shards are written with."""
    save_json(store_dir / STORE_META, {"codec": codec.as_dict(), "format": "webdataset-tar"})


def read_store_meta(store_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(store_dir) / STORE_META).read_text())


def store_dir_of(features_dir: str | Path) -> Path:
    """The store inside a (teacher) extraction output folder."""
    return Path(features_dir) / STORE_DIR


def has_store(features_dir: str | Path) -> bool:
    return (store_dir_of(features_dir) / STORE_META).is_file()


def require_store(features_dir: str | Path) -> Path:
    """The store folder of an extraction output, which must have one.

    Raises:
        StoreError: it has none (teacher extraction ran without `store.enabled`).
    """
    d = store_dir_of(features_dir)
    if not (d / STORE_META).is_file():
        raise StoreError(
            f"{features_dir}: no patch-shard store ({STORE_DIR}/{STORE_META}); rerun teacher "
            "extraction with store.enabled: true, or set store.enabled: false to read the slides"
        )
    return d


# -- streaming (distillation) ---------------------------------------------------------------------


def assign_shards(sizes: list[int], world: int) -> list[list[int]]:
    """Shards (by position in `sizes`, their sample counts) per rank, balanced: the largest
    shard first, each to the rank with the fewest samples so far (ties: the lowest rank), then
    the shares ordered heaviest first. Every shard goes to exactly one rank; the ranks' totals
    differ by at most the largest shard. Deterministic: the same on every rank without
    communication."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += sizes[i]
    # the heaviest share first: rank 0 (which writes checkpoints) runs out of items last
    return sorted((sorted(s) for s in out), key=lambda s: -sum(sizes[i] for i in s))


def mix(
    n_shards: int,
    open_shard: Callable[[int], Iterator[T]],
    *,
    seed: int,
    epoch: int,
    interleave: int,
    buffer: int,
) -> Iterator[T]:
    """Every item of `n_shards` shards (`open_shard(i)` streams shard i's items), each once, in
    an order mixed across slides: the shard order is shuffled by (seed, epoch), `interleave`
    shards are read at once (round robin, each as one sequential stream), and the items pass
    through a shuffle buffer of `buffer` items. The same arguments give the same order (a
    resumed epoch skips what it had done)."""
    rng = np.random.default_rng([seed, epoch])
    pending = [int(i) for i in reversed(rng.permutation(n_shards))]  # pop() takes the next
    open_: list[Iterator[T]] = []
    held: list[T] = []

    def refill() -> None:
        while len(open_) < interleave and pending:
            open_.append(open_shard(pending.pop()))

    refill()
    k = 0
    while open_:
        k %= len(open_)
        item = next(open_[k], _END)
        if item is _END:
            open_.pop(k)
            refill()
            continue
        k += 1
        if len(held) < buffer:
            held.append(item)  # type: ignore[arg-type]
            continue
        j = int(rng.integers(len(held)))
        held[j], item = item, held[j]  # type: ignore[assignment]
        yield item  # type: ignore[misc]
    for j in rng.permutation(len(held)):
        yield held[int(j)]


def stream_samples(
    shards: list[ShardFile] | list[Path],
    *,
    seed: int,
    epoch: int,
    interleave: int,
    buffer: int,
) -> Iterator[tuple[int, int, bytes]]:
    """(shard position in `shards`, row, encoded bytes) of every sample of `shards`, mixed as
    `mix` does."""

    def open_shard(i: int) -> Iterator[tuple[int, int, bytes]]:
        return ((i, row, data) for row, data in iter_shard(shards[i]))

    return mix(
        len(shards), open_shard, seed=seed, epoch=epoch, interleave=interleave, buffer=buffer
    )

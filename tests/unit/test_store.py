"""The patch-shard store (efcm.io.store): the tar layout, the index, atomic writes, the reads."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from efcm.io import store
from efcm.io.store import (
    Codec,
    ShardWriter,
    StoreError,
    assign_shards,
    iter_shard,
    read_index,
    read_rows,
    read_spans,
    shard_complete,
    shard_root,
    stream_samples,
)


def _patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random RGB patches (JPEG-friendly, like tissue), uint8 (n, size, size, 3)."""
    import cv2

    rng = np.random.default_rng(seed)
    base = rng.integers(60, 230, (n, 3, 3, 3)).astype(np.float32)
    img = np.stack([cv2.resize(b, (size, size), interpolation=cv2.INTER_CUBIC) for b in base])
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def _write(
    store: Path, slide_id: str, pixels: np.ndarray, codec: Codec, root: str = ""
) -> np.ndarray:
    coords = np.stack([np.arange(len(pixels)) * 32, np.zeros(len(pixels), np.int64)], 1)
    with ShardWriter(store, slide_id, coords, codec, pixels.shape[1], root=root) as w:
        w.add_batch(0, codec.encode_batch(pixels))
    return coords


def test_png_is_lossless_and_jpeg_is_close():
    p = _patches(4)
    png, jpeg = Codec("png"), Codec("jpeg", 90)
    assert all(np.array_equal(png.decode(png.encode(x)), x) for x in p)
    diff = [np.abs(jpeg.decode(jpeg.encode(x)).astype(int) - x).mean() for x in p]
    assert max(diff) < 3.0, diff
    with pytest.raises(ValueError, match="format"):
        Codec("gif")
    with pytest.raises(ValueError, match="quality"):
        Codec("jpeg", 0)
    with pytest.raises(StoreError, match="not a decodable image"):
        Codec.decode(b"not an image")


def test_a_shard_is_a_webdataset_tar_in_row_order(tmp_path):
    p = _patches(5)
    _write(tmp_path, "slide.a", p, Codec("png"))
    with tarfile.open(tmp_path / "slide.a.tar") as tar:
        names = tar.getnames()
    assert names == [f"slide.a/{i:08d}.png" for i in range(5)]
    # WebDataset's own reader: keys `<slide>/<row>`, the same pixels
    import webdataset as wds

    got = list(wds.WebDataset(str(tmp_path / "slide.a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"slide.a/{i:08d}" for i in range(5)]
    assert all(np.array_equal(Codec.decode(s["png"]), p[i]) for i, s in enumerate(got))


def test_the_index_reads_any_sample_as_the_stream_does(tmp_path):
    p = _patches(40)
    coords = _write(tmp_path, "s1", p, Codec("jpeg", 80))
    idx = read_index(tmp_path, "s1")
    assert len(idx) == 40 and idx.shard_bytes == (tmp_path / "s1.tar").stat().st_size
    assert np.array_equal(idx.coords, coords) and np.array_equal(idx.row, np.arange(40))
    stream = dict(iter_shard(idx.shard))
    picks = [37, 2, 2, 19, 0]
    assert read_rows(idx, picks) == [stream[i] for i in picks]
    assert read_rows(idx, []) == []
    with pytest.raises(StoreError, match="out of range"):
        read_rows(idx, [40])


def test_a_failed_write_leaves_nothing_and_a_cut_shard_is_not_complete(tmp_path):
    p = _patches(6)
    codec = Codec("png")
    coords = np.zeros((6, 2), np.int64)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "s", coords, codec, 32) as w:
        w.add_batch(0, codec.encode_batch(p[:3]))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    assert not shard_complete(tmp_path, "s", codec, coords, 32)
    coords = _write(tmp_path, "s", p, codec)
    assert shard_complete(tmp_path, "s", codec, coords, 32)
    assert not shard_complete(tmp_path, "s", Codec("jpeg"), coords, 32)  # other settings
    assert not shard_complete(tmp_path, "s", codec, coords[:5], 32)  # other coords
    shard = tmp_path / "s.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
    assert not shard_complete(tmp_path, "s", codec, coords, 32)
    with pytest.raises(StoreError, match="its index says"):
        read_index(tmp_path, "s")
    with pytest.raises(StoreError, match="no shard index for slide other"):
        read_index(tmp_path, "other")


def test_rows_must_increase(tmp_path):
    codec = Codec("png")
    with (
        pytest.raises(ValueError, match="rows must increase"),
        ShardWriter(tmp_path, "s", np.zeros((2, 2), np.int64), codec, 32) as w,
    ):
        w.add(1, codec.encode(_patches(1)[0]))
        w.add(0, codec.encode(_patches(1)[0]))


def test_assign_shards_balances_and_covers():
    sizes = [100, 5, 60, 60, 30, 1]
    parts = assign_shards(sizes, 3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)
    assert assign_shards(sizes, 1) == [list(range(len(sizes)))]
    assert assign_shards(sizes, 3) == parts  # the same on every rank
    with pytest.raises(ValueError):
        assign_shards(sizes, 0)


def test_stream_yields_every_sample_once_mixed_and_reproducibly(tmp_path):
    codec = Codec("png")
    shards = []
    for k, n in enumerate((30, 20, 25)):
        _write(tmp_path, f"s{k}", _patches(n, 8, seed=k), codec)
        shards.append(tmp_path / f"s{k}.tar")

    def run(epoch: int, buffer: int = 16) -> list[tuple[int, int]]:
        out = stream_samples(shards, seed=0, epoch=epoch, interleave=2, buffer=buffer)
        return [(i, row) for i, row, _ in out]

    first = run(0)
    assert sorted(first) == sorted((k, r) for k, n in enumerate((30, 20, 25)) for r in range(n))
    assert run(0) == first
    assert run(1) != first
    # the first samples already come from two slides, and rows are not in file order
    assert len({i for i, _ in first[:10]}) >= 2
    rows0 = [r for i, r in first if i == first[0][0]]
    assert rows0 != sorted(rows0)
    # with no buffer and one shard at a time, the stream is the shards in file order
    plain = list(stream_samples(shards, seed=0, epoch=0, interleave=1, buffer=1))
    for i in {i for i, _, _ in plain}:
        rows = [r for j, r, _ in plain if j == i]
        assert rows == sorted(rows)


def test_the_open_watcher_sees_another_process_open_a_slide(tmp_path):
    """tests/file_opens.py (used by the kfp.local store test) sees OpenSlide's open from another
    process, and nothing for a file only stat'ed."""
    import subprocess
    import sys

    from efcm.slides.synthetic import SlideSpec, write_slide
    from tests.file_opens import watch_opens

    write_slide(tmp_path / "a.tif", SlideSpec(512, 512, levels=1))
    (tmp_path / "b.tif").write_bytes(b"x")
    code = "import openslide, sys; openslide.OpenSlide(sys.argv[1]).close()"
    with watch_opens(tmp_path) as opens:
        (tmp_path / "b.tif").stat()
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.tif")], check=True)
    assert {n for _, n in opens} == {"a.tif"}


def test_shard_root_keeps_shards_out_of_a_gs_artifact():
    assert shard_root("gs://b/store/") == "gs://b/store"  # set: used as it is
    assert shard_root("/data/store", "gs://b/root/x/features") == "/data/store"
    assert shard_root("", "gs://b/root/x/features") == "gs://b/root/x/features.shards"
    assert shard_root("", "/tmp/kfp/x/features") == ""  # a local root: beside the indexes
    assert shard_root("") == ""


def test_shards_in_another_folder_leave_only_the_index_beside_it(tmp_path):
    p = _patches(12)
    codec = Codec("jpeg", 85)
    coords = _write(tmp_path / "out", "s", p, codec, root=str(tmp_path / "shards"))
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["s.h5"]
    assert sorted(f.name for f in (tmp_path / "shards").iterdir()) == ["s.tar"]
    idx = read_index(tmp_path / "out", "s")
    assert str(idx.shard) == str((tmp_path / "shards" / "s.tar").resolve())
    stream = dict(iter_shard(idx.shard))
    assert read_rows(idx, [11, 3]) == [stream[11], stream[3]]
    assert shard_complete(tmp_path / "out", "s", codec, coords, 32)
    (tmp_path / "shards" / "s.tar").unlink()
    assert not shard_complete(tmp_path / "out", "s", codec, coords, 32)
    with pytest.raises(StoreError, match="missing"):
        read_index(tmp_path / "out", "s")


def test_a_gs_store_uploads_each_shard_and_reads_it_by_ranged_gets(
    gcs_bucket, tmp_path, monkeypatch
):
    """Against the GCS emulator: the shard is an object under the prefix, the local folder keeps
    the index only, and the index's reads (ranged GETs) and the stream (chunked GETs) give the
    bytes the local store gives."""
    p = _patches(30)
    codec = Codec("jpeg", 85)
    root = gcs_bucket.uri("cohort/store")
    coords = _write(tmp_path / "remote", "s", p, codec, root=root)
    _write(tmp_path / "local", "s", p, codec)
    assert sorted(f.name for f in (tmp_path / "remote").iterdir()) == ["s.h5"]
    blob = gcs_bucket.bucket.get_blob("cohort/store/s.tar")
    local, remote = read_index(tmp_path / "local", "s"), read_index(tmp_path / "remote", "s")
    assert str(remote.shard) == f"{root}/s.tar" and remote.shard.generation == blob.generation
    assert remote.shard_bytes == blob.size == local.shard_bytes
    picks = [29, 0, 14, 15, 3]
    assert read_rows(remote, picks) == read_rows(local, picks)
    # one GET per sample, run concurrently, give the same bytes in the order asked
    monkeypatch.setattr(store, "MAX_GAP_REMOTE", -1)
    assert len(read_spans(remote, np.asarray(picks), -1)) == 5
    assert read_rows(remote, picks) == read_rows(local, picks)
    assert list(iter_shard(remote.shard)) == list(iter_shard(local.shard))
    assert shard_complete(tmp_path / "remote", "s", codec, coords, 32)
    # the object gone: not complete (a rerun redoes it), and a read names the shard
    blob.delete()
    assert not shard_complete(tmp_path / "remote", "s", codec, coords, 32)
    with pytest.raises(StoreError, match=r"s\.tar: generation \d+ of the shard is gone"):
        read_rows(remote, [1])
    with pytest.raises(StoreError, match="is gone"):
        list(iter_shard(remote.shard))
    with pytest.raises(StoreError, match="is gone"):
        read_index(tmp_path / "remote", "s", check=True)


def test_read_spans_join_samples_closer_than_the_gap(tmp_path):
    p = _patches(10)
    _write(tmp_path, "s", p, Codec("png"))
    idx = read_index(tmp_path, "s")
    pos = np.asarray([7, 1, 2, 9])
    whole = read_spans(idx, pos, 1 << 30)
    assert len(whole) == 1 and sorted(whole[0][2]) == [0, 1, 2, 3]
    assert whole[0][0] == idx.offset[1] and whole[0][1] == idx.offset[9] + idx.size[9]
    # no gap allowed: adjacent samples (1 and 2) are still apart by the next tar header
    single = read_spans(idx, pos, 0)
    assert [m for _, _, m in single] == [[1], [2], [0], [3]]  # in shard order

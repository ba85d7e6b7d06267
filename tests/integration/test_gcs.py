"""gs:// slides against a real GCS API (gcp-storage-emulator): staged once, reused by generation,
multi-file formats staged whole, failures reported."""

from __future__ import annotations

import csv
import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from efcm.config import PatchParams
from efcm.io.cache import DownloadStats, SlideCache, local_path
from efcm.io.gcs import gcs_client
from efcm.io.manifest import read_manifest
from efcm.slides.batch import patch_manifest
from efcm.slides.reader import open_slide
from efcm.slides.synthetic import SlideSpec, write_slide
from tests import gcs

pytestmark = pytest.mark.integration

P64 = PatchParams(target_mpp=1.0, patch_size=64, step=64)


def _upload_slides(bucket: gcs.Bucket, tmp_path: Path, seeds: list[int]) -> dict[str, str]:
    """Write small synthetic slides, upload them; slide_id -> gs:// URI."""
    uris = {}
    for seed in seeds:
        local = tmp_path / "src" / f"s{seed}.tif"
        write_slide(local, SlideSpec(1024, 1024, seed=seed, tumour=seed % 2 == 1))
        uris[f"s{seed}"] = bucket.upload_file(local, f"study/slides/s{seed}.tif")
    return uris


def _write_manifest(path: Path, uris: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "case_id", "uri", "label"])
        for i, (sid, uri) in enumerate(uris.items()):
            w.writerow([sid, f"c{i}", uri, "normal"])
    return path


def _coords(out: Path, slide_id: str) -> np.ndarray:
    with h5py.File(out / "patches" / f"{slide_id}.h5", "r") as f:
        return f["coords"][:]


def test_gs_slides_are_patched_and_a_second_run_downloads_nothing(gcs_cache, gcs_bucket, tmp_path):
    uris = _upload_slides(gcs_bucket, tmp_path, [1, 2, 3])
    manifest = read_manifest(_write_manifest(tmp_path / "manifest.csv", uris))
    out = tmp_path / "out"

    first = patch_manifest(manifest, out, P64, workers=1, cache=gcs_cache)
    assert [r["status"] for r in first] == ["ok"] * 3, first
    assert all(r["n_patches"] > 0 for r in first)
    staged = gcs_cache.stats
    assert staged.objects == 3 and staged.reused == 0
    assert staged.bytes == sum((tmp_path / "src" / f"{sid}.tif").stat().st_size for sid in uris)
    coords = {sid: _coords(out, sid) for sid in uris}

    again_cache = SlideCache(gcs_cache.root, gcs_cache.max_bytes)  # the same folder, new counts
    again = patch_manifest(manifest, out, P64, workers=1, overwrite=True, cache=again_cache)
    assert [r["status"] for r in again] == ["ok"] * 3
    assert all(r.get("reason") != "already done" for r in again)  # patched again, not skipped
    assert again_cache.stats == DownloadStats(objects=0, bytes=0, reused=3)
    for sid in uris:
        np.testing.assert_array_equal(_coords(out, sid), coords[sid])


def test_a_changed_object_is_downloaded_again(gcs_cache, gcs_bucket, tmp_path):
    a = tmp_path / "a.tif"
    write_slide(a, SlideSpec(1024, 1024, seed=4))
    uri = gcs_bucket.upload_file(a, "s.tif")
    first = gcs_cache.download(uri)
    assert gcs_cache.download(uri) == first
    assert gcs_cache.stats.objects == 1

    b = tmp_path / "b.tif"
    write_slide(b, SlideSpec(1024, 768, seed=5))
    gen = gcs_bucket.generation("s.tif")
    gcs_bucket.upload_file(b, "s.tif")
    assert gcs_bucket.generation("s.tif") != gen

    staged = gcs_cache.download(uri)
    assert staged == first
    assert staged.read_bytes() == b.read_bytes()
    assert gcs_cache.stats.objects == 2
    with open_slide(uri, cache=gcs_cache) as slide:
        assert slide.dimensions == (1024, 768)


def test_a_missing_object_is_a_missing_status_row_naming_the_uri(gcs_cache, gcs_bucket, tmp_path):
    uris = _upload_slides(gcs_bucket, tmp_path, [7])
    uris["gone"] = gcs_bucket.uri("study/slides/gone.tif")
    manifest = read_manifest(_write_manifest(tmp_path / "manifest.csv", uris))

    rows = {
        r["slide_id"]: r for r in patch_manifest(manifest, tmp_path / "out", P64, cache=gcs_cache)
    }
    assert rows["s7"]["status"] == "ok"
    assert rows["gone"]["status"] == "missing"
    assert uris["gone"] in rows["gone"]["reason"]
    with pytest.raises(FileNotFoundError, match=re.escape(uris["gone"])):
        gcs_cache.download(uris["gone"])
    with pytest.raises(FileNotFoundError, match=re.escape("gs://no-such-bucket-efcm/x.tif")):
        gcs_cache.download("gs://no-such-bucket-efcm/x.tif")


@pytest.mark.parametrize("uri", ["gs://", "gs://bucket-only", "gs://bucket/", "gs://b/a/../x.tif"])
def test_a_bad_uri_is_a_value_error_naming_it(uri, tmp_path):
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        SlideCache(tmp_path, 1 << 20).download(uri)


def test_a_gs_uri_without_a_cache_is_a_value_error_naming_it(tmp_path):
    uri = "gs://bucket/slide.svs"
    with pytest.raises(ValueError, match=re.escape(uri) + ".*slide cache, and none was given"):
        local_path(uri)
    with pytest.raises(ValueError, match=re.escape(uri)):
        open_slide(uri)
    # a local path needs none
    (tmp_path / "a.svs").write_bytes(b"x")
    assert local_path("a.svs", base_dir=tmp_path) == tmp_path / "a.svs"


def test_an_mrxs_slide_is_staged_with_its_data_folder(gcs_cache, gcs_bucket, tmp_path):
    files = {
        "scans/x.mrxs": b"mrxs header",
        "scans/x/Slidedat.ini": b"[GENERAL]",
        "scans/x/Index.dat": b"index",
        "scans/x/Data0000.dat": b"data" * 1000,
        "scans/x2/Data0000.dat": b"another slide",  # shares the name prefix: not staged
        "scans/xy.mrxs": b"another slide",
    }
    for name, data in files.items():
        gcs_bucket.upload_bytes(data, name)

    path = gcs_cache.download(gcs_bucket.uri("scans/x.mrxs"))
    assert path.name == "x.mrxs" and path.read_bytes() == b"mrxs header"
    assert sorted(p.name for p in (path.parent / "x").iterdir()) == [
        "Data0000.dat",
        "Index.dat",
        "Slidedat.ini",
    ]
    assert (path.parent / "x" / "Data0000.dat").read_bytes() == files["scans/x/Data0000.dat"]
    assert not (path.parent / "x2").exists() and not (path.parent / "xy.mrxs").exists()
    assert gcs_cache.stats.objects == 4

    assert gcs_cache.download(gcs_bucket.uri("scans/x.mrxs")) == path
    assert gcs_cache.stats.objects == 4  # nothing new

    gcs_bucket.delete("scans/x/Index.dat")
    gcs_bucket.delete("scans/x/Slidedat.ini")
    gcs_bucket.delete("scans/x/Data0000.dat")
    with pytest.raises(FileNotFoundError, match="data folder"):
        gcs_cache.download(gcs_bucket.uri("scans/x.mrxs"))


def test_a_dicom_series_folder_is_staged_whole(gcs_cache, gcs_bucket):
    series = {f"series/level{i}.dcm": bytes([i]) * (100 + i) for i in range(3)}
    series["series/label.dcm"] = b"label"
    for name, data in series.items():
        gcs_bucket.upload_bytes(data, name)
    gcs_bucket.upload_bytes(b"other series", "series2/a.dcm")

    folder = gcs_cache.download(gcs_bucket.uri("series/"))
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(n).name for n in series)
    assert not (folder.parent / "series2").exists()
    assert gcs_cache.stats.objects == 4

    # OpenSlide opens a series by any one of its files: local_path gives one .dcm of the folder
    opened = local_path(gcs_bucket.uri("series/"), cache=gcs_cache)
    assert opened.parent == folder and opened.suffix == ".dcm"
    # no slash: found as a folder
    assert local_path(gcs_bucket.uri("series"), cache=gcs_cache) == opened
    assert gcs_cache.stats.objects == 4

    gcs_bucket.delete("series/label.dcm")  # a staged folder never keeps a file that is gone
    gcs_cache.download(gcs_bucket.uri("series/"))
    assert not (folder / "label.dcm").exists()
    assert len(list(folder.iterdir())) == 3

    # a folder made in the console has a zero-byte placeholder object "<folder>/": skipped
    gcs_bucket.upload_bytes(b"", "made/")
    gcs_bucket.upload_bytes(b"dcm", "made/only.dcm")
    assert local_path(gcs_bucket.uri("made"), cache=gcs_cache).name == "only.dcm"

    empty = gcs_bucket.uri("empty/")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no objects under {empty}")):
        gcs_cache.download(empty)


def test_an_interrupted_download_never_looks_complete(gcs_cache, gcs_bucket, monkeypatch):
    from google.cloud.storage import Blob

    uri = gcs_bucket.upload_bytes(b"0123456789" * 1000, "big.bin")
    real = Blob.download_to_filename

    def killed(self, filename, **kwargs):
        Path(filename).write_bytes(b"01234")  # half the bytes, then the worker dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Blob, "download_to_filename", killed)
    with pytest.raises(KeyboardInterrupt):
        gcs_cache.download(uri)
    cache = gcs_cache.root
    assert not (cache / "gcs" / gcs_bucket.name / "big.bin").exists()
    assert not list(cache.rglob("*.part"))

    # a worker killed outright (SIGKILL) leaves its temp file: the next stager removes it
    stale = cache / "gcs-meta" / gcs_bucket.name / "big.bin.4242.0badcafe.part"
    stale.write_bytes(b"0123")
    monkeypatch.setattr(Blob, "download_to_filename", real)
    assert gcs_cache.download(uri).read_bytes() == b"0123456789" * 1000
    assert gcs_cache.stats.objects == 1
    assert not stale.exists()


def test_concurrent_workers_download_an_object_once(gcs_cache, gcs_bucket):
    data = np.random.default_rng(0).bytes(2_000_000)
    uri = gcs_bucket.upload_bytes(data, "shared.bin")
    paths, errors = [], []

    def stage():
        try:
            paths.append(gcs_cache.download(uri))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(set(paths)) == 1
    assert paths[0].read_bytes() == data
    assert gcs_cache.stats == DownloadStats(objects=1, bytes=len(data), reused=3)


def test_each_thread_has_its_own_client(gcs_bucket):
    clients = {}

    def take(i: int) -> None:
        clients[i] = (gcs_client(), gcs_client())

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    (a1, a2), (b1, b2) = clients[0], clients[1]
    assert a1 is a2 and b1 is b2  # one per thread, reused
    assert a1 is not b1
    assert gcs_client() is not a1


def test_worker_processes_staging_the_same_slide_agree(gcs_cache, gcs_bucket, tmp_path):
    uri = _upload_slides(gcs_bucket, tmp_path, [8])["s8"]
    manifest = read_manifest(_write_manifest(tmp_path / "m.csv", {"a": uri, "b": uri, "c": uri}))
    rows = patch_manifest(manifest, tmp_path / "out", P64, workers=2, cache=gcs_cache)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert len({r["n_patches"] for r in rows}) == 1
    staged = gcs_cache.root / "gcs" / gcs_bucket.name / "study/slides/s8.tif"
    assert staged.read_bytes() == (tmp_path / "src" / "s8.tif").read_bytes()


def test_transient_errors_are_retried(gcs_emulator, gcs_cache, gcs_bucket, monkeypatch):
    uri = gcs_bucket.upload_bytes(b"payload" * 100, "flaky.bin")
    failed = []

    def first_of_each_kind(method: str, path: str) -> bool:
        kind = "media" if "alt=media" in path else "metadata"
        if kind in failed:
            return False
        failed.append(kind)
        return True

    with gcs.flaky_proxy(gcs_emulator, first_of_each_kind) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        assert gcs_cache.download(uri).read_bytes() == b"payload" * 100
    assert failed == ["metadata", "media"]
    media = [p for _, p in proxy.seen if "alt=media" in p]
    assert len(media) == 2  # the 503, then the retry


def test_a_real_dicom_series_opens_from_its_gs_folder(gcs_cache, gcs_bucket, shared_data):
    dcm = shared_data / "wsi" / "multiframe_camelyon_challenge_image.dcm"
    gcs_bucket.upload_file(dcm, "dicom/case1/level0.dcm")
    with open_slide(gcs_bucket.uri("dicom/case1/"), cache=gcs_cache) as slide:
        assert slide.properties["openslide.vendor"] == "dicom"
        assert slide.dimensions == (1152, 700)


def test_a_current_object_costs_one_metadata_request(
    gcs_emulator, gcs_cache, gcs_bucket, monkeypatch
):
    uri = gcs_bucket.upload_bytes(b"slide" * 1000, "one.tif")
    with gcs.flaky_proxy(gcs_emulator, lambda method, path: False) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        gcs_cache.download(uri)
        proxy.seen.clear()
        gcs_cache.download(uri)
    assert [m for m, _ in proxy.seen] == ["GET"]
    assert "alt=media" not in proxy.seen[0][1]


def _staged_before(cache: SlideCache, bucket: str, name: str, size: int, age: float) -> None:
    """An object the cache staged `age` seconds ago (its bytes, record and use mark)."""
    import json
    import os
    import time

    data = cache.root / "gcs" / bucket / name
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(b"x" * size)
    meta = cache.root / "gcs-meta" / bucket / f"{name}.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"generation": 1, "size": size, "mtime_ns": 0}))
    use = cache.root / "gcs-meta" / bucket / f"{name}.use"
    use.touch()
    t = time.time() - age
    os.utime(use, (t, t))


def test_staging_makes_room_for_a_download_before_it_starts(
    gcs_emulator, gcs_bucket, tmp_path, monkeypatch
):
    import fcntl

    cache = SlideCache(tmp_path / "capped", 300)
    for name, age in (("old.svs", 30), ("mid.svs", 20), ("new.svs", 10)):
        _staged_before(cache, gcs_bucket.name, name, 100, age)
    uri = gcs_bucket.upload_bytes(b"y" * 100, "incoming.svs")
    at_download: list[tuple[int, list[str]]] = []

    def observe(method: str, path: str) -> bool:  # the cache, as the first byte is asked for
        if "alt=media" in path:
            files = sorted(p.name for p in (cache.root / "gcs" / gcs_bucket.name).iterdir())
            at_download.append((cache.size(), files))
        return False

    with gcs.flaky_proxy(gcs_emulator, observe) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        held = cache.root / "gcs-meta" / gcs_bucket.name / "old.svs.use"
        with open(held, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)  # a request is reading the oldest slide
            with cache.staged(uri) as s:
                assert s.downloaded_bytes == 100
                assert s.path.read_bytes() == b"y" * 100
    # cap minus the incoming size, before a byte moved: mid went; old was in use
    assert at_download == [(200, ["new.svs", "old.svs"])]
    assert cache.size() == 300
    assert cache.stats == DownloadStats(objects=1, bytes=100, reused=0)


def test_a_slide_in_use_is_never_evicted_and_an_evicted_one_comes_back(gcs_bucket, tmp_path):
    a = gcs_bucket.upload_bytes(b"a" * 100, "a.svs")
    b = gcs_bucket.upload_bytes(b"b" * 100, "b.svs")
    cache = SlideCache(tmp_path / "capped", 150)  # room for one slide
    with cache.staged(a) as sa, cache.staged(b) as sb:
        assert sa.path.read_bytes() == b"a" * 100  # a stays while its block runs
        assert sb.path.read_bytes() == b"b" * 100
        assert cache.size() == 200  # over the cap while both are in use
    with cache.staged(a) as again:  # b is the least recently used now, and free
        assert again.downloaded_bytes == 0
    assert cache.size() == 100
    assert not sb.path.exists()
    with cache.staged(b) as back:
        assert back.downloaded_bytes == 100 and back.path.read_bytes() == b"b" * 100
    assert cache.stats == DownloadStats(objects=3, bytes=300, reused=1)

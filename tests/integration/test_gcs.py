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
from efcm.io import gcs as storage
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


def test_gs_slides_are_patched_and_a_second_run_downloads_nothing(gcs_bucket, tmp_path):
    uris = _upload_slides(gcs_bucket, tmp_path, [1, 2, 3])
    manifest = read_manifest(_write_manifest(tmp_path / "manifest.csv", uris))
    out = tmp_path / "out"

    first = patch_manifest(manifest, out, P64, workers=1)
    assert [r["status"] for r in first] == ["ok"] * 3, first
    assert all(r["n_patches"] > 0 for r in first)
    staged = storage.download_stats()
    assert staged.objects == 3 and staged.reused == 0
    assert staged.bytes == sum((tmp_path / "src" / f"{sid}.tif").stat().st_size for sid in uris)
    coords = {sid: _coords(out, sid) for sid in uris}

    storage.reset_download_stats()
    again = patch_manifest(manifest, out, P64, workers=1, overwrite=True)
    assert [r["status"] for r in again] == ["ok"] * 3
    assert all(r.get("reason") != "already done" for r in again)  # patched again, not skipped
    assert storage.download_stats() == storage.DownloadStats(objects=0, bytes=0, reused=3)
    for sid in uris:
        np.testing.assert_array_equal(_coords(out, sid), coords[sid])


def test_a_changed_object_is_downloaded_again(gcs_bucket, tmp_path):
    a = tmp_path / "a.tif"
    write_slide(a, SlideSpec(1024, 1024, seed=4))
    uri = gcs_bucket.upload_file(a, "s.tif")
    first = storage.download(uri)
    assert storage.download(uri) == first
    assert storage.download_stats().objects == 1

    b = tmp_path / "b.tif"
    write_slide(b, SlideSpec(1024, 768, seed=5))
    gen = gcs_bucket.generation("s.tif")
    gcs_bucket.upload_file(b, "s.tif")
    assert gcs_bucket.generation("s.tif") != gen

    staged = storage.download(uri)
    assert staged == first
    assert staged.read_bytes() == b.read_bytes()
    assert storage.download_stats().objects == 2
    with open_slide(uri) as slide:
        assert slide.dimensions == (1024, 768)


def test_a_missing_object_is_a_missing_status_row_naming_the_uri(gcs_bucket, tmp_path):
    uris = _upload_slides(gcs_bucket, tmp_path, [7])
    uris["gone"] = gcs_bucket.uri("study/slides/gone.tif")
    manifest = read_manifest(_write_manifest(tmp_path / "manifest.csv", uris))

    rows = {r["slide_id"]: r for r in patch_manifest(manifest, tmp_path / "out", P64)}
    assert rows["s7"]["status"] == "ok"
    assert rows["gone"]["status"] == "missing"
    assert uris["gone"] in rows["gone"]["reason"]
    with pytest.raises(FileNotFoundError, match=re.escape(uris["gone"])):
        storage.download(uris["gone"])
    with pytest.raises(FileNotFoundError, match=re.escape("gs://no-such-bucket-efcm/x.tif")):
        storage.download("gs://no-such-bucket-efcm/x.tif")


@pytest.mark.parametrize("uri", ["gs://", "gs://bucket-only", "gs://bucket/", "gs://b/a/../x.tif"])
def test_a_bad_uri_is_a_value_error_naming_it(uri):
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        storage.download(uri)


def test_an_mrxs_slide_is_staged_with_its_data_folder(gcs_bucket, tmp_path):
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

    path = storage.download(gcs_bucket.uri("scans/x.mrxs"))
    assert path.name == "x.mrxs" and path.read_bytes() == b"mrxs header"
    assert sorted(p.name for p in (path.parent / "x").iterdir()) == [
        "Data0000.dat",
        "Index.dat",
        "Slidedat.ini",
    ]
    assert (path.parent / "x" / "Data0000.dat").read_bytes() == files["scans/x/Data0000.dat"]
    assert not (path.parent / "x2").exists() and not (path.parent / "xy.mrxs").exists()
    assert storage.download_stats().objects == 4

    assert storage.download(gcs_bucket.uri("scans/x.mrxs")) == path
    assert storage.download_stats().objects == 4  # nothing new

    gcs_bucket.delete("scans/x/Index.dat")
    gcs_bucket.delete("scans/x/Slidedat.ini")
    gcs_bucket.delete("scans/x/Data0000.dat")
    with pytest.raises(FileNotFoundError, match="data folder"):
        storage.download(gcs_bucket.uri("scans/x.mrxs"))


def test_a_dicom_series_folder_is_staged_whole(gcs_bucket):
    series = {f"series/level{i}.dcm": bytes([i]) * (100 + i) for i in range(3)}
    series["series/label.dcm"] = b"label"
    for name, data in series.items():
        gcs_bucket.upload_bytes(data, name)
    gcs_bucket.upload_bytes(b"other series", "series2/a.dcm")

    folder = storage.download(gcs_bucket.uri("series/"))
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(n).name for n in series)
    assert not (folder.parent / "series2").exists()
    assert storage.download_stats().objects == 4

    # OpenSlide opens a series by any one of its files: local_path gives one .dcm of the folder
    opened = storage.local_path(gcs_bucket.uri("series/"))
    assert opened.parent == folder and opened.suffix == ".dcm"
    assert storage.local_path(gcs_bucket.uri("series")) == opened  # no slash: found as a folder
    assert storage.download_stats().objects == 4

    gcs_bucket.delete("series/label.dcm")  # a staged folder never keeps a file that is gone
    storage.download(gcs_bucket.uri("series/"))
    assert not (folder / "label.dcm").exists()
    assert len(list(folder.iterdir())) == 3

    # a folder made in the console has a zero-byte placeholder object "<folder>/": skipped
    gcs_bucket.upload_bytes(b"", "made/")
    gcs_bucket.upload_bytes(b"dcm", "made/only.dcm")
    assert storage.local_path(gcs_bucket.uri("made")).name == "only.dcm"

    empty = gcs_bucket.uri("empty/")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no objects under {empty}")):
        storage.download(empty)


def test_an_interrupted_download_never_looks_complete(gcs_bucket, monkeypatch):
    from google.cloud.storage import Blob

    uri = gcs_bucket.upload_bytes(b"0123456789" * 1000, "big.bin")
    real = Blob.download_to_filename

    def killed(self, filename, **kwargs):
        Path(filename).write_bytes(b"01234")  # half the bytes, then the worker dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Blob, "download_to_filename", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.download(uri)
    cache = storage.cache_dir()
    assert not (cache / "gcs" / gcs_bucket.name / "big.bin").exists()
    assert not list(cache.rglob("*.part"))

    # a worker killed outright (SIGKILL) leaves its temp file: the next stager removes it
    stale = cache / "gcs-meta" / gcs_bucket.name / "big.bin.4242.0badcafe.part"
    stale.write_bytes(b"0123")
    monkeypatch.setattr(Blob, "download_to_filename", real)
    assert storage.download(uri).read_bytes() == b"0123456789" * 1000
    assert storage.download_stats().objects == 1
    assert not stale.exists()


def test_concurrent_workers_download_an_object_once(gcs_bucket):
    data = np.random.default_rng(0).bytes(2_000_000)
    uri = gcs_bucket.upload_bytes(data, "shared.bin")
    paths, errors = [], []

    def stage():
        try:
            paths.append(storage.download(uri))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(set(paths)) == 1
    assert paths[0].read_bytes() == data
    assert storage.download_stats() == storage.DownloadStats(objects=1, bytes=len(data), reused=3)


def test_worker_processes_staging_the_same_slide_agree(gcs_bucket, tmp_path):
    uri = _upload_slides(gcs_bucket, tmp_path, [8])["s8"]
    manifest = read_manifest(_write_manifest(tmp_path / "m.csv", {"a": uri, "b": uri, "c": uri}))
    rows = patch_manifest(manifest, tmp_path / "out", P64, workers=2)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert len({r["n_patches"] for r in rows}) == 1
    staged = storage.cache_dir() / "gcs" / gcs_bucket.name / "study/slides/s8.tif"
    assert staged.read_bytes() == (tmp_path / "src" / "s8.tif").read_bytes()


def test_transient_errors_are_retried(gcs_emulator, gcs_bucket, monkeypatch):
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
        assert storage.download(uri).read_bytes() == b"payload" * 100
    assert failed == ["metadata", "media"]
    media = [p for _, p in proxy.seen if "alt=media" in p]
    assert len(media) == 2  # the 503, then the retry


def test_a_real_dicom_series_opens_from_its_gs_folder(gcs_bucket, shared_data):
    dcm = shared_data / "wsi" / "multiframe_camelyon_challenge_image.dcm"
    gcs_bucket.upload_file(dcm, "dicom/case1/level0.dcm")
    with open_slide(gcs_bucket.uri("dicom/case1/")) as slide:
        assert slide.properties["openslide.vendor"] == "dicom"
        assert slide.dimensions == (1152, 700)


def test_a_current_object_costs_one_metadata_request(gcs_emulator, gcs_bucket, monkeypatch):
    uri = gcs_bucket.upload_bytes(b"slide" * 1000, "one.tif")
    with gcs.flaky_proxy(gcs_emulator, lambda method, path: False) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        storage.download(uri)
        proxy.seen.clear()
        storage.download(uri)
    assert [m for m, _ in proxy.seen] == ["GET"]
    assert "alt=media" not in proxy.seen[0][1]

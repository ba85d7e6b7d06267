"""The DVC-versioned dataset against a real GCS API (gcp-storage-emulator) and a real git + DVC
repository: `dvc push` the demo manifest and slides to a gs:// remote, then `resolve_dataset` (the
KFP component) reads a revision back from the remote alone (the repository's DVC cache is deleted
first) and records its commit and md5."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import dsl

import components as c
from efcm.io.dataset import DatasetError
from efcm.io.manifest import read_manifest
from efcm.slides.reader import open_slide

pytestmark = pytest.mark.integration

CLASSES = ["normal", "tumour"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def _dvc(repo: Path, *args: str) -> str:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(dvc), *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def _resolve(repo: Path, revision: str, path: str, out: Path) -> dsl.Dataset:
    """The resolve_dataset component (its DVC adapter + efcm.io.dataset) at `revision`."""
    art = dsl.Dataset(uri=str(out))
    c.resolve_dataset.python_func(
        repo_url=str(repo),
        revision=revision,
        manifest_path=path,
        version=revision,
        dataset={"classes": CLASSES},
        manifest=art,
    )
    return art


def _md5_in_dvc_file(path: Path) -> str:
    (out,) = yaml.safe_load(path.read_text())["outs"]
    return out["md5"]


@pytest.fixture
def data_repo(tmp_path, gcs_bucket, gcs_emulator, tiny_dataset):
    """A git repo whose data/ (the tiny demo manifest + slides) is tracked by DVC and pushed to
    gs://<bucket>/dvc; two commits: v1 with 6 slides, v2 without the last one."""
    repo = tmp_path / "data-repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "ci@efcm.invalid")
    _git(repo, "config", "user.name", "efcm ci")
    _dvc(repo, "init", "-q")
    _dvc(repo, "remote", "add", "-d", "store", f"gs://{gcs_bucket.name}/dvc")
    _dvc(repo, "remote", "modify", "store", "endpointurl", gcs_emulator.url)
    shutil.copytree(tiny_dataset.parent / "slides", repo / "data" / "slides")
    shutil.copyfile(tiny_dataset, repo / "data" / "manifest.csv")
    _dvc(repo, "add", "data/manifest.csv", "data/slides")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "v1: 6 slides")
    _dvc(repo, "push", "-q")
    v1 = _git(repo, "rev-parse", "HEAD"), _md5_in_dvc_file(repo / "data" / "manifest.csv.dvc")

    lines = (repo / "data" / "manifest.csv").read_text().splitlines(keepends=True)
    (repo / "data" / "manifest.csv").write_text("".join(lines[:-1]))
    _dvc(repo, "add", "data/manifest.csv")
    _git(repo, "commit", "-qam", "v2: 5 slides")
    _dvc(repo, "push", "-q")
    v2 = _git(repo, "rev-parse", "HEAD"), _md5_in_dvc_file(repo / "data" / "manifest.csv.dvc")

    shutil.rmtree(repo / ".dvc" / "cache")  # from here on, data comes from the gs:// remote only
    return repo, v1, v2


def test_resolve_dataset_reads_a_revision_from_the_gcs_remote(
    data_repo, tmp_path, tiny_dataset, gcs_cache, gcs_bucket
):
    repo, (rev1, md5_1), (rev2, md5_2) = data_repo
    assert md5_1 == hashlib.md5(tiny_dataset.read_bytes()).hexdigest()

    # resolve_version: a branch is resolved to the commit it points at now
    assert (
        c.resolve_version.python_func(
            repo_url=str(repo), revision="main", manifest_path="data/manifest.csv"
        )
        == rev2
    )

    # resolve_dataset at the first commit: that manifest, with its DVC md5 and revision
    out = dsl.Dataset(uri=str(tmp_path / "resolve-dataset" / "manifest"))
    c.resolve_dataset.python_func(
        repo_url=str(repo),
        revision="v1-by-sha",
        manifest_path="data/manifest.csv",
        version=rev1,
        dataset={"classes": CLASSES},
        manifest=out,
    )
    assert out.metadata["commit"] == rev1
    assert out.metadata["revision"] == "v1-by-sha"
    assert out.metadata["md5"] == md5_1
    assert out.metadata["dvc_tracked"] is True
    assert out.metadata["slides"] == 6
    slides = read_manifest(out.path).slides
    original = read_manifest(tiny_dataset).slides
    assert [s.slide_id for s in slides] == [s.slide_id for s in original]
    assert [s.label for s in slides] == [s.label for s in original]
    # every slide is referenced in the DVC remote by URI, content-addressed, and reads back
    for s, o in zip(slides, original, strict=True):
        digest = hashlib.md5((tiny_dataset.parent / o.uri).read_bytes()).hexdigest()
        assert s.uri == f"gs://{gcs_bucket.name}/dvc/files/md5/{digest[:2]}/{digest[2:]}"
    with open_slide(slides[0].uri, cache=gcs_cache) as slide:
        assert slide.dimensions[0] > 0
    assert gcs_cache.stats.objects == 1

    # the second commit: one slide fewer, another md5
    meta = _resolve(repo, rev2, "data/manifest.csv", tmp_path / "v2.csv").metadata
    assert (meta["commit"], meta["md5"], meta["slides"]) == (rev2, md5_2, 5)


def test_resolve_dataset_names_what_is_wrong(data_repo, tmp_path):
    repo, (rev1, _), _ = data_repo
    with pytest.raises(DatasetError, match="no such manifest"):
        _resolve(repo, rev1, "data/absent.csv", tmp_path / "m.csv")
    with pytest.raises(DatasetError, match=r"cannot open .* at revision 'no-such-branch'"):
        _resolve(repo, "no-such-branch", "data/manifest.csv", tmp_path / "m.csv")
    # a manifest (in git) naming a slide DVC does not track
    (repo / "extra").mkdir()
    (repo / "extra" / "manifest.csv").write_text(
        "slide_id,case_id,uri,label\ns1,c1,../data/slides/missing.tif,normal\n"
    )
    _git(repo, "add", "extra")
    _git(repo, "commit", "-qm", "a manifest with a missing slide")
    with pytest.raises(DatasetError, match=r"slide s1 \(../data/slides/missing.tif\) is not in"):
        _resolve(repo, "main", "extra/manifest.csv", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_a_slide_dvc_cannot_look_up_is_an_error_naming_where_not_untracked(
    data_repo, tmp_path, tiny_dataset, gcs_bucket
):
    repo, _, _ = data_repo
    slide = read_manifest(tiny_dataset).slides[0]
    (repo / "extra").mkdir()
    (repo / "extra" / "manifest.csv").write_text(
        f"slide_id,case_id,uri,label\n{slide.slide_id},c1,../data/{slide.uri},normal\n"
    )
    _git(repo, "add", "extra")
    _git(repo, "commit", "-qm", "a manifest in git naming a DVC-tracked slide")
    # the remote can no longer give the listing of data/slides (as when the credentials or the
    # network fail): DVC cannot tell whether it tracks the slide
    for blob in gcs_bucket.client.list_blobs(gcs_bucket.name):
        if blob.name.endswith(".dir"):
            blob.delete()
    with pytest.raises(DatasetError) as err:
        _resolve(repo, "main", "extra/manifest.csv", tmp_path / "m.csv")
    msg = str(err.value)
    assert str(repo) in msg and "revision 'main'" in msg and f"'data/{slide.uri}'" in msg
    assert "DataIndexDirError" in msg
    assert "not tracked" not in msg and "not in the repository" not in msg
    assert not (tmp_path / "m.csv").exists()

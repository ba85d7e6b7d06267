"""resolve_version + resolve_dataset: the DVC-versioned slide manifest at one git revision (CPU).

`resolve_version` runs uncached and turns the revision asked for (a branch, a tag, a commit) into
the commit it names now; `resolve_dataset` is cached on that commit, so a run on `main` picks up
new data while a rerun of the same commit reuses every cached step after it. These two adapters
are where the DVC API is called (the core, `efcm.io.dataset`, never imports DVC).
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_version(repo_url: str, revision: str, manifest_path: str) -> str:
    """The commit `revision` names in `repo_url` now (or, with no repository, the md5 of the
    manifest at `manifest_path`)."""
    from dvc.repo import Repo

    from efcm.io.cache import SlideCache
    from efcm.io.dataset import manifest_md5, open_error

    if not repo_url:
        return manifest_md5(manifest_path, cache=SlideCache.from_env())
    try:
        with Repo.open(repo_url, rev=revision or None, uninitialized=True) as repo:
            return repo.scm.resolve_rev(revision or "HEAD")
    except Exception as err:  # clone failures, unknown revisions, ...: one message naming both
        raise open_error(repo_url, revision, err) from None


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_dataset(
    repo_url: str,
    revision: str,
    manifest_path: str,
    version: str,
    dataset: dict,
    manifest: Output[Dataset],
):
    """The manifest at `version` (the commit of `revision`) with every DVC-tracked slide URI
    resolved to its gs:// object in the DVC remote; its metadata records the repository, the
    revision asked for, the commit and the manifest's DVC md5. With `repo_url` empty,
    `manifest_path` is a plain manifest (local path or gs:// URI)."""
    from pathlib import Path

    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo
    from dvc_data.index import StorageKeyError

    from efcm import config
    from efcm.io.cache import SlideCache
    from efcm.io.dataset import DatasetError, open_error
    from efcm.io.dataset import resolve_dataset as run

    params = config.params_for_stage("resolve_dataset", {"dataset": dataset})

    class DvcRepo:
        """`efcm.io.dataset.VersionedRepo` over `dvc.repo.Repo` at one commit."""

        def __init__(self, repo: Repo, url: str, commit: str) -> None:
            self.repo, self.url, self.commit = repo, url, commit

        def is_file(self, path: str) -> bool:
            return self.repo.dvcfs.isfile(path)

        def fetch(self, path: str, dest: Path) -> None:
            self.repo.dvcfs.get_file(path, str(dest))

        def md5(self, path: str) -> str | None:
            info = self.repo.dvcfs.info(path)
            return info.get("md5") if info.get("isdvc") or info.get("dvc_info") else None

        def storage_url(self, path: str) -> str | None:
            try:
                index, entry = self.repo.get_data_index_entry(path)
            except OutputNotFoundError:  # DVC does not track it (no output is or holds it)
                return None
            except Exception as err:  # the remote unreadable (auth, network), a broken index...:
                # not "untracked"; say where, and why
                cause = (
                    f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
                )
                raise DatasetError(
                    f"{self.url} at revision {rev or 'HEAD'!r} ({self.commit[:12]}): cannot look "
                    f"up {path!r} in DVC: {type(err).__name__}: {err}{cause}"
                ) from err
            try:
                remote_fs, remote_path = index.storage_map.get_remote(entry)
            except (StorageKeyError, ValueError):
                raise LookupError(
                    "the repository has no DVC remote (`dvc remote add -d`)"
                ) from None
            return remote_fs.unstrip_protocol(remote_path)

    rev = version or revision
    if not repo_url:
        meta = run(
            None,
            revision,
            manifest_path,
            manifest.path,
            params.dataset.classes,
            cache=SlideCache.from_env(),
        )
    else:
        try:
            repo = Repo.open(repo_url, rev=rev or None, uninitialized=True)
            commit = repo.scm.resolve_rev(rev or "HEAD")
        except Exception as err:
            raise open_error(repo_url, rev, err) from None
        with repo:
            meta = run(
                DvcRepo(repo, repo_url, commit),
                revision,
                manifest_path,
                manifest.path,
                params.dataset.classes,
            )
    manifest.metadata.update(meta)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_resolve_dataset(
    manifest_path: str, version: str, image: dict, manifest: Output[Dataset]
) -> None:
    """The image manifest at `manifest_path` (local path or gs:// URI), checked against the
    task's classes (`image`), with every image URI absolute (`efcm.io.image_manifest`); cached
    on `version` (its md5, from `resolve_version`), which its metadata records. The image path
    has no DVC repository resolution: a plain manifest only."""
    from efcm import config
    from efcm.io.cache import SlideCache
    from efcm.io.image_manifest import LabelSpace, import_image_manifest

    params = config.params_for_stage("image_resolve_dataset", {"image": image})
    images = import_image_manifest(
        manifest_path,
        manifest.path,
        LabelSpace.of(params.image),
        cache=SlideCache.from_env(),
    )
    manifest.metadata.update({"path": manifest_path, "md5": version, "images": len(images.images)})

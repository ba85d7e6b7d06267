"""resolve_version + resolve_dataset: the DVC-versioned slide manifest at one git revision (CPU).

`resolve_version` runs uncached and turns the revision asked for (a branch, a tag, a commit) into
the commit it names now; `resolve_dataset` is cached on that commit, so a run on `main` picks up
new data while a rerun of the same commit reuses every cached step after it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_version(repo_url: str, revision: str, manifest_path: str) -> str:
    """The commit `revision` names in `repo_url` now (or the md5 of a plain manifest)."""
    from efcm.dataset import resolve_version as run

    return run(repo_url, revision, manifest_path)


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
    from efcm import config
    from efcm.dataset import resolve_dataset as run

    params = config.params_from_struct({"dataset": dataset}, "resolve_dataset")
    meta = run(repo_url, version or revision, manifest_path, manifest.path, params.dataset.classes)
    meta["revision"] = revision
    manifest.metadata.update(meta)

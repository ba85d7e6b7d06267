"""load_manifest: the slide manifest (local path or gs:// URI) -> a Dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def load_manifest(manifest_uri: str, dataset: dict, manifest: Output[Dataset]):
    """Copy and check the manifest; relative slide URIs become absolute. Slides are not copied."""
    from efcm import config
    from efcm.manifest import import_manifest

    params = config.params_from_struct({"dataset": dataset}, "load_manifest")
    import_manifest(manifest_uri, manifest.path, params.dataset.classes)

"""Compile the EFCM pipeline to IR YAML, with params.yaml as the parameter defaults.

    python pipelines/compile.py [--params params.yaml] [--image IMG:TAG]
        [--out pipelines/efcm_pipeline.yaml] [--parallelism N]
    python pipelines/compile.py --kind image [--params pipelines/image/params.yaml]
        [--image IMG:TAG] [--out pipelines/image/efcm_image_pipeline.yaml]

params.yaml is read through `efcm.config.load_params` (so it is validated) and each section the
pipeline takes becomes that parameter's default, as do `seed` and the `pipeline` section's
shard_size, gpu_accelerator_type and gpu_node_selector. `pipeline.parallelism` (or
`--parallelism`), `pipeline.distill_gpus`, `pipeline.distill_nodes` and `pipeline.etc_gpus` are
written into the compiled pipeline. No environment variable is read;
the same inputs give the same bytes (a test checks the committed `pipelines/efcm_pipeline.yaml`).
`--kind image` compiles the image-level pipeline (`pipelines.image_pipeline`) from
pipelines/image/params.yaml the same way (its sections, `pipeline.distill_gpus`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/compile.py` puts pipelines/, not the root, first
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from kfp import compiler  # noqa: E402
from kfp.compiler import pipeline_spec_builder  # noqa: E402

from components.image import IMAGE  # noqa: E402
from efcm.config import Params, load_params, params_from_dict, params_to_dict  # noqa: E402
from efcm.deploy.render import check_image_tag  # noqa: E402
from pipelines.image_pipeline import (  # noqa: E402
    IMAGE_PIPELINE_KEYS,
    IMAGE_SECTIONS,
    build_image_pipeline,
)
from pipelines.pipeline import PIPELINE_KEYS, SECTIONS, build_pipeline  # noqa: E402

DEFAULT_OUT = ROOT / "pipelines" / "efcm_pipeline.yaml"
IMAGE_DIR = ROOT / "pipelines" / "image"
# --kind: (default params.yaml, default output, params sections, pipeline.* parameters)
KINDS = {
    "slides": (ROOT / "params.yaml", DEFAULT_OUT, SECTIONS, PIPELINE_KEYS),
    "image": (
        IMAGE_DIR / "params.yaml",
        IMAGE_DIR / "efcm_image_pipeline.yaml",
        IMAGE_SECTIONS,
        IMAGE_PIPELINE_KEYS,
    ),
}


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def pipeline_arguments(params: Params, kind: str = "slides") -> dict[str, Any]:
    """`seed` and the pipeline's params.yaml sections (of the `kind` pipeline: `KINDS`), as KFP
    parameter values, and its `pipeline.*` parameters.

    KFP cannot carry a null inside a struct parameter, so keys set to null are left out: every such
    field defaults to null, which is checked here (the values must validate back to `params`).
    """
    _, _, sections_of, keys = KINDS[kind]
    data = params_to_dict(params, compact=True)
    args = {"seed": data["seed"], **{name: _without_none(data[name]) for name in sections_of}}
    sections = set(args)
    if params_from_dict(args).model_dump(include=sections) != params.model_dump(include=sections):
        raise ValueError("a null in params.yaml is not the default of its key: KFP cannot pass it")
    return {**args, **{k: data["pipeline"][k] for k in keys}}


def pipeline_defaults(params_path: str | Path, kind: str = "slides") -> dict[str, Any]:
    """The `kind` pipeline's parameter defaults from a params.yaml (validated)."""
    return pipeline_arguments(load_params(params_path), kind)


def compile_pipeline(
    out: str | Path,
    params_path: str | Path = ROOT / "params.yaml",
    image: str = IMAGE,
    parallelism: int | None = None,
    kind: str = "slides",
) -> Path:
    """Write the compiled pipeline (`kind`: slides, or image) to `out`; returns its path.
    `parallelism` (slides only) defaults to params.yaml's `pipeline.parallelism`."""
    check_image_tag(image, "component image")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = load_params(params_path)
    if kind == "image":
        if parallelism is not None:
            raise ValueError(
                "--parallelism is for the slide pipeline (the image one has no shards)"
            )
        pipeline = build_image_pipeline(image, distill_gpus=params.pipeline.distill_gpus)
    else:
        pipeline = build_pipeline(
            image,
            params.pipeline.parallelism if parallelism is None else parallelism,
            distill_gpus=params.pipeline.distill_gpus,
            distill_nodes=params.pipeline.distill_nodes,
            etc_gpus=params.pipeline.etc_gpus,
        )
    compiler.Compiler().compile(
        pipeline, str(out), pipeline_parameters=pipeline_arguments(params, kind)
    )
    _stable_header(out)
    return out


def _stable_header(path: Path) -> None:
    """Rewrite the comment header kfp puts above the YAML in a stable key order.

    kfp sorts the YAML body, but prints the struct defaults in its header in protobuf map order,
    which changes from process to process; the header is regenerated, by kfp's own function, from
    the sorted body.
    """
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    body = "".join(lines[start:])
    spec = next(yaml.safe_load_all(body))
    header = pipeline_spec_builder.extract_comments_from_pipeline_spec(
        spec, spec["pipelineInfo"].get("description")
    )
    path.write_text(header + body)


def add_kind_arguments(ap: argparse.ArgumentParser) -> None:
    """`--kind` (which pipeline) and `--params` (its params.yaml, by default that of the kind:
    `KINDS`), for compile.py and submit.py."""
    ap.add_argument(
        "--kind",
        choices=list(KINDS),
        default="slides",
        help="slides (default), or image: the image-level pipeline (pipelines/image)",
    )
    ap.add_argument("--params", help="default: params.yaml (image: pipelines/image/params.yaml)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kind_arguments(ap)
    ap.add_argument("--image", default=IMAGE, help=f"component image (default: {IMAGE})")
    ap.add_argument(
        "--out",
        help="default: pipelines/efcm_pipeline.yaml "
        "(image: pipelines/image/efcm_image_pipeline.yaml)",
    )
    ap.add_argument(
        "--parallelism",
        type=int,
        help="shards patched and extracted at once (default: params.yaml pipeline.parallelism)",
    )
    args = ap.parse_args(argv)
    params_path, out_path, _, _ = KINDS[args.kind]
    try:
        out = compile_pipeline(
            args.out or out_path,
            args.params or params_path,
            args.image,
            args.parallelism,
            args.kind,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"compile: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

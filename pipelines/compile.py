"""Compile the EFCM pipeline to IR YAML, with params.yaml as the parameter defaults.

    python pipelines/compile.py [--params params.yaml] [--image IMG:TAG]
        [--out pipelines/efcm_pipeline.yaml] [--parallelism N]

params.yaml is read through `efcm.config.load_params` (so it is validated) and each section the
pipeline takes becomes that parameter's default, as do `seed` and the `pipeline` section's
shard_size, gpu_accelerator_type and gpu_node_selector. `pipeline.parallelism` (or
`--parallelism`), `pipeline.distill_gpus`, `pipeline.distill_nodes` and `pipeline.etc_gpus` are
written into the compiled pipeline. No environment variable is read;
the same inputs give the same bytes (a test checks the committed `pipelines/efcm_pipeline.yaml`).
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
from pipelines.pipeline import SECTIONS, build_pipeline, pipeline_keys  # noqa: E402

DEFAULT_OUT = ROOT / "pipelines" / "efcm_pipeline.yaml"


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def pipeline_arguments(params: Params) -> dict[str, Any]:
    """`seed` and the pipeline's params.yaml sections, as KFP parameter values.

    KFP cannot carry a null inside a struct parameter, so keys set to null are left out: every such
    field defaults to null, which is checked here (the values must validate back to `params`).
    """
    data = params_to_dict(params, compact=True)
    args = {"seed": data["seed"], **{name: _without_none(data[name]) for name in SECTIONS}}
    sections = set(args)
    if params_from_dict(args).model_dump(include=sections) != params.model_dump(include=sections):
        raise ValueError("a null in params.yaml is not the default of its key: KFP cannot pass it")
    return {**args, **pipeline_keys(data["pipeline"])}


def pipeline_defaults(params_path: str | Path) -> dict[str, Any]:
    """The pipeline parameter defaults from a params.yaml (validated)."""
    return pipeline_arguments(load_params(params_path))


def compile_pipeline(
    out: str | Path,
    params_path: str | Path = ROOT / "params.yaml",
    image: str = IMAGE,
    parallelism: int | None = None,
) -> Path:
    """Write the compiled pipeline to `out`; returns its path. `parallelism` defaults to
    params.yaml's `pipeline.parallelism`."""
    check_image_tag(image, "component image")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = load_params(params_path)
    compiler.Compiler().compile(
        build_pipeline(
            image,
            params.pipeline.parallelism if parallelism is None else parallelism,
            distill_gpus=params.pipeline.distill_gpus,
            distill_nodes=params.pipeline.distill_nodes,
            etc_gpus=params.pipeline.etc_gpus,
        ),
        str(out),
        pipeline_parameters=pipeline_arguments(params),
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="default: params.yaml")
    ap.add_argument("--image", default=IMAGE, help=f"component image (default: {IMAGE})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="default: pipelines/efcm_pipeline.yaml")
    ap.add_argument(
        "--parallelism",
        type=int,
        help="shards patched and extracted at once (default: params.yaml pipeline.parallelism)",
    )
    args = ap.parse_args(argv)
    try:
        out = compile_pipeline(args.out, args.params, args.image, args.parallelism)
    except (ValueError, FileNotFoundError) as err:
        print(f"compile: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

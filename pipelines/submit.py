"""Compile the EFCM pipeline and submit a run to a Kubeflow Pipelines API with `kfp.Client`.

    python pipelines/submit.py --host URL --param manifest_path=gs://bucket/manifest.csv
        [--namespace NS] [--experiment NAME] [--run-name NAME] [--params params.yaml]
        [--image IMG:TAG] [--parallelism N] [--param KEY=VALUE ...]
        [--token TOKEN] [--cookie 'NAME=VALUE'] [--ui-host URL] [--kind slides|image]

The pipeline is compiled by `pipelines/compile.py` (`compile_pipeline`, params.yaml as the
parameter defaults) into a temporary file and sent whole with the run (no pipeline is uploaded);
prints `{"run_id", "run_url", "run_name", "experiment", "experiment_id"}` as JSON. `--kind image`
submits the image-level pipeline (`efcm-image`), its defaults from pipelines/image/params.yaml
(or `--params`), its sections (image, teacher, ...) merged and validated the same way.

Run parameters (`--param KEY=VALUE`, repeatable): KEY must be a parameter of the compiled pipeline
(the error lists them). VALUE is read by the parameter's type: a string parameter takes the text
as is (`revision=123` is "123"); the others take JSON (`seed=3`, `dry_run=false`,
`deploy={"min_auc": 0.8}`). A params.yaml section (dataset, patch, ..., deploy) is MERGED over
its params.yaml default (that of `--params`), nested mappings key by key, so
`--param 'deploy={"min_auc": 0.8}'` keeps `max_auc_drop`; a repeated section merges again.
`gpu_node_selector` is a label map and is replaced whole; other repeated keys: the last wins.
Only the given parameters are sent (the others keep the compiled defaults), each section whole,
since KFP replaces a struct parameter whole. `seed`, the sections and the `pipeline` keys are
validated with `efcm.config.params_from_struct` (as the components will) before anything is
sent; a parameter without a default (`manifest_path`) must be given.

Connection (what `kfp.Client` takes): `--host` (default: env KF_PIPELINES_ENDPOINT), the API's
base URL, e.g. `http://localhost:8080` after `kubectl port-forward -n kubeflow
svc/ml-pipeline-ui 8080:80`, or `https://<kubeflow host>/pipeline` behind the Kubeflow gateway;
`--token` (default: env KFP_TOKEN) is sent as `Authorization: Bearer` (kfp's `existing_token`, e.g.
a service-account token or `gcloud auth print-access-token`); `--cookie` (default: env
KFP_COOKIE) is sent as the `Cookie` header (a Dex/oauth2-proxy session,
`authservice_session=...`); `--namespace` is the profile namespace of a multi-user deployment
(leave it out on a single-user one); `--ui-host` is the base of the printed run URL (default:
`--host`).

Exit status: 0 submitted; 1 the API failed (cannot connect, an HTTP error: one line on stderr);
2 a usage error (bad or unknown parameter, invalid params, untagged image). Nothing is sent
before the arguments are valid.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/submit.py` puts pipelines/, not the root, first
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from components.image import IMAGE  # noqa: E402
from efcm.config import params_from_struct  # noqa: E402
from pipelines.compile import (  # noqa: E402
    KINDS,
    add_kind_arguments,
    compile_pipeline,
    pipeline_defaults,
)

DEFAULT_EXPERIMENT = "efcm"
# replaced whole: merging a node selector could never drop a label
REPLACED_STRUCTS = frozenset({"gpu_node_selector"})
_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "BOOLEAN": ("a boolean (true or false)", (bool,)),
    "NUMBER_INTEGER": ("an integer", (int,)),
    "NUMBER_DOUBLE": ("a number", (int, float)),
    "STRUCT": ("a JSON object", (dict,)),
    "LIST": ("a JSON list", (list,)),
}


class UsageError(ValueError):
    """Bad arguments: nothing was sent (exit 2)."""


class ApiError(RuntimeError):
    """The KFP API could not be reached or refused the request (exit 1)."""


def pipeline_inputs(package: str | Path) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's parameters: name -> its input definition (parameterType, ...)."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]


def parse_param(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE); the value is read later, by the parameter's type."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--param {text!r}: expected KEY=VALUE")
    return key.strip(), value


def _merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
        out[k] = _merge(out[k], v) if both else copy.deepcopy(v)
    return out


def _value(key: str, text: str, kind: str) -> Any:
    if kind == "STRING":
        return text
    what, types = _TYPES.get(kind, (kind, (object,)))
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise UsageError(f"--param {key}: expected {what}, got {text!r}")
    return value


def run_arguments(
    inputs: Mapping[str, Mapping[str, Any]],
    defaults: Mapping[str, Any],
    overrides: Iterable[tuple[str, str]],
    kind: str = "slides",
) -> dict[str, Any]:
    """The run's parameters from `--param` overrides (see the module docstring), validated.

    `inputs`: the compiled pipeline's parameters (`pipeline_inputs`); `defaults`: the params.yaml
    values the sections are merged over (`pipeline_defaults`); `kind`: the pipeline (slides or
    image: its sections and `pipeline` keys, `pipelines.compile.KINDS`).
    """
    _, _, sections, keys = KINDS[kind]
    args: dict[str, Any] = {}
    for key, text in overrides:
        if key not in inputs:
            valid = ", ".join(sorted(inputs))
            raise UsageError(f"--param {key}: not a parameter of the pipeline; valid: {valid}")
        value = _value(key, text, inputs[key]["parameterType"])
        if isinstance(value, dict) and key not in REPLACED_STRUCTS:
            value = _merge(args.get(key, defaults.get(key, {})), value)
        args[key] = value
    missing = [
        name
        for name, spec in inputs.items()
        if name not in args and "defaultValue" not in spec and not spec.get("isOptional")
    ]
    if missing:
        raise UsageError(f"missing --param for {', '.join(sorted(missing))} (no default)")
    if any(k in args for k in ("seed", *sections, *keys)):
        merged = {**defaults, **args}
        struct = {k: merged[k] for k in ("seed", *sections)}
        struct["pipeline"] = {k: merged[k] for k in keys}
        try:
            params_from_struct(struct, "--param")
        except ValueError as err:
            raise UsageError(str(err)) from None
    return args


def submit(
    host: str,
    overrides: Iterable[tuple[str, str]] = (),
    *,
    namespace: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    params_path: str | Path | None = None,
    image: str = IMAGE,
    parallelism: int | None = None,
    token: str | None = None,
    cookie: str | None = None,
    ui_host: str | None = None,
    kind: str = "slides",
) -> dict[str, Any]:
    """Compile, then create a run of the compiled pipeline (`kind`: slides, or image; its
    params.yaml by default); returns the run's id and URL.

    Raises:
        UsageError: bad arguments or params (nothing was sent).
        ApiError: the API could not be reached or answered an error.
    """
    overrides = list(overrides)
    run_name = run_name or f"efcm {datetime.datetime.now():%Y-%m-%d %H-%M-%S}"
    with tempfile.TemporaryDirectory(prefix="efcm-submit-") as tmp:
        try:
            params_path = params_path or KINDS[kind][0]
            package = compile_pipeline(
                Path(tmp) / "efcm.yaml", params_path, image, parallelism, kind
            )
            defaults = pipeline_defaults(params_path, kind)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
        arguments = run_arguments(pipeline_inputs(package), defaults, overrides, kind)
        try:
            run = _create_run(
                host, package, arguments, namespace, experiment, run_name, token, cookie, ui_host
            )
        except Exception as err:
            raise ApiError(_describe(err, host)) from err
    base = (ui_host or os.environ.get("KF_PIPELINES_UI_ENDPOINT") or host).rstrip("/")
    return {
        "run_id": run.run_id,
        "run_url": f"{base}/#/runs/details/{run.run_id}",
        "run_name": run_name,
        "experiment": experiment,
        "experiment_id": run.run_info.experiment_id,
    }


def _create_run(host, package, arguments, namespace, experiment, run_name, token, cookie, ui_host):
    import kfp  # late: slow to import, and a usage error does not need it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        client = kfp.Client(
            host=host,
            existing_token=token,
            cookies=cookie,
            ui_host=ui_host,
            **({"namespace": namespace} if namespace else {}),
        )
    return client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        run_name=run_name,
        experiment_name=experiment,
        namespace=namespace,
    )


def _describe(err: Exception, host: str) -> str:
    """One line for an error of kfp.Client / kfp_server_api / urllib3."""
    status = getattr(err, "status", None)
    if status:  # kfp_server_api.ApiException: the API answered an HTTP error
        message = ""
        try:
            body = json.loads(err.body or "{}")
            message = body.get("message") or body.get("error") or ""
        except (ValueError, AttributeError):
            message = str(getattr(err, "body", "") or "")[:200]
        line = f"{host} answered HTTP {status} {err.reason or ''}".rstrip()
        return f"{line}: {message}" if message else line
    reason = getattr(err, "reason", None)  # urllib3 MaxRetryError: cannot connect
    if reason is not None and type(err).__name__ == "MaxRetryError":
        return f"cannot reach {host}: {reason}"
    return f"{type(err).__name__}: {err}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 submitted, 1 the API failed, 2 a usage error.",
    )
    env = os.environ.get
    ap.add_argument(
        "--host",
        default=env("KF_PIPELINES_ENDPOINT"),
        help="KFP API base URL (default: env KF_PIPELINES_ENDPOINT)",
    )
    ap.add_argument("--namespace", help="profile namespace (multi-user Kubeflow only)")
    ap.add_argument(
        "--experiment",
        default=env("KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", DEFAULT_EXPERIMENT),
        help=f"experiment name, created when missing (default: {DEFAULT_EXPERIMENT})",
    )
    ap.add_argument("--run-name", help="default: 'efcm <date time>'")
    add_kind_arguments(ap)
    ap.add_argument("--image", default=IMAGE, help=f"component image (default: {IMAGE})")
    ap.add_argument("--parallelism", type=int, help="default: params.yaml pipeline.parallelism")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run parameter (repeatable); sections merge over params.yaml",
    )
    ap.add_argument("--token", default=env("KFP_TOKEN"), help="bearer token (env KFP_TOKEN)")
    ap.add_argument("--cookie", default=env("KFP_COOKIE"), help="Cookie header (env KFP_COOKIE)")
    ap.add_argument("--ui-host", help="base URL of the KFP UI for the run URL (default: --host)")
    args = ap.parse_args(argv)
    if not args.host:
        ap.error("--host is required (or set KF_PIPELINES_ENDPOINT)")
    try:
        overrides = [parse_param(p) for p in args.param]
        # kfp prints experiment/run links on stdout (the JSON below has the run's) and logs
        # retries and tracebacks: stdout stays JSON, stderr one line
        with contextlib.redirect_stdout(io.StringIO()), _logging_off():
            result = submit(
                args.host,
                overrides,
                namespace=args.namespace,
                experiment=args.experiment,
                run_name=args.run_name,
                params_path=args.params,
                image=args.image,
                parallelism=args.parallelism,
                token=args.token,
                cookie=args.cookie,
                ui_host=args.ui_host,
                kind=args.kind,
            )
    except UsageError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    except ApiError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


@contextlib.contextmanager
def _logging_off():
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


if __name__ == "__main__":
    sys.exit(main())

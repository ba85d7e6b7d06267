"""pipelines/submit.py against a STAND-IN for the Kubeflow Pipelines REST API (v2beta1).

The stand-in is a local HTTP server on 127.0.0.1 (a thread in this process), not Kubeflow: it
records every request (method, path, query, headers, JSON body) and answers the minimal valid JSON
for the endpoints kfp.Client 2.17 calls in `Client()` and `create_run_from_pipeline_package`:

    GET  /apis/v2beta1/healthz                     (only when no namespace is set) {"multi_user"}
    GET  /apis/v2beta1/experiments?filter=...      the experiments whose display_name matches
    POST /apis/v2beta1/experiments                 (when none matched) the experiment, with an id
    POST /apis/v2beta1/runs                        the run, with an id

Anything else is answered 404 in KFP's error shape, and `fail` makes an endpoint answer an error.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.protobuf import json_format
from kfp.client import client as kfp_client
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.compile import compile_pipeline, pipeline_defaults
from pipelines.submit import main, submit
from tests.conftest import ROOT

API = "/apis/v2beta1"
IMAGE = "registry.example/efcm-component:9.9.9"


class StandIn:
    """A stand-in for the KFP API server that records requests (not Kubeflow)."""

    def __init__(self, experiments: list[dict] | None = None):
        self.requests: list[dict] = []
        self.experiments = list(experiments or [])
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                standin.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                status, answer = standin.answer(method, url.path, standin.requests[-1])
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, req: dict) -> tuple[int, dict]:
        if (method, path) in self.fail:
            status, message = self.fail[method, path]
            return status, {"error": message, "code": 7, "message": message, "details": []}
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            wanted = json.loads(req["query"]["filter"])["predicates"][0]["stringValue"]
            found = [e for e in self.experiments if e["display_name"] == wanted]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            exp = {**req["body"], "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments.append(exp)
            return 200, exp
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {**req["body"], "run_id": "run-42", "state": "PENDING"}
        return 404, {"error": "Not Found", "code": 5, "message": f"no {method} {path}"}

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _hermetic_kfp(tmp_path, monkeypatch):
    """No ~/.config/kfp/context.json and no KF_PIPELINES_* environment reach kfp.Client."""
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "context.json"))
    for name in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
        "KFP_TOKEN",
        "KFP_COOKIE",
    ):
        monkeypatch.delenv(name, raising=False)


def _normalised(docs: list[dict]) -> dict:
    """The compiled YAML's documents as kfp.Client sends them (protobuf -> JSON dicts)."""
    from kfp.kubernetes import kubernetes_executor_config_pb2  # noqa: F401 (registers the type)

    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return {
        "pipeline_spec": json_format.MessageToDict(spec),
        "platform_spec": json_format.MessageToDict(platform),
    }


def test_submit_creates_the_experiment_and_sends_the_spec_and_parameters(tmp_path, capsys):
    with StandIn() as api:
        rc = main(
            [
                "--host", api.url,
                "--experiment", "efcm-ci",
                "--run-name", "nightly",
                "--image", IMAGE,
                "--parallelism", "3",
                "--token", "t0ken",
                "--param", "manifest_path=gs://bucket/manifest.csv",
                "--param", "dry_run=false",
                "--param", "seed=7",
                "--param", "revision=123",
                "--param", 'deploy={"min_auc": 0.8}',
                "--param", 'gpu_node_selector={"pool": "l4"}',
            ]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out) == {
        "run_id": "run-42",
        "run_url": f"{api.url}/#/runs/details/run-42",
        "run_name": "nightly",
        "experiment": "efcm-ci",
        "experiment_id": "exp-1",
    }
    # no namespace: kfp asks healthz whether the deployment is multi-user
    assert api.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    listed, created, run = api.requests[1], api.requests[2], api.requests[3]["body"]
    assert json.loads(listed["query"]["filter"])["predicates"] == [
        {"operation": 1, "key": "display_name", "stringValue": "efcm-ci"}  # 1: EQUALS
    ]
    assert created["body"]["display_name"] == "efcm-ci"
    assert all(r["headers"]["authorization"] == "Bearer t0ken" for r in api.requests)

    assert run["display_name"] == "nightly"
    assert run["experiment_id"] == "exp-1"
    defaults = pipeline_defaults(ROOT / "params.yaml")
    assert run["runtime_config"]["parameters"] == {
        "manifest_path": "gs://bucket/manifest.csv",
        "dry_run": False,
        "seed": 7,
        "revision": "123",  # a string parameter takes the text as is
        "deploy": {**defaults["deploy"], "min_auc": 0.8},  # merged: max_auc_drop kept
        "gpu_node_selector": {"pool": "l4"},  # a label map is replaced whole
    }
    assert (
        defaults["deploy"]["max_auc_drop"]
        == run["runtime_config"]["parameters"]["deploy"]["max_auc_drop"]
    )

    compiled = compile_pipeline(tmp_path / "ref.yaml", image=IMAGE, parallelism=3)
    docs = list(yaml.safe_load_all(compiled.read_text()))
    sent = run["pipeline_spec"]
    assert (
        sent["pipeline_spec"]["pipelineInfo"]["name"] == docs[0]["pipelineInfo"]["name"] == "efcm"
    )
    sent_inputs = sent["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert sent_inputs.keys() == docs[0]["root"]["inputDefinitions"]["parameters"].keys()
    assert sent_inputs["manifest_path"] == {"parameterType": "STRING"}
    images = {
        e["container"]["image"]
        for e in sent["pipeline_spec"]["deploymentSpec"]["executors"].values()
    }
    assert images == {IMAGE}
    assert sent == _normalised(docs)  # the whole compiled pipeline and its kubernetes platform spec


def test_an_existing_experiment_is_reused_in_the_namespace(capsys):
    existing = {"experiment_id": "exp-old", "display_name": "efcm", "namespace": "team-a"}
    with StandIn([existing]) as api:
        result = submit(
            api.url,
            [("manifest_path", "gs://b/m.csv"), ("deploy", '{"max_auc_drop": 0.1}')],
            namespace="team-a",
            cookie="authservice_session=abc",
            ui_host="https://kf.example/_/pipeline",
        )
    assert result["run_url"] == "https://kf.example/_/pipeline/#/runs/details/run-42"
    assert result["experiment_id"] == "exp-old"
    # a namespace is given: no healthz, and no experiment created
    assert api.calls() == [("GET", f"{API}/experiments"), ("POST", f"{API}/runs")]
    assert api.requests[0]["query"]["namespace"] == "team-a"
    assert all(r["headers"]["cookie"] == "authservice_session=abc" for r in api.requests)
    run = api.requests[1]["body"]
    assert run["experiment_id"] == "exp-old"
    assert run["runtime_config"]["parameters"]["deploy"] == {"max_auc_drop": 0.1, "min_auc": 0.5}


@pytest.mark.parametrize(
    ("param", "named"),
    [
        ("manifest_uri=gs://b/m.csv", "--param manifest_uri: not a parameter of the pipeline"),
        ('deploy={"min_aucc": 1}', "deploy.min_aucc: unknown key"),
        ('deploy={"min_auc": 2}', "deploy.min_auc"),
        ("dry_run=yes", "--param dry_run: expected a boolean"),
        ("shard_size=0", "pipeline.shard_size"),
        ("seed", "expected KEY=VALUE"),
    ],
)
def test_bad_parameters_exit_2_and_send_nothing(param, named, capsys):
    with StandIn() as api:
        rc = main(["--host", api.url, "--param", "manifest_path=m.csv", "--param", param])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert named in err
    assert len(err.strip().splitlines()) == 1
    if "manifest_uri" in param:  # the valid names are listed
        assert "valid: canary_traffic_percent, dataset, deploy," in err
    assert api.requests == []


def test_a_missing_required_parameter_exits_2(capsys):
    with StandIn() as api:
        assert main(["--host", api.url, "--param", "seed=1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "missing --param for manifest_path" in err
    assert api.requests == []


def test_an_unreachable_host_exits_1_with_one_line(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["--host", f"http://127.0.0.1:{port}", "--param", "manifest_path=m.csv"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.startswith(f"submit: cannot reach http://127.0.0.1:{port}")
    assert len(err.strip().splitlines()) == 1


def test_an_http_error_from_the_api_exits_1_with_its_message(capsys):
    with StandIn() as api:
        api.fail["POST", f"{API}/runs"] = (403, "user is not allowed to create runs in efcm")
        rc = main(["--host", api.url, "--param", "manifest_path=m.csv"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.strip() == (
        f"submit: {api.url} answered HTTP 403 Forbidden: user is not allowed to create runs in efcm"
    )


def test_kind_image_submits_the_image_pipeline_with_its_params(capsys):
    """--kind image: the efcm-image pipeline, its sections merged over pipelines/image/params.yaml
    and validated as the slide ones are."""
    with StandIn() as api:
        result = submit(
            api.url,
            [("manifest_path", "gs://b/images.csv"), ("image", '{"folds": 2}')],
            namespace="team-a",
            kind="image",
        )
        assert result["run_id"] == "run-42"
        run = api.requests[-1]["body"]
        assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "efcm-image"
        sent = run["runtime_config"]["parameters"]
        defaults = pipeline_defaults(ROOT / "pipelines/image/params.yaml", "image")
        assert sent["image"] == {**defaults["image"], "folds": 2}
        assert sent["manifest_path"] == "gs://b/images.csv"
        bad = ["--param", "manifest_path=m.csv", "--param", 'image={"folds": 1}']
        assert main(["--host", api.url, "--kind", "image", *bad]) == 2
    assert "image.folds" in capsys.readouterr().err

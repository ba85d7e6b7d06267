"""The kserve SDK as the rollout uses it: every behaviour of it that is not its documented API,
in one place, each checked against kserve 0.21.0 (its Python SDK) and kubernetes 30.1.0, the
versions constraints.txt pins. tests/unit/test_deploy.py runs each against the real SDK (and a
stub API server), so a new pinned version that changes one fails there, not in a cluster.

- Import: kserve parses `sys.argv` when it is first imported (a module-level `parse_known_args`
  in `kserve.model_server`); the deploy component's or pytest's arguments are not its arguments,
  and an ambiguous prefix among them ends the process. The same guard as `efcm.serving._kserve`
  (the deploy adapter does not import the server's modules).
- API errors: `KServeClient.get/create/patch` catch the Kubernetes client's `ApiException` and
  raise a `RuntimeError` with its text, inside the `except` block and without `from`: the typed
  exception, with its HTTP `status`, is the RuntimeError's `__context__` (`api_status`).
- Readiness: `KServeClient.wait_isvc_ready` raises a `RuntimeError` after its last poll that
  carries no API error (`is_wait_timeout`); an API error while polling carries one.
- Request bodies: `KServeClient.create/patch` read `.api_version` (and `.metadata.namespace` when
  no namespace is passed) of the object they are given, then hand it to `CustomObjectsApi`, which
  serialises it with `ApiClient.sanitize_for_serialization`: a generated model becomes a dict
  without its None attributes, a dict is sent as it is, nulls included (`request_body`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes.client import V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from efcm.argv import hidden_argv

with hidden_argv():
    from kserve import V1beta1InferenceService

CHECKED_VERSIONS = {"kserve": "0.21.0", "kubernetes": "30.1.0"}


def api_status(err: BaseException) -> int | None:
    """The HTTP status of the Kubernetes API error behind an SDK error, or None when there is
    none (`err` itself, what it was raised from, or what it was raised while handling)."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, ApiException):
            return e.status
    return None


def is_wait_timeout(err: RuntimeError) -> bool:
    """Whether a RuntimeError of `KServeClient.wait_isvc_ready` is its timeout (no API error)."""
    return api_status(err) is None


def request_body(obj: Mapping[str, Any]) -> V1beta1InferenceService:
    """A rendered InferenceService, or a merge patch of one, as `KServeClient.create/patch` take it.

    The envelope is the SDK's own model (what the client reads); the spec stays the plain dict:
    - a merge patch removes a key by sending it as null, and the model's serialisation drops
      None attributes, so a modelled spec could not remove a canary or a node selector;
    - the dict is what was validated against the InferenceService CRD schema, and the SDK's
      models cannot be built from it (`kserve.ApiClient.deserialize` looks up `V1ObjectMeta` and
      `V1Container` in `kserve.models`, which has neither), nor carry fields they lack.
    """
    meta = obj["metadata"]
    return V1beta1InferenceService(
        api_version=obj["apiVersion"],
        kind=obj["kind"],
        metadata=V1ObjectMeta(
            name=meta["name"],
            namespace=meta["namespace"],
            labels=meta.get("labels"),
            annotations=meta.get("annotations"),
        ),
        spec=obj["spec"],
    )

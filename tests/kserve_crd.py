"""The KServe InferenceService CRD in ../shared/schemas, as a strict JSON-schema validator.

Kubernetes prunes unknown fields instead of rejecting them, so the CRD's schema alone would let a
misspelt key (`readinesProbe`) through; here every object schema that lists its properties and does
not preserve unknown fields rejects any other key.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

CRD = ROOT.parent / "shared" / "schemas" / "kserve-inferenceservice-crd.yaml"


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def isvc_validator():
    """A jsonschema validator of v1beta1 InferenceService objects; skips when the CRD is absent."""
    if not CRD.is_file():
        pytest.skip(f"KServe CRD schema not available: {CRD} is absent")
    return _validator()


@functools.cache
def _validator():
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = yaml.load_all(CRD.read_text(), Loader=loader)
    crd = next(d for d in docs if d and d.get("kind") == "CustomResourceDefinition")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"]["const"] = f"{crd['spec']['group']}/v1beta1"
    schema["properties"]["kind"]["const"] = crd["spec"]["names"]["kind"]
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)

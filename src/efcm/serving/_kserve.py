"""Every private kserve API efcm relies on, in one place.

Checked against kserve 0.21.0 (`CHECKED_VERSION`, from `pip show kserve`). kserve documents none
of these; `tests/unit/test_serving_unit.py::test_the_kserve_shim_matches_the_installed_kserve`
fails when the installed kserve is another version or lacks one of them: then re-check each item
below against the new `kserve/model_server.py` and `kserve/protocol/dataplane.py`, and bump
`CHECKED_VERSION`.

1. `kserve.model_server` parses `sys.argv` when it is first imported (a module-level
   `parse_known_args`). The arguments of `efcm serve` (or of pytest) are not its arguments: an
   ambiguous prefix there ends the process with an argparse error. So kserve is imported here
   with `sys.argv` reduced to the program name, and every efcm module imports kserve through
   this one.
2. `model_server.parser`: kserve's own argument parser (`add_help=False`), the parent of
   `efcm serve`'s, as kserve's model servers build theirs (`parser()` hands out a copy).
3. `model_server.args`: the module-level namespace that `ModelServer.__init__` and `start` read
   (`configure_logging`, `log_config_file`, the predictor options) and hand, as `vars(args)`, to
   the gRPC server as its options (`grpc_max_receive_message_length`,
   `grpc_max_send_message_length`); `model_server()` writes the parsed options onto it.
4. `model_server.app`: the FastAPI app kserve's REST server serves, created at import (`app()`).
5. `ModelServer.dataplane`, made in `__init__` and handed to the REST and gRPC servers by
   `start`: `model_server()` replaces it with `CheckedDataPlane`.
6. `InferInput._raw_data`: an input's binary data, which `InferInput.as_numpy` decodes (BYTES:
   `deserialize_bytes_tensor`). kserve's `InferRequest.from_bytes` (a v2 REST body with the
   binary-data extension) re-encodes every binary input as JSON data, and a BYTES element that is
   not UTF-8 text (an image file) fails there with a 500. `CheckedDataPlane` decodes a body with a
   binary BYTES input itself (`from_bytes_keeping_bytes`), leaving the bytes in `_raw_data`.
"""

from __future__ import annotations

import argparse
import copy
import inspect
from importlib import metadata
from typing import Any

from efcm.argv import hidden_argv

with hidden_argv():
    import kserve
    from kserve import model_server as _model_server
    from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

CHECKED_VERSION = "0.21.0"
# model_server.args fields efcm writes or relies on (item 3)
ARGS_FIELDS = (
    "grpc_max_receive_message_length",
    "grpc_max_send_message_length",
    "configure_logging",
    "log_config_file",
)


def installed_version() -> str:
    """The installed kserve's version (kserve has no `__version__`)."""
    return metadata.version("kserve")


def parser() -> argparse.ArgumentParser:
    """A copy of kserve's argument parser (item 2): `efcm serve` sets its own defaults on it
    (`set_defaults` writes onto the parent's action objects), never on kserve's."""
    return copy.deepcopy(_model_server.parser)


def app():
    """kserve's FastAPI app (item 4), to add efcm's exception handlers and middleware to."""
    return _model_server.app


def _binary_bytes_input(body: bytes, json_length: int) -> bool:
    """Whether a binary v2 REST body has a BYTES input sent as binary data."""
    import orjson

    try:
        head = orjson.loads(body[:json_length])
        return any(
            i.get("datatype") == "BYTES" and "binary_data_size" in (i.get("parameters") or {})
            for i in head.get("inputs", [])
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return False  # kserve's own decoding says what is wrong


def from_bytes_keeping_bytes(body: bytes, json_length: int, model_name: str) -> InferRequest:
    """`InferRequest.from_bytes`, except that binary inputs stay binary (item 6): their bytes are
    the input's `_raw_data`, which `as_numpy` decodes when the model reads it."""
    import orjson

    try:
        head = orjson.loads(body[:json_length])
        inputs, start = [], json_length
        for spec in head["inputs"]:
            params = spec.get("parameters")
            inp = InferInput(spec["name"], spec["shape"], spec["datatype"], parameters=params)
            if spec.get("data") is not None:
                inp.data = spec["data"]
            elif params and params.get("binary_data_size") is not None:
                end = start + int(params["binary_data_size"])
                inp._raw_data = body[start:end]
                start = end
            else:
                raise InvalidInput(f"'data' field is missing for input '{spec['name']}'")
            inputs.append(inp)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InvalidInput(f"Unrecognized request format: {err}") from None
    outputs = [
        RequestedOutput(name=o["name"], parameters=o.get("parameters"))
        for o in head.get("outputs") or []
    ]
    return InferRequest(
        model_name=model_name,
        request_id=head.get("id"),
        parameters=head.get("parameters"),
        infer_inputs=inputs,
        request_outputs=outputs or None,
    )


class CheckedDataPlane(DataPlane):
    """kserve's data plane, except that
    - a v2 REST body whose binary data do not fill an input's declared shape is `InvalidInput`
      (400), not numpy's ValueError (a 500): kserve decodes the binary part
      (`InferRequest.from_bytes`, `as_numpy` then `reshape`) before the model sees it. Only that
      call is mapped; a ValueError anywhere else stays a server fault;
    - a body with a binary BYTES input (an image file) is decoded by `from_bytes_keeping_bytes`
      (item 6), so that bytes that are not UTF-8 text reach the model."""

    def decode_inference_request(self, body: Any, headers: Any, model_name: str):
        length = str(headers.get(INFERENCE_CONTENT_LENGTH_HEADER, "")) if headers else ""
        if isinstance(body, bytes) and length.isdigit() and _binary_bytes_input(body, int(length)):
            return from_bytes_keeping_bytes(body, int(length), model_name)
        try:
            return super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except ValueError as err:
            raise InvalidInput(f"the binary data do not match the inputs' shapes ({err})") from None


def model_server(options: argparse.Namespace) -> kserve.ModelServer:
    """A `kserve.ModelServer` for the parsed options of `parser()` (items 3 and 5): every option
    that `ModelServer` takes is passed to it, and every one is written onto `model_server.args`,
    which the server reads for the rest (logging, the gRPC message limits)."""
    for name, value in vars(options).items():
        if hasattr(_model_server.args, name):
            setattr(_model_server.args, name, value)
    accepted = inspect.signature(kserve.ModelServer.__init__).parameters
    kwargs = {k: v for k, v in vars(options).items() if k in accepted and k != "self"}
    server = kserve.ModelServer(**kwargs)
    server.dataplane = CheckedDataPlane(model_registry=server.registered_models)
    return server

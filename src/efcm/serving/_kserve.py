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
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane

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


class CheckedDataPlane(DataPlane):
    """kserve's data plane, except that a v2 REST body whose binary data do not fill an input's
    declared shape is `InvalidInput` (400), not numpy's ValueError (a 500): kserve decodes the
    binary part (`InferRequest.from_bytes`, `as_numpy` then `reshape`) before the model sees it.
    Only that call is mapped; a ValueError anywhere else stays a server fault."""

    def decode_inference_request(self, body: Any, headers: Any, model_name: str):
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

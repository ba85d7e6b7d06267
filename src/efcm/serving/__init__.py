"""The KServe adapter: serves an exported model package (`efcm.export`) over v1 and v2 (Open
Inference Protocol) REST and gRPC.

This package is the only part of `efcm` that imports kserve. `model.EFCMModel` is the
`kserve.Model`; `server.serve` is what `efcm serve` runs; `request` parses request bodies and
`policy` decides which slide URIs the server may open and the limits of a request.

kserve parses `sys.argv` when it is first imported (a module-level `parse_known_args` in
`kserve.model_server`). The arguments of `efcm serve` (or of pytest) are not its arguments: an
ambiguous prefix there ends the process with an argparse error. So kserve is imported here, once,
with `sys.argv` reduced to the program name; `server.serve` passes its options explicitly.
"""

from __future__ import annotations

import sys

_argv = sys.argv
sys.argv = _argv[:1]
try:
    import kserve  # noqa: F401  (imported for its side effect; see the module docstring)
finally:
    sys.argv = _argv
del _argv

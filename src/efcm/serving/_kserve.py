"""kserve, imported with `sys.argv` reduced to the program name.

kserve parses `sys.argv` when it is first imported (a module-level `parse_known_args` in
`kserve.model_server`). The arguments of `efcm serve` (or of pytest) are not its arguments: an
ambiguous prefix there ends the process with an argparse error. `model` and `server` import this
module before anything from kserve; `server.serve` passes kserve its options explicitly.
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

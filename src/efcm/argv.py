"""`hidden_argv()`: import a library that parses `sys.argv` when it is imported.

kserve parses the command line at import (a module-level `parse_known_args` in
`kserve.model_server`): the arguments of `efcm serve`, of a KFP component or of pytest are not its
arguments, and an ambiguous prefix there ends the process with an argparse error. Both kserve
shims (`efcm.serving._kserve`, `efcm.deploy._kserve_sdk`) import kserve inside this.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hidden_argv() -> Iterator[None]:
    """`sys.argv` reduced to the program name inside the block, restored after it."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv

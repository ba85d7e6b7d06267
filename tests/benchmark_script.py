"""Running a benchmark script in its `--quick` mode, as the benchmarks' smoke tests do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, tmp_path: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    """benchmarks/`script` run with `--quick`, `args` and `--out` into `tmp_path`: its JSON,
    checked to be what it also wrote to the --out file. Fails the test (with the script's
    stderr) when the script fails."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args, f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    return result

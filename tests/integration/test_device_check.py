"""benchmarks/device_check.py, the one-shot GPU check, run the way the suite can run it: on the CPU
at tiny sizes (test models at 64 px, a handful of patches, one or two steps), so the script keeps
working between its rare runs on a GPU machine. Timings are read, never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
SECTIONS = (
    "extraction_teacher",
    "extraction_student",
    "dataloader",
    "distill_vfd",
    "distill_fpd",
    "distill_mcm",
    "etc",
    "clam",
    "slide_request",
)
# Paths the check reports as unable to run on the device it was given (section path -> reason).
# On the CPU every path runs: none. (On CUDA, `clam` and `etc.ib` say that CLAM and IB training
# have no device argument and run on the CPU.)
EXPECTED_NOT_SUPPORTED_ON_CPU: dict[str, str] = {}


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), f"no --out file; stderr:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result, "stdout and --out differ"
    return proc, result


def _numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in `node` with its key path (booleans are not numbers here)."""
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _numbers(v, f"{path}[{i}]")]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return [(path, float(node))]
    return []


def _failure(name: str, rec: dict[str, Any]) -> str:
    return f"{name}: {rec.get('error') or rec.get('skipped')}\n{rec.get('traceback_tail', '')}"


def test_tiny_cpu_run_passes_every_section_with_positive_figures(tmp_path):
    proc, result = _run(tmp_path, "--device", "cpu")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["benchmark"] == "device_check"
    assert (result["scale"], result["device"]) == ("tiny", "cpu")
    assert result["status"] == "complete"
    assert tuple(result["sections"]) == SECTIONS
    for name, rec in result["sections"].items():
        assert rec["ok"] is True, _failure(name, rec)
    summary = result["summary"]
    assert summary["ok"] == list(SECTIONS)
    assert summary["failed"] == summary["skipped"] == []
    assert summary["not_supported"] == EXPECTED_NOT_SUPPORTED_ON_CPU
    env = result["environment"]
    for key in ("torch", "torch_cuda", "cudnn", "cpu_count", "torch_threads"):
        assert key in env, key
    assert env["cpu_count"] >= 1

    numbers = _numbers(result["sections"])
    assert numbers
    for path, value in numbers:
        assert math.isfinite(value) and value >= 0, (path, value)
    rates = [(p, v) for p, v in numbers if p.endswith("_per_s")]
    # every section measures at least one rate
    assert {p.split(".")[1] for p, _ in rates} == set(SECTIONS)
    assert all(v > 0 for _, v in rates), rates
    # GPU memory means nothing on the CPU: reported as null, never as a number
    assert not [p for p, _ in numbers if "memory" in p]

    s = result["sections"]
    assert s["etc"]["bag_patches"] == result["sizes"]["etc_k"]
    assert s["etc"]["fits_16gb"] is None  # no GPU memory to judge
    assert set(s["dataloader"]["by_workers"]) == {str(w) for w in result["sizes"]["workers"]}
    assert s["distill_mcm"]["patches_per_item"] == result["sizes"]["mcm_window"] ** 2
    assert s["slide_request"]["slides"]["synthetic"]["student"]["patches"] > 0
    for rec in (s["distill_vfd"], s["distill_fpd"], s["distill_mcm"]):
        assert rec["amp"] is False  # autocast is for CUDA only


def test_a_device_the_code_cannot_use_fails_section_by_section_and_the_run_completes(tmp_path):
    # The meta device has no kernels: every path that runs a model on the device fails there. Each
    # failure is recorded with its error, and the sections after it still run.
    proc, result = _run(tmp_path, "--device", "meta")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["status"] == "complete"
    assert tuple(result["sections"]) == SECTIONS
    failed = result["summary"]["failed"]
    assert "extraction_teacher" in failed
    assert result["summary"]["skipped"] == []
    for name in failed:
        rec = result["sections"][name]
        assert rec["ok"] is False
        assert rec["error"].split(":")[0].isidentifier(), rec["error"]  # "<Type>: <message>"
        assert "Traceback" in rec["traceback_tail"]


def test_sections_past_the_budget_are_skipped_and_reported(tmp_path):
    proc, result = _run(tmp_path, "--device", "cpu", "--budget-s", "0")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["status"] == "complete"
    assert result["summary"]["skipped"] == list(SECTIONS)
    for rec in result["sections"].values():
        assert rec["ok"] is None
        assert rec["skipped"].startswith("over budget")


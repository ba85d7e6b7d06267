"""scripts/images.sh refuses bad options before it touches an engine, and on a machine with neither
docker nor podman (outside CI) it says how to get one instead of failing obscurely. The builds
themselves are tests/container."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "images.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else dict(os.environ),
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tag", "latest"], "never :latest"),
        (["--target", "gpu"], "serving, serving-cpu, component or all, got 'gpu'"),
        (["--ca-bundle", "/nonexistent/ca.pem"], "no such file: /nonexistent/ca.pem"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_bad_options_are_refused_by_name(args, words):
    proc = _run(*args)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr


def test_help_lists_the_options_and_the_three_targets():
    proc = _run("--help")
    assert proc.returncode == 0
    for option in ("--local-base", "--base", "--registry", "--ca-bundle", "--no-cache"):
        assert option in proc.stdout
    assert "serving, serving-cpu, component or all" in proc.stdout


def _no_engine_env(tmp_path: Path) -> dict[str, str]:
    """A PATH with only what the script needs before it looks for an engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "python3", "id", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


@pytest.mark.parametrize("target", ["serving", "serving-cpu", "component", "all"])
def test_each_target_is_accepted(tmp_path: Path, target):
    """A known target gets past the options to the engine (which this PATH lacks)."""
    proc = _run("--target", target, env=_no_engine_env(tmp_path))
    assert proc.returncode == 1 and "neither a running Docker engine" in proc.stderr, proc.stderr


def test_without_an_engine_outside_ci_it_says_how_to_get_one(tmp_path: Path):
    proc = _run(env=_no_engine_env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "neither a running Docker engine nor podman" in proc.stderr
    assert "apt-get install podman runc" in proc.stderr

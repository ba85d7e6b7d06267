#!/usr/bin/env bash
# Install the test dependencies into .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh pipeline,serve,dev
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
ruff check .
exec python -m pytest "$@"

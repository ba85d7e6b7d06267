#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install efcm with the given extras, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-pipeline}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; assert sys.version_info >= (3, 11), "EFCM needs Python >= 3.11"'
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"

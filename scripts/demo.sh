#!/usr/bin/env bash
# Run the whole EFCM pipeline on the embedded synthetic demo data: installs what it needs into .venv,
# then `dvc repro` (demo-data -> patch -> extract -> distill -> extract -> train-mil -> evaluate -> export).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh pipeline
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
dvc repro "$@"
dvc metrics show
echo "report: runs/evaluate/report.md   package: runs/package"

#!/usr/bin/env bash
# Run the whole EFCM pipeline on the embedded synthetic demo data: installs what it needs into .venv,
# then `dvc repro` (demo-data -> patch -> extract -> distill -> extract -> train-mil -> evaluate -> export).
#   scripts/demo.sh [DVC ARGS]          the slide pipeline (dvc.yaml)
#   scripts/demo.sh --image [DVC ARGS]  the image-level pipeline (pipelines/image): the fundus demo
#   scripts/demo.sh --cxr [DVC ARGS]    the same on the chest X-ray demo (multi-label, MRM's pooling)
set -euo pipefail
cd "$(dirname "$0")/.."
kind=slides
case "${1:-}" in
  --image | --fundus) kind=fundus; shift ;;
  --cxr) kind=cxr; shift ;;
  -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
bash scripts/setup.sh pipeline
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
if [ "$kind" = slides ]; then
  dvc repro "$@"
  dvc metrics show
  echo "report: runs/evaluate/report.md   package: runs/package"
  exit 0
fi
cd pipelines/image
if [ "$kind" = cxr ]; then
  # an experiment on the committed pipeline: the CXR task and the MRM teacher preset
  dvc exp run -S image.preset=cxr -S teacher.preset=mrm "$@"
else
  dvc repro "$@"
fi
dvc metrics show runs/evaluate/metrics.json   # this pipeline's (a bare `show` lists the slides' too)
echo "report: pipelines/image/runs/evaluate/report.md   package: pipelines/image/runs/package"

#!/usr/bin/env bash
# Install the test dependencies into .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh pipeline,serve,dev
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
ruff check .
# the HTML report's test loads the page in a real headless browser (Debian's chromium)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    echo "test.sh: installing chromium (the report test needs a headless browser)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || {
        echo "test.sh: could not install chromium: run as root on Debian, or install it" >&2
        exit 1
    }
fi
# The images (scripts/images.sh: podman or docker; podman, runc and debootstrap are installed in CI
# as root; the stand-in base where no registry answers). The container tests (tests/container) build
# them themselves when needed; building here first puts the sizes and build times in the log. The
# layers are cached between runs on one machine.
if [ $# -eq 0 ]; then
    bash scripts/images.sh --local-base-if-offline
fi
exec python -m pytest "$@"

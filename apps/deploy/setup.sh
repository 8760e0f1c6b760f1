#!/usr/bin/env bash
# Build the MONAI Deploy app's own environment:  bash apps/deploy/setup.sh <venv path>
#
# Creates the venv with python3.11 (python3 if 3.11 is missing) unless it exists, installs the
# pinned CPU torch FIRST (an unpinned one pulls several GB of CUDA packages), then the app's
# requirements. Kept apart from the bundle's environment: the SDK makes `import monai` import holoscan.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash apps/deploy/setup.sh <venv path>" >&2
    exit 2
fi
VENV="$1"
APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install torch==2.13.0
"$VENV/bin/python" -m pip install -r "$APP_DIR/requirements.txt"

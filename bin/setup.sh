#!/usr/bin/env bash
# Create (or update) the project's virtual environment .venv with the pinned dependency set.
# Idempotent: re-running with unchanged requirements does nothing. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.xray2ct-requirements
want=$(cat requirements.txt requirements-dev.txt requirements-web.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (torch 2.13.0 CPU unless a CUDA build is already installed)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)')"

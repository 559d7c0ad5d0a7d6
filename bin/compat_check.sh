#!/usr/bin/env bash
# The DICOM, X-ray and volume-I/O tests again under the older releases our pyproject ranges allow:
# pydicom 2.4.4 (what MONAI Label 0.8.5 needs) with the venv's numpy, then pydicom 2.4.4 with numpy 1.26.4
# (MONAI Label 0.8.5's environment). No second venv: each release is installed with `pip --target` into a
# cache folder that is put first on PYTHONPATH. Skips (exit 0, with the reason) when the registry cannot be
# reached; fails when a test fails. Called by .ci/run; runnable alone: bash bin/compat_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
CACHE=${XRAY2CT_COMPAT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xray2ct/compat}

# fetch NAME==VERSION into $CACHE/NAME-VERSION (reused when present); prints the folder
fetch() {
  local spec=$1 dir
  dir="$CACHE/${spec/==/-}"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "$spec" >"$CACHE/pip.log" 2>&1 \
      || return 1
    touch "$dir/.complete"
  fi
  echo "$dir"
}

mkdir -p "$CACHE"
if ! pydicom24=$(fetch pydicom==2.4.4) || ! numpy126=$(fetch numpy==1.26.4); then
  echo "[compat] SKIPPED: could not install pydicom==2.4.4 / numpy==1.26.4 (registry unreachable?):"
  tail -3 "$CACHE/pip.log"
  exit 0
fi

DICOM_TESTS=(tests/test_dicom.py tests/test_xray.py tests/test_radiograph.py tests/test_hardening_files.py)
DICOM_FILTER="dicom or DICOM or monochrome or scale or voi or bad_inputs or declared or png"
IO_TESTS=(tests/test_io.py tests/test_metrics.py)

run() {  # run LABEL PYTHONPATH-PREFIX pytest-args...
  local label=$1 prefix=$2
  shift 2
  echo "[compat] $label"
  PYTHONPATH="$prefix:$REPO" "$PY" -c \
    "import numpy, pydicom; print('[compat] numpy', numpy.__version__, '| pydicom', pydicom.__version__)"
  PYTHONPATH="$prefix:$REPO" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
    "$PY" -m pytest -q -p no:cacheprovider --timeout 600 "$@"
}

run "pydicom 2.4.4, the venv's numpy" "$pydicom24" "${DICOM_TESTS[@]}" -k "$DICOM_FILTER"
run "pydicom 2.4.4 + numpy 1.26.4 (MONAI Label 0.8.5's pins): DICOM and X-ray" "$pydicom24:$numpy126" \
  "${DICOM_TESTS[@]}" -k "$DICOM_FILTER"
run "pydicom 2.4.4 + numpy 1.26.4: volume I/O and metrics" "$pydicom24:$numpy126" "${IO_TESTS[@]}"

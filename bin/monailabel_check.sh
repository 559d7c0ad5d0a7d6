#!/usr/bin/env bash
# A real MONAI Label 0.8.5 server with monailabel_app/ and the three volume-in bundles (tiny random weights,
# cpu_tiny sizes), on real CTs (../shared/data/ct crops and the example LIDC-IDRI-0001 CT), exercised over
# REST by monailabel_app/rest_check.py: /info/, /infer for each model and study, a 1-epoch /train for
# vqgan_3d_patch and pix2pix_phase. Opt-in (heavy: a second venv of ~5 GB); not part of bin/test.sh.
#   bash bin/monailabel_check.sh
# Environment: XRAY2CT_ML_VENV (default ~/.cache/xray2ct/monailabel-venv, outside the repository),
# XRAY2CT_ML_WORK (default a fresh temporary folder), XRAY2CT_ML_PORT (default a free port).
# Exit status: non-zero when the venv cannot be built, the server does not start, or any call/check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${XRAY2CT_ML_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xray2ct/monailabel-venv}
WORK=${XRAY2CT_ML_WORK:-$(mktemp -d -t xray2ct-monailabel.XXXXXX)}
PROJECT_PY=$REPO/.venv/bin/python  # builds the tiny bundles (tests/ helpers) and finds the example CT
DATA=${XRAY2CT_SHARED_DATA:-$REPO/../shared/data}

# 1. MONAI Label's venv: monailabel 0.8.5 with its working pins (CPU torch 2.13.0, pydicom 2.4.4, numpy < 2;
#    sam2 1.1.0 builds without CUDA), then this project installed WITH its dependencies: our ranges
#    (pydicom >= 2.4, numpy >= 1.26) must leave MONAI Label's pins in place.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import monailabel" 2>/dev/null; then
  echo "[monailabel] creating $VENV (several minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 monailabel==0.8.5 pydicom==2.4.4 "numpy<2"
fi
"$VENV/bin/pip" install -q -e "$REPO"
"$VENV/bin/python" - <<'EOF'
import monailabel, numpy, pydicom, torch
print(f"[monailabel] monailabel {monailabel.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"pydicom {pydicom.__version__}")
assert pydicom.__version__.startswith("2.4"), "installing xray2ct replaced MONAI Label's pydicom 2.4"
EOF

# 2. The model folder (tiny copies of the bundles) and the studies (real CTs; each crop's label, which
#    training reads, is the CT itself: vqgan ignores it, pix2pix learns the identity phase in 1 epoch).
mkdir -p "$WORK/model" "$WORK/studies/labels/final"
PYTHONPATH="$REPO:$REPO/tests" "$PROJECT_PY" - "$WORK/model" <<'EOF'
import sys
from pathlib import Path
from test_bundle_conformance import make_tiny_bundle
root = Path(sys.argv[1])
for bundle in ("vqgan_3d_patch", "pix2pix_phase", "pe_classifier"):
    if not (root / bundle).exists():
        make_tiny_bundle(bundle, root)
EOF
EXAMPLE_CT=$(PYTHONPATH=$REPO "$PROJECT_PY" -c "from data_prep.example_ct import fetch_example_ct; print(fetch_example_ct()['ct'])")
for src in "$DATA/ct/ctpa_crop_aorta.nii.gz" "$DATA/ct/ctpa_crop_pulmonary.nii.gz" "$EXAMPLE_CT"; do
  name=$(basename "$src")
  [ "$name" = cxr.nii.gz ] && name=lidc_idri_0001.nii.gz
  cp "$src" "$WORK/studies/$name"
  # training reads labelled studies only: the two crops (one epoch over the 512^2 LIDC CT is CPU-minutes more)
  [ "$name" = lidc_idri_0001.nii.gz ] || cp "$src" "$WORK/studies/labels/final/$name"
done

# 3. The server, on loopback only; stopped on any exit.
PORT=${XRAY2CT_ML_PORT:-$("$VENV/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
export MONAI_LABEL_AUTO_UPDATE_SCORING=false MONAI_LABEL_SESSIONS=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$VENV/bin/python" -m monailabel.main start_server --app "$REPO/monailabel_app" --studies "$WORK/studies" \
  --conf bundles_dir "$WORK/model" --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/info/" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "[monailabel] server exited:"; tail -40 "$WORK/server.log"; exit 1; }
  sleep 1
done
echo "[monailabel] server up on 127.0.0.1:$PORT (log: $WORK/server.log)"

# 4. The REST calls and the table.
status=0
"$VENV/bin/python" "$REPO/monailabel_app/rest_check.py" --url "http://127.0.0.1:$PORT" \
  --studies "$WORK/studies" --bundles "$WORK/model" || status=$?
[ $status -eq 0 ] || { echo "[monailabel] server log tail:"; grep -E "Error|Exception|Traceback" "$WORK/server.log" | tail -20; }
exit $status

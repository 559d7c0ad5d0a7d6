#!/usr/bin/env bash
# The xray2ctpa-vqgan recipe end to end (README.md beside this file): LIDC-IDRI DICOM -> NIfTI -> pairs -> training ->
# evaluation -> table.md beside the paper's figures. Every command is printed and logged to <work>/commands.sh.
#   reproduce/xray2ctpa-vqgan/run.sh --lidc LIDC-IDRI/ --work runs/xray2ctpa-vqgan [--gpus 4] [--steps nifti,name,pairs,...] [--dry_run]
#   TINY=1 reproduce/xray2ctpa-vqgan/run.sh --lidc <example CT DICOM folder> --work /tmp/xray2ctpa-vqgan   # CPU size (CI)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m xray2ct.reproduce xray2ctpa-vqgan "$@"

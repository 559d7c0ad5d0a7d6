#!/usr/bin/env bash
# The perx2ct recipe end to end (README.md beside this file): LIDC-IDRI DICOM -> NIfTI -> pairs -> training ->
# evaluation -> table.md beside the paper's figures. Every command is printed and logged to <work>/commands.sh.
#   reproduce/perx2ct/run.sh --lidc LIDC-IDRI/ --work runs/perx2ct [--gpus 4] [--steps nifti,name,pairs,...] [--dry_run]
#   TINY=1 reproduce/perx2ct/run.sh --lidc <example CT DICOM folder> --work /tmp/perx2ct   # CPU size (CI)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m xray2ct.reproduce perx2ct "$@"

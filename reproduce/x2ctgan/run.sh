#!/usr/bin/env bash
# The x2ctgan recipe end to end (README.md beside this file): LIDC-IDRI DICOM -> NIfTI -> pairs -> training ->
# evaluation -> table.md beside the paper's figures. Every command is printed and logged to <work>/commands.sh.
#   reproduce/x2ctgan/run.sh --lidc LIDC-IDRI/ --work runs/x2ctgan [--gpus 4] [--steps nifti,name,pairs,...] [--dry_run]
#   TINY=1 reproduce/x2ctgan/run.sh --lidc <example CT DICOM folder> --work /tmp/x2ctgan   # CPU size (CI)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m xray2ct.reproduce x2ctgan "$@"

#!/usr/bin/env bash
# SLURM job array for PerX2CT batch synthesis: array task k of N synthesizes every N-th uid from k.
#   sbatch --array=0-15 bundles/perx2ct/scripts/slurm_synthesize.sh REPORTS_CSV PROJECTIONS_CSV IMAGE_DIR OUTPUT_DIR [extra args]
# Resumable: resubmitting the same array skips finished volumes. Extra args go to the CLI (e.g. --format nii.gz).
#SBATCH --job-name=perx2ct-synth
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=perx2ct-synth-%A_%a.log
set -euo pipefail
REPORTS_CSV=$1; PROJECTIONS_CSV=$2; IMAGE_DIR=$3; OUTPUT_DIR=$4; shift 4
TASK=${SLURM_ARRAY_TASK_ID:-0}
COUNT=${SLURM_ARRAY_TASK_COUNT:-1}
python -m bundles.perx2ct.scripts.synthesize \
    --reports_csv "$REPORTS_CSV" --projections_csv "$PROJECTIONS_CSV" \
    --image_dir "$IMAGE_DIR" --output_dir "$OUTPUT_DIR" \
    --part_index "$TASK" --total_parts "$COUNT" "$@"

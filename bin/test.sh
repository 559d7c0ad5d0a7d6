#!/usr/bin/env bash
# Set up the environment and run the whole test suite (CI runs exactly this). Extra args go to pytest,
# e.g. `bash bin/test.sh -m "not slow"` or `bash bin/test.sh tests/test_drr.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bin/setup.sh
workers=${XRAY2CT_TEST_WORKERS:-$(nproc)}  # before OMP_NUM_THREADS, which nproc honours
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --timeout 1200 -p no:cacheprovider "${@:-tests}"

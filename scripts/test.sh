#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# One worker per core (override with PYTEST_WORKERS); each test file runs
# whole on one worker, so module fixtures are built once.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-$(nproc)}" \
    --dist loadfile tests "$@"

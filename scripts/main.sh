#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: the paper's Table 2 in
# miniature on Fashion-MNIST (all five rows, raw and with a fixed pixel
# permutation: ten runs, two at a time), printing the table at the end and
# writing it with its figure to workdirs/table2/ (table_2.md, table_2.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m launch.reproduce --table=2 --scale=local \
    --jobs=2 --workdir=workdirs/table2 "$@"

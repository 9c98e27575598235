#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: the paper's Table 2 in
# miniature on Fashion-MNIST (the Perceiver and the ResNet (FF) baseline, raw
# and with a fixed pixel permutation), printing the table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m launch.reproduce --table=2 --scale=local \
    --rows=perceiver,resnet50_ff --jobs=2 --workdir=workdirs/table2 "$@"

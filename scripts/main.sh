#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for config in configs/imagenet.py configs/modelnet40.py configs/fashion_mnist.py \
    "configs/audioset.py:modality=audio_video"; do
  .venv/bin/python -m launch.summary --config="$config"
  echo
done

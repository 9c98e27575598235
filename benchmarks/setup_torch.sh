#!/usr/bin/env bash
# The PyTorch peer's own environment (not part of the project's requirements):
# a venv with the CPU build of torch 2.13.0 and HuggingFace transformers, for
# benchmarks/hf_perceiver_w1.py and benchmarks/compare_pytorch.py.
#
#   bash benchmarks/setup_torch.sh              # -> .venv-torch
#   bash benchmarks/setup_torch.sh /tmp/torchvenv
#   PYTHON=python3.11 bash benchmarks/setup_torch.sh
#
# torch is pinned to the CPU build (2.13.0+cpu): a plain `torch` requirement
# lets pip choose the CUDA build, a download of several GB that a CPU
# comparison does not use. pip must be able to see a 2.13.0+cpu wheel (here: its
# find-links directory); where it cannot, the install stops instead of
# fetching another build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${root}/.venv-torch}"
python="${PYTHON:-python3}"

if [[ ! -x "${venv}/bin/python" ]]; then
  "${python}" -m venv "${venv}"
fi
"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install 'torch==2.13.0+cpu' transformers
"${venv}/bin/python" - <<'EOF'
import torch
import transformers
assert torch.version.cuda is None, f'not a CPU build: {torch.__version__}'
print(f'torch {torch.__version__} (CPU build), transformers '
      f'{transformers.__version__}, {torch.get_num_threads()} threads')
EOF
echo "peer python: ${venv}/bin/python"

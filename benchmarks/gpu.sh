#!/usr/bin/env bash
# The ImageNet Perceiver's train step on one GPU (benchmarks/gpu.py): this
# project in bf16 and fp32 with model.cpu_kernels off and on, and the
# HuggingFace PyTorch Perceiver at the same shape, in one go of at most
# 8 minutes including compiles (GPU_BENCH_BUDGET_S, default 470 s from the
# start of this script; what does not fit is skipped, the table is printed).
#
#   bash benchmarks/gpu_wheels.sh                             # here, once: .whl/
#   bash benchmarks/gpu.sh                                    # the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --dry-run  # here, on the CPU
#
# Run from anywhere; it works in the repository root. On the GPU machine
# (Python 3.12 with jax, optax, chex, torch and transformers, without dm-haiku,
# ml-collections and jmp) it first installs the wheels of
# benchmarks/gpu_wheels.txt from .whl/ into /tmp/site (no index, no deps).
# The table goes to stdout and, when $OUT is set, to $OUT/gpu_results.md and
# $OUT/gpu_results.json; progress goes to stderr. Extra arguments go to
# `python -m benchmarks.gpu` (e.g. --precisions=bf16, --impls=jax).
set -euo pipefail
start="$(date +%s)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

for arg in "$@"; do
  if [[ "${arg}" == --dry-run || "${arg}" == --dry_run ]]; then
    export JAX_PLATFORMS=cpu
    exec "${python}" -m benchmarks.gpu "$@"
  fi
done

site="${GPU_BENCH_SITE:-/tmp/site}"
# The wheel files to install (exits 2, naming them, if some are missing).
wheels="$("${python}" -m benchmarks.gpu --wheels-to-install)"
if [[ -n "${wheels}" ]]; then
  # shellcheck disable=SC2086  # one path per line, no spaces
  "${python}" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "${site}" ${wheels}
fi
export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
# The JAX workers run one at a time: let each take the GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
"${python}" -c 'import haiku, jmp, ml_collections, optax, jax; print(
    "imports ok: jax", jax.__version__, "haiku", haiku.__version__)' >&2 ||
  echo 'gpu.sh: the JAX stack does not import; the jax rows will fail' >&2
exec "${python}" -m benchmarks.gpu \
    --deadline="$(( start + ${GPU_BENCH_BUDGET_S:-470} ))" "$@"

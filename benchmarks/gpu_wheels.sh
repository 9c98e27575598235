#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu.sh installs on the GPU machine
# (benchmarks/gpu_wheels.txt: pinned versions, CPython 3.12, x86-64 Linux)
# into .whl/ (git-ignored), from the package index pip is configured with.
# Run it here, once, before sending the working tree to the GPU machine:
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/
#   bash benchmarks/gpu_wheels.sh /tmp/whl   # another folder
#
# Only the named wheels are fetched (--no-deps): the GPU image has the rest.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${root}/.whl}"
python="${PYTHON:-python3}"
mkdir -p "${dest}"

while read -r requirement _; do
  [[ -z "${requirement}" || "${requirement}" == \#* ]] && continue
  "${python}" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "${dest}" "${requirement}"
  echo "fetched ${requirement}"
done < "${root}/benchmarks/gpu_wheels.txt"
ls -l "${dest}"

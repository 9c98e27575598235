#!/usr/bin/env bash
# Sets up a fresh machine: the Fashion-MNIST files (Debian's dataset-fashion-mnist,
# where apt is available) and a virtual environment .venv with requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing dataset-fashion-mnist (apt)"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null 2>&1 &&
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "setup: WARNING: could not install dataset-fashion-mnist; the main" \
         "job needs $FMNIST (the tests do not)." >&2
fi

# perceiver/native compiles a small C++ library at first use (XLA:CPU's
# batched GEMMs); without a compiler it falls back to XLA's dot, slower.
if ! command -v "${CXX:-g++}" >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing g++ (apt)"
  $SUDO apt-get install -y -q g++ >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null 2>&1 &&
    $SUDO apt-get install -y -q g++ >/dev/null 2>&1; } ||
    echo "setup: WARNING: could not install g++; perceiver/native will use" \
         "XLA's dot (slower on the CPU)." >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.requirements.installed 2>/dev/null; then
  echo "setup: installing requirements.txt into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi

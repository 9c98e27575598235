#!/usr/bin/env bash
# Installs this project on every worker of a Cloud TPU VM (single host or pod).
#
#   bash launch/tpu_setup.sh TPU_NAME ZONE [PROJECT]
#
# Run it from the repository root on your own machine (gcloud configured).
# It copies the committed tree (git archive HEAD) to ~/perceiver on every
# worker, then on each one installs requirements.txt and jax[tpu] at the
# jax version pinned there. Afterwards:
#
#   python -m launch.sweep --config=configs/imagenet.py --sweep=lr \
#       --workdir=gs://BUCKET/sweeps/lr --tpu=TPU_NAME --zone=ZONE
#
# Multi-host workdirs must be shared by all workers: use a gs:// path.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: bash launch/tpu_setup.sh TPU_NAME ZONE [PROJECT]" >&2
  exit 2
fi
TPU="$1"
ZONE="$2"
PROJECT_FLAG=()
if [[ $# -eq 3 ]]; then
  PROJECT_FLAG=(--project="$3")
fi
REMOTE_DIR='~/perceiver'

cd "$(git rev-parse --show-toplevel)"
JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
if [[ -z "${JAX_VERSION}" ]]; then
  echo "tpu_setup.sh: no jax==VERSION pin in requirements.txt" >&2
  exit 1
fi
ARCHIVE="$(mktemp -t perceiver.XXXXXX.tar.gz)"
trap 'rm -f "${ARCHIVE}"' EXIT
git archive --format=tar.gz -o "${ARCHIVE}" HEAD

echo "Copying the project (HEAD $(git rev-parse --short HEAD)) to ${TPU}..."
gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU}:/tmp/perceiver.tar.gz" \
  --zone="${ZONE}" "${PROJECT_FLAG[@]}" --worker=all

echo "Installing on every worker of ${TPU}..."
gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
  --worker=all --command="set -e
rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR}
tar -xzf /tmp/perceiver.tar.gz -C ${REMOTE_DIR}
cd ${REMOTE_DIR}
python3 -m pip install --upgrade pip
python3 -m pip install -r requirements.txt
python3 -m pip install 'jax[tpu]==${JAX_VERSION}'
python3 -c 'import jax, haiku, optax, orbax.checkpoint; print(\"jax\", jax.__version__)'"
echo "Done: the project is in ${REMOTE_DIR} on every worker of ${TPU}."

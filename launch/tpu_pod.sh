#!/bin/bash
# Training on a Cloud TPU pod slice: ship this checkout to every worker, install,
# and run the same command on all of them.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.overrides ...]
#   launch/tpu_pod.sh my-v5e-32 us-west4-a experiments/configs/offseg.py:t,ade20k \
#       gs://my-bucket/workdirs/offseg_t_ade \
#       --config.data.name=tfds --config.data.root=gs://my-bucket/tfds
#
# The code shipped is the committed HEAD of this checkout (git archive), so every
# worker runs exactly the same version. jax.distributed.initialize() discovers the
# pod by itself; data and workdir must be on storage every worker sees (gs://).
# Rerunning the same command (e.g. after a preemption) resumes from the workdir's
# last checkpoint; a preempted run saves one at its last step before exiting.
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config, e.g. experiments/configs/offseg.py:t,ade20k}
WORKDIR=${4:?workdir on gs://}
shift 4
EXTRA=$(printf ' %q' "$@")
REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
ARCHIVE=$(mktemp -t offseg_jax.XXXXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD

gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU":/tmp/offseg_jax.tar.gz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command "
  set -e
  rm -rf ~/offseg_jax && mkdir -p ~/offseg_jax && tar -xzf /tmp/offseg_jax.tar.gz -C ~/offseg_jax
  cd ~/offseg_jax && pip install -q -r requirements.txt 'jax[tpu]' gcsfs && pip install -q --no-deps -e .
  python -m offseg_jax.main --config=$CONFIG --workdir=$WORKDIR$EXTRA"

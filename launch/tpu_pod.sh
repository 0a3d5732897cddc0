#!/bin/bash
# Training on a Cloud TPU pod slice: the same command on every host.
# jax.distributed.initialize() discovers the pod topology by itself; the data
# (ArrayRecord from `python -m input_pipeline.pack`) and the workdir must be on
# storage every host sees (e.g. a gs:// bucket or a shared filesystem).
#
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/configs/offseg.py:t,ade20k gs://bucket/workdirs/offseg_t_ade \
#       --config.data.name=tfds --config.data.root=gs://bucket/tfds
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command "
  cd ~/offseg_jax && pip install -q -r requirements.txt -e . 'jax[tpu]' &&
  python -m offseg_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA"

"""Entry point: ``python -m offseg_jax.main --config=CFG.py[:ARG] --workdir=DIR``.

Trains then evaluates; rerunning the same command with the same workdir resumes
from the last checkpoint. Any config field can be overridden with
``--config.a.b=value``; unknown fields are errors (the config is locked).

Multi-host: every process runs the same command; ``jax.distributed`` is
initialised from ``--coordinator_address/--num_processes/--process_id`` or, when
those are absent, from the cluster environment (Cloud TPU, SLURM) if detected.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, events and metrics.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed():
  """Initialises jax.distributed before any other JAX call when multi-process."""
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                     "MEGASCALE_COORDINATOR_ADDRESS")):
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
      jax.distributed.initialize()


def main(argv):
  del argv
  # Our own progress lines go to stdout; keep library INFO chatter (orbax) out.
  logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed()
  from offseg_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

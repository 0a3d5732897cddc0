"""Entry point: ``python -m offseg_jax.main --config=CFG.py[:ARG] --workdir=DIR``.

Trains then evaluates; rerunning the same command with the same workdir resumes
from the last checkpoint. SIGTERM (preemption) saves a checkpoint at the next
step boundary and exits with status 0; a non-finite loss stops the run (status
1) before anything of that step is saved; a second run on a workdir in use is
refused. Any config field can be overridden with
``--config.a.b=value``; unknown fields are errors (the config is locked).

Multi-host: every process runs the same command; ``jax.distributed`` is
initialised from ``--coordinator_address/--num_processes/--process_id`` or, when
those are absent, from the cluster environment (Cloud TPU, SLURM) if detected.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from offseg_jax import cli, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, events and metrics.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Our own progress lines go to stdout; keep library INFO chatter (orbax) out.
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  # pylint: disable=g-import-not-at-top
  from input_pipeline import image_io
  from offseg_jax import preemption, train, workdir_lock
  # pylint: enable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    # SIGTERM: the step's checkpoint is on disk; a clean exit, and rerunning
    # the same command resumes.
    print(e, flush=True)
  except (image_io.BadFileError, FloatingPointError, workdir_lock.WorkdirBusyError) as e:
    # One line naming the file, step or workdir (no traceback). A bad file:
    # the step's checkpoint is saved before evaluating, so a rerun resumes
    # there; a non-finite loss: the checkpoints before it are kept.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)

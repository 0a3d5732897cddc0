"""Multi-process start-up shared by every command (train, evaluate).

Must run before any other JAX call. Explicit ``--coordinator_address``,
``--num_processes`` and ``--process_id`` win; otherwise a detected cluster
(SLURM with several tasks, a Cloud TPU pod) lets ``jax.distributed`` discover
itself; a single process needs nothing.
"""

from __future__ import annotations

import os

from absl import flags


def define_flags():
  """The three multi-process flags (call once per program)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Initialises ``jax.distributed`` when this is a multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    # CPU processes talk through gloo (the default is none: multi-process CPU
    # computations would fail); accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()


def initialize_from_flags() -> None:
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)

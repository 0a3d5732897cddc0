"""Preemption: a SIGTERM ends training at a step boundary, after a checkpoint.

Schedulers announce preemption with SIGTERM (Cloud TPU maintenance and spot
VMs, SLURM ``--signal``/requeue, Kubernetes). The trainer asks
:meth:`PreemptionWatcher.reached` after every step; when it says yes, the
trainer saves that step's checkpoint and exits cleanly, and rerunning the same
command resumes from it.

* One process: our own SIGTERM handler sets a flag; the step in flight finishes
  and the next boundary is the stopping point.
* Several processes: JAX's preemption service (started by
  ``jax.distributed.initialize``) catches SIGTERM on whichever host receives it
  and agrees with every other process on one step to stop at
  (``multihost_utils.reached_preemption_sync_point``), so all processes save the
  same step collectively. Installing a Python handler there would take SIGTERM
  away from that service, so none is installed.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Says at which step boundary to stop because of a SIGTERM.

  Use as a context manager (restores the previous SIGTERM handler on exit) and
  call :meth:`reached` with the step just completed, on every process, at every
  step.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self) -> "PreemptionWatcher":
    # Signal handlers can only be installed from the main thread; elsewhere
    # (e.g. a trainer started from a worker thread) SIGTERM keeps its default.
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """True when training should stop after ``step`` (the same on every process)."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(int(step))
    return self._signalled.is_set()


class Preempted(Exception):
  """Training stopped for a preemption notice; its checkpoint is saved."""

  def __init__(self, step: int, checkpoint_dir: str):
    self.step = int(step)
    super().__init__(f"preempted: saved checkpoint at step {self.step} in {checkpoint_dir}; "
                     "rerun the same command to resume")

"""One training run per workdir: ``WORKDIR/lock.json`` names the run holding it.

Two runs writing checkpoints into one workdir corrupt each other's resumption,
so a second run refuses to start, naming the workdir and the holder. The lock
is a small JSON file (host, pid, start time, heartbeat) written through
``etils.epath``, so it works on any file system the workdir can live on
(``gs://`` included, where no exclusive-create primitive exists).

A lock is *stale* (and taken over) when its holder is gone:

* the holder ran on this host and its pid no longer exists (a run killed with
  ``kill -9`` or a crashed process), or
* its heartbeat, refreshed every ``heartbeat_s`` seconds by a background
  thread, is older than ``stale_after_s`` (a preempted VM never releases its
  lock; rerunning on a new VM resumes once the heartbeat has expired).

A clean exit, a preemption and an error all release the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

LOCK_FILE = "lock.json"


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:          # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Holds ``WORKDIR/lock.json`` for the life of a run (a context manager)."""

  def __init__(self, workdir, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.workdir = str(workdir)
    self.heartbeat_s = float(heartbeat_s)
    self.stale_after_s = float(stale_after_s)
    self.token = uuid.uuid4().hex
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  # -- reading ---------------------------------------------------------------
  def holder(self) -> dict | None:
    """The current lock record, or None when there is none (or it is unreadable)."""
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return None                  # a torn write counts as no lock

  def _is_live(self, record: dict) -> bool:
    age = time.time() - float(record.get("heartbeat", 0))
    if record.get("host") == socket.gethostname():
      return _pid_alive(int(record.get("pid", -1))) and record.get("token") != self.token
    return age < self.stale_after_s

  @staticmethod
  def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    beat = time.time() - float(record.get("heartbeat", 0))
    return (f"host {record.get('host')} pid {record.get('pid')} "
            f"(started {started}, last heartbeat {beat:.0f} s ago)")

  # -- holding ---------------------------------------------------------------
  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder."""
    current = self.holder()
    if current is not None and self._is_live(current):
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by another run: {self.describe(current)}; "
          f"stop that run first (if it is gone, delete {self.path})")
    now = time.time()
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                    "heartbeat": now, "token": self.token}
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._write()
    # Two runs starting together both see no lock and both write; the last
    # writer wins. Reading back after a pause tells the loser.
    time.sleep(0.05)
    current = self.holder()
    if current is None or current.get("token") != self.token:
      raise WorkdirBusyError(
          f"workdir {self.workdir} was taken by another run starting at the same time: "
          f"{self.describe(current or {})}")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _write(self) -> None:
    tmp = self.path.parent / f".{LOCK_FILE}.{self.token}"
    tmp.write_text(json.dumps(self._record))
    tmp.replace(self.path)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        current = self.holder()
        if current is None or current.get("token") != self.token:
          return                   # taken over (deleted by hand): stop refreshing
        self._record["heartbeat"] = time.time()
        self._write()
      except OSError:
        pass                       # a missed heartbeat is retried next period

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    current = self.holder()
    if current is not None and current.get("token") == self.token:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

"""Faults: a non-finite loss never reaches a checkpoint; one run per workdir."""

import json
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from offseg_jax import losses, workdir_lock


@losses.register("test_nan_from_step")
def _nan_from_step(logits, aux, labels, *, step, nan_step: int = 5):
  """Zero before training step ``nan_step`` (1-based), NaN from it on; losses
  receive the number of steps completed before the current one."""
  del aux, labels
  return jnp.where(step + 1 >= nan_step, jnp.nan, 0.0) * jnp.mean(logits)


def _small_config(**overrides):
  from experiments.configs import default
  c = default.get_config("tiny")
  c.total_steps, c.checkpoint_every, c.eval_every, c.log_every = 8, 2, 8, 100
  c.batch_size, c.data.num_train, c.data.num_val, c.eval.batch_size = 4, 32, 4, 4
  c.optimizer.warmup_steps = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_earlier_checkpoints(tmp_path):
  from offseg_jax import train
  c = _small_config()
  with c.unlocked():
    c.losses.test_nan_from_step = {"weight": 1.0, "nan_step": 5}
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 5\b.*last checkpoint "
                     r"written is step 4"):
    train.train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  state = ocp.PyTreeCheckpointer().restore(str(tmp_path / "checkpoints" / "4" / "state"))
  for leaf in jax_leaves(state["params"]):
    assert np.isfinite(np.asarray(leaf)).all()
  assert not (tmp_path / "lock.json").exists()     # released on the error


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_both(tmp_path):
  from offseg_jax import train
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
      train.train_and_evaluate(_small_config(), str(tmp_path))
  message = str(info.value)
  assert str(tmp_path) in message and f"pid {os.getpid()}" in message
  assert socket.gethostname() in message and "\n" not in message
  assert not (tmp_path / "checkpoints").exists()   # nothing was written


def test_the_cli_refuses_a_busy_workdir_in_one_line(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path)
  lock.acquire()
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "offseg_jax.main", "--config=experiments/configs/default.py:tiny",
         f"--workdir={tmp_path}"], cwd=os.path.dirname(os.path.dirname(__file__)),
        capture_output=True, text=True, timeout=300)
  finally:
    lock.release()
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: workdir {tmp_path} is in use")


def test_a_stale_lock_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  now = time.time()
  # Same host, pid gone: stale at once.
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(dead), "started": now, "heartbeat": now}))
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    assert lock.holder()["pid"] == os.getpid()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  # Another host: live while its heartbeat is fresh, stale once it has expired.
  record = {"host": "elsewhere", "pid": 1, "started": now, "heartbeat": now}
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))
  with pytest.raises(workdir_lock.WorkdirBusyError, match="host elsewhere pid 1"):
    workdir_lock.WorkdirLock(tmp_path, stale_after_s=60).acquire()
  record["heartbeat"] = now - 120
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))
  with workdir_lock.WorkdirLock(tmp_path, stale_after_s=60):
    pass


def test_the_heartbeat_refreshes_the_lock(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
    first = lock.holder()["heartbeat"]
    time.sleep(0.3)
    assert lock.holder()["heartbeat"] > first

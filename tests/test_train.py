"""End to end: the trainer's CLI, workdir layout, kill-and-resume, config errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# A small but complete run of the default experiment with the tiny model.
SMALL = ["--config.total_steps=16", "--config.checkpoint_every=4", "--config.eval_every=8",
         "--config.log_every=1", "--config.batch_size=4", "--config.data.num_val=8",
         "--config.data.num_train=64", "--config.eval.batch_size=4",
         "--config.optimizer.warmup_steps=2"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "offseg_jax.main",
          "--config=experiments/configs/default.py:tiny", f"--workdir={workdir}", *SMALL, *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(workdir, *extra):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _final_params(workdir):
  from offseg_jax import checkpointing
  step_dir = checkpointing.resolve_step_dir(str(workdir))
  import orbax.checkpoint as ocp
  state = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))
  return int(step_dir.name), state["params"], state["opt_state"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The SMALL run from start to end without interruption."""
  straight = tmp_path_factory.mktemp("straight") / "wd"
  out = _run(straight)
  assert "final validation mIoU" in out
  return straight


def _assert_same_final_state(straight, other):
  a, b = json.loads((straight / "metrics.json").read_text()), json.loads(
      (other / "metrics.json").read_text())
  assert a["step"] == b["step"] == 16
  assert a["mIoU"] == b["mIoU"] and a["per_class"] == b["per_class"]
  step_a, params_a, opt_a = _final_params(straight)
  step_b, params_b, opt_b = _final_params(other)
  assert step_a == step_b == 16
  for x, y in zip(jax.tree_util.tree_leaves((params_a, opt_a)), jax.tree_util.tree_leaves((params_b, opt_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # One curve per run: the interrupted run's lines past its checkpoint are gone.
  from offseg_jax import metric_log
  curves_a, curves_b = metric_log.read_scalars(straight), metric_log.read_scalars(other)
  assert curves_a.keys() == curves_b.keys() and "train/loss" in curves_a
  for name in curves_a:
    if not name.endswith("images_per_sec"):          # wall-clock speed differs
      assert curves_a[name] == curves_b[name], name


def _run_with_signal(workdir, when: str, sig, timeout: float):
  """Starts the SMALL run, sends ``sig`` when a line starts with ``when`` and
  waits for the process to end. Returns (exit status, lines read)."""
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(when):
      proc.send_signal(sig)
      if sig == signal.SIGKILL:
        break
  proc.wait(timeout=timeout)
  return proc.returncode, seen


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, straight_run):
  straight = straight_run
  # Start the same run, kill -9 it once a checkpoint beyond the first exists.
  killed = tmp_path / "killed"
  code, seen = _run_with_signal(killed, "saved checkpoint at step 8", signal.SIGKILL, 60)
  assert code == -signal.SIGKILL, "".join(seen[-20:])
  assert not (killed / "metrics.json").exists()

  # The killed run's lock (its pid is gone) does not block the rerun.
  assert (killed / "lock.json").exists()
  resumed_out = _run(killed)
  assert "resumed from" in resumed_out
  assert not (killed / "lock.json").exists()       # released at the end
  _assert_same_final_state(straight, killed)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_equals_the_uninterrupted_run(
    tmp_path, straight_run):
  stopped = tmp_path / "stopped"
  # Mid-run, between checkpoints 4 and 8.
  code, seen = _run_with_signal(stopped, "step 5/16", signal.SIGTERM, 120)
  assert code == 0, "".join(seen)[-3000:]
  stop_line = next(l for l in seen if l.startswith("preempted: saved checkpoint at step"))
  stop_step = int(stop_line.split("step ")[1].split()[0])
  assert 5 <= stop_step < 16, stop_line
  assert (stopped / "checkpoints" / str(stop_step) / "state").is_dir()
  assert not (stopped / "metrics.json").exists()
  assert not (stopped / "lock.json").exists()
  resumed_out = _run(stopped)
  assert f"(step {stop_step})" in resumed_out
  _assert_same_final_state(straight_run, stopped)


@pytest.mark.slow
def test_run_writes_the_promised_workdir_and_evaluate_reproduces_it(tmp_path):
  wd = tmp_path / "wd"
  out = _run(wd)
  assert "img/s" in out and "ETA" in out and "lr" in out
  metrics = json.loads((wd / "metrics.json").read_text())
  for key in ("aAcc", "mIoU", "mAcc"):
    assert 0.0 <= metrics[key] <= 100.0
  assert set(metrics["per_class"]) == {"background", "h_stripes", "v_stripes", "diagonal",
                                       "checker", "dots", "speckle", "rings", "grid"}
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  assert (wd / "scalars.jsonl").exists()
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert 16 in steps and len(steps) <= 3           # latest 2 + best
  # Evaluating the saved checkpoint from the CLI reproduces the final metrics.
  ev = subprocess.run([sys.executable, "-m", "offseg_jax.evaluate",
                       "--config=experiments/configs/default.py:tiny", f"--checkpoint={wd}",
                       f"--output={tmp_path / 'eval'}", *SMALL],
                      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
  again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  for key in ("aAcc", "mIoU", "mAcc"):
    assert again[key] == metrics[key]


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
  proc = subprocess.run(_cmd(tmp_path / "x", "--config.optimizer.lrr=1.0"), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


def test_in_process_training_improves_over_initialisation(tmp_path):
  from experiments.configs import default
  from offseg_jax import train
  c = default.get_config("tiny")
  c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 200, 200, 200, 50
  c.batch_size, c.data.num_val, c.eval.batch_size = 16, 16, 8
  c.optimizer.warmup_steps = 5
  c.optimizer.lr = 2e-3
  c.optimizer.custom_keys.head.lr_mult = 10.0   # fast start for a short run
  c.optimizer.grad_clip_norm = 0.0
  summary = train.train_and_evaluate(c, str(tmp_path))
  # Chance is 11 % mIoU and all-background ~6 %: objects must have been learnt.
  assert summary["mIoU"] > 15.0, summary["mIoU"]

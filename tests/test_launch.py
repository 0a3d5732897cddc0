"""Two cooperating processes (jax.distributed over gloo) train and evaluate as one run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_run_matches_one_global_batch(tmp_path):
  common = ["--config=experiments/configs/default.py:tiny", "--config.total_steps=6",
            "--config.checkpoint_every=3", "--config.eval_every=6", "--config.log_every=1",
            "--config.batch_size=4", "--config.data.num_val=6", "--config.data.num_train=32",
            "--config.eval.batch_size=4", "--config.optimizer.warmup_steps=1"]
  mp = tmp_path / "two"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=1",
       f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", "offseg_jax.main",
       f"--workdir={mp}", *common],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "".join(
      p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log"))
  assert "processes: 2" in proc.stdout
  metrics = json.loads((mp / "metrics.json").read_text())
  assert metrics["step"] == 6
  # The grain iterator state is saved per process.
  step_dir = mp / "checkpoints" / "6" / "data_iter"
  assert len(list(step_dir.glob("process_*"))) == 2
  # Every validation image is scored exactly once across both processes.
  confusion = __import__("numpy").load(mp / "confusion.npy")
  assert int(confusion.sum()) == 6 * 64 * 64

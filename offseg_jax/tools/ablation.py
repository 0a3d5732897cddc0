r"""Table 6 of the Offset Learning paper, on data we can run: classifier ablation.

Trains the same small OffSeg model with each classifier of the paper's Table 6
— the per-pixel classifier, class offset only, feature offset only, and both —
for several seeds at an equal step budget, and prints mean ± std validation mIoU
(a Markdown table; JSON with ``--json``)::

  python -m offseg_jax.tools.ablation --config=experiments/configs/default.py \
      --workdir=/tmp/offseg_ablation --steps=300 --seeds=0,1,2

The synthetic default's per-image appearance shift of every class is the
feature misalignment Offset Learning targets. Each run is a normal training run
(``WORKDIR/<classifier>_seed<k>``), so an interrupted ablation resumes where it
stopped.
"""

from __future__ import annotations

import json
import os

from etils import epath
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from offseg_jax import cli

KINDS = (("conv", "per-pixel classifier (1x1 conv)"),
         ("class_offset", "class offset only"),
         ("feature_offset", "feature offset only"),
         ("offset_learning", "class + feature offset (Offset Learning)"))


def run_ablation(config, workdir: str, steps: int, seeds: list[int],
                 kinds=tuple(k for k, _ in KINDS)) -> dict:
  """Trains every (classifier, seed) pair; returns ``{kind: [mIoU per seed]}``."""
  from offseg_jax import train  # pylint: disable=g-import-not-at-top
  results = {}
  for kind in kinds:
    for seed in seeds:
      c = config.copy_and_resolve_references()
      c.model.classifier = kind
      c.seed = seed
      c.total_steps = steps
      c.eval_every = steps
      c.checkpoint_every = steps
      c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(steps // 10, 1))
      run_dir = epath.Path(workdir) / f"{kind}_seed{seed}"
      metrics_file = run_dir / "metrics.json"
      if metrics_file.exists():
        summary = json.loads(metrics_file.read_text())
      else:
        summary = train.train_and_evaluate(c, os.fspath(run_dir))
      results.setdefault(kind, []).append(float(summary["mIoU"]))
  return results


def format_results(results: dict, steps: int, batch_size: int) -> str:
  """Markdown table of mean ± std (population std over seeds) mIoU per classifier."""
  names = dict(KINDS)
  lines = [f"| classifier | mIoU (mean ± std over {len(next(iter(results.values())))} seeds) "
           "| per seed |", "|---|---|---|"]
  for kind, values in results.items():
    v = np.asarray(values)
    lines.append(f"| {names.get(kind, kind)} | {v.mean():.2f} ± {v.std():.2f} | "
                 + ", ".join(f"{x:.2f}" for x in values) + " |")
  lines.append(f"\n{steps} steps at global batch {batch_size} per run.")
  return "\n".join(lines)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds.split(",")]
  results = run_ablation(config, FLAGS.workdir, FLAGS.steps, seeds)
  table = format_results(results, FLAGS.steps, config.batch_size)
  print(table)
  workdir = epath.Path(FLAGS.workdir)
  (workdir / "ablation.md").write_text(table + "\n")
  (workdir / "ablation.json").write_text(json.dumps(
      {"steps": FLAGS.steps, "batch_size": config.batch_size, "mIoU": results}, indent=1))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "experiments/configs/default.py",
                                  "Experiment config (its model must take `classifier`).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
  flags.DEFINE_integer("steps", 300, "Training steps per run (equal budget).")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)

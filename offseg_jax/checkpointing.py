"""Orbax checkpoints of training runs, and loading any checkpoint for evaluation.

Workdir layout::

  WORKDIR/checkpoints/<step>/state      params, batch_stats, opt_state, step, rng
  WORKDIR/checkpoints/<step>/data_iter  grain iterator state (one file per process)
  WORKDIR/checkpoints/<step>/meta       JSON: model, num_classes, config
  WORKDIR/checkpoints/<step>/metrics    JSON: validation metrics of that step

Retention keeps the latest ``keep`` checkpoints *and* the best by validation
mIoU (orbax's ``max_to_keep`` with ``best_fn`` alone would delete the latest one,
making resumption impossible).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str, keep: int = 2, best_metric: str = "mIoU",
                 async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager keeping the last ``keep`` steps plus the best one."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict,
         metrics: dict | None = None, force: bool = False) -> bool:
  """Saves the train state, the data iterator and metadata at ``step``."""
  args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)


def restore(manager: ocp.CheckpointManager, step: int, state_target, data_iter):
  """Restores the full train state (into ``state_target``'s shardings) and the
  data iterator in place. Returns the state."""
  args = {"state": ocp.args.StandardRestore(state_target)}
  if data_iter is not None:
    args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored["state"]


def _step_dirs(ckpt_dir: Path) -> list[Path]:
  return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()
                 and (p / "state").exists()), key=lambda p: int(p.name))


def resolve_step_dir(path: str, which: str = "latest") -> Path:
  """A step directory from a workdir, its ``checkpoints`` dir, or a step dir.

  ``which`` is 'latest' or 'best' (highest validation mIoU among saved steps).
  """
  p = Path(path)
  if (p / "state").is_dir():
    return p
  for ckpt_dir in (p / CHECKPOINT_DIR, p):
    if ckpt_dir.is_dir():
      steps = _step_dirs(ckpt_dir)
      if steps:
        if which == "best":
          scored = [(json.loads((s / "metrics" / "metrics").read_text()).get("mIoU", -1), s)
                    for s in steps if (s / "metrics" / "metrics").exists()]
          if scored:
            return max(scored, key=lambda t: (t[0], int(t[1].name)))[1]
        return steps[-1]
  raise FileNotFoundError(
      f"No checkpoint found at {path!r}: expected a training workdir containing "
      f"'{CHECKPOINT_DIR}/<step>/state', a step directory, or a converted checkpoint "
      "directory (with 'variables' and 'meta.json')")


def read_meta(path: str) -> dict:
  """The ``meta`` JSON of a training checkpoint (model, num_classes, config)."""
  step_dir = resolve_step_dir(path)
  meta_dir = step_dir / "meta"
  for candidate in (meta_dir / "meta", meta_dir):
    if candidate.is_file():
      return json.loads(candidate.read_text())
  return {}


def _restore_args(template):
  return jax.tree_util.tree_map(
      lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None), dtype=s.dtype),
      template)


def load_eval_variables(path: str, template: dict, which: str = "latest") -> dict:
  """``{'params', 'batch_stats'}`` from any checkpoint this project writes.

  Args:
    path: a training workdir, its ``checkpoints`` dir, a step directory, or a
      converted official checkpoint (``offseg_jax.convert``).
    template: the model's variables as ``jax.ShapeDtypeStruct`` leaves (from
      ``jax.eval_shape(model.init, ...)``), optionally with shardings for the
      current devices: a checkpoint saved on any number of devices restores into
      them.
    which: 'latest' or 'best' step of a workdir.
  """
  from offseg_jax.conversion import variables_io  # pylint: disable=g-import-not-at-top
  template = {k: v for k, v in dict(template).items() if k in ("params", "batch_stats")}
  if variables_io.is_converted_checkpoint(path):
    return variables_io.load_variables(path, template)
  step_dir = resolve_step_dir(path, which)
  restored = ocp.PyTreeCheckpointer().restore(
      str((step_dir / "state").absolute()),
      args=ocp.args.PyTreeRestore(item=template, restore_args=_restore_args(template),
                                  partial_restore=True))
  _check_shapes(restored, template, str(step_dir))
  return restored


def _check_shapes(restored: Any, template: Any, where: str):
  flat_r = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  flat_t = jax.tree_util.tree_flatten_with_path(template)[0]
  bad = []
  for key, t in flat_t:
    r = flat_r.get(key)
    if r is None or tuple(r.shape) != tuple(t.shape):
      bad.append(f"{jax.tree_util.keystr(key)}: checkpoint "
                 f"{None if r is None else tuple(r.shape)} vs model {tuple(t.shape)}")
  if bad:
    raise ValueError(f"Checkpoint {where} does not fit the model:\n  " + "\n  ".join(bad[:20]))

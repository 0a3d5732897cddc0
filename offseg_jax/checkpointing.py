"""Orbax checkpoints of training runs, and loading any checkpoint for evaluation.

Workdir layout::

  WORKDIR/checkpoints/<step>/state      params, batch_stats, opt_state, step, rng
  WORKDIR/checkpoints/<step>/meta       JSON: model, num_classes, config
  WORKDIR/checkpoints/<step>/metrics    JSON: validation metrics of that step

The data position is not saved: the training order is a function of the seed
and the step alone (``input_pipeline.loader.train_dataset``), so a run resumes
its example order from the restored step on any number of processes. The
state's arrays restore onto any mesh (orbax reshards them).

Retention keeps the latest ``keep`` checkpoints *and* the best by validation
mIoU (orbax's ``max_to_keep`` with ``best_fn`` alone would delete the latest one,
making resumption impossible). A step is saved before it is evaluated; its
metrics are attached afterwards (:func:`record_metrics`).

Every training checkpoint carries its experiment config (``meta['config']``):
evaluation rebuilds the model from it (:func:`config_from_meta`) and refuses a
config that would build another model (:func:`check_config_matches`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


def absolute(path) -> epath.Path:
  """``path`` as an absolute ``epath.Path`` (local paths against the current
  directory; ``gs://`` and other URLs as they are)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.resolve()


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
  return ocp.CheckpointManager(absolute(workdir) / CHECKPOINT_DIR, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None, force: bool = False) -> bool:
  """Saves the train state and metadata at ``step`` (collectively: call it on
  every process)."""
  args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  return manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)


def record_metrics(manager: ocp.CheckpointManager, step: int, metrics: dict) -> None:
  """Attaches validation metrics to the already saved checkpoint of ``step``.

  The trainer saves a step's checkpoint *before* evaluating it, so that an
  evaluation that fails (e.g. on a bad validation file) costs no training; the
  metrics follow here, in the file orbax reads them from
  (``<step>/metrics/metrics``), and the manager reloads them so that keeping
  the best checkpoint by mIoU works as if they had been saved together. Call
  it on every process.
  """
  manager.wait_until_finished()
  if jax.process_index() == 0:
    item = epath.Path(manager.directory) / str(int(step)) / "metrics"
    item.mkdir(exist_ok=True)
    tmp = item / "metrics.tmp"
    tmp.write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
    tmp.replace(item / "metrics")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"record_metrics_{int(step)}")
  manager.reload()


def has_metrics(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether :func:`record_metrics` completed for the checkpoint of ``step``."""
  return (epath.Path(manager.directory) / str(int(step)) / "metrics" / "metrics").exists()


def restore(manager: ocp.CheckpointManager, step: int, state_target):
  """Restores the full train state into ``state_target``'s shapes and
  shardings (whatever mesh or process count saved it). Returns the state."""
  args = {"state": ocp.args.StandardRestore(state_target)}
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored["state"]


def _step_dirs(ckpt_dir: epath.Path) -> list[epath.Path]:
  return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()
                 and (p / "state").exists()), key=lambda p: int(p.name))


def resolve_step_dir(path, which: str = "latest") -> epath.Path:
  """A step directory from a workdir, its ``checkpoints`` dir, or a step dir.

  ``which`` is 'latest' or 'best' (highest validation mIoU among saved steps).
  """
  p = absolute(path)
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


def read_meta(path: str, which: str = "latest") -> dict:
  """The ``meta`` JSON of a training checkpoint (model, num_classes, config)."""
  step_dir = resolve_step_dir(path, which)
  meta_dir = step_dir / "meta"
  # orbax's JsonSave writes the item's file as 'metadata' (older versions: 'meta').
  for candidate in (meta_dir / "metadata", meta_dir / "meta", meta_dir):
    if candidate.is_file():
      return json.loads(candidate.read_text())
  return {}


def checkpoint_meta(path: str, which: str = "latest") -> dict:
  """The meta of any checkpoint this project writes: a training step's ``meta``
  (with the full experiment config under ``'config'``) or a converted
  checkpoint's ``meta.json`` (model name and number of classes)."""
  from offseg_jax.conversion import variables_io  # pylint: disable=g-import-not-at-top
  if variables_io.is_converted_checkpoint(path):
    return variables_io.load_meta(path)
  return read_meta(path, which)


def _frozen(value):
  """JSON/ConfigDict values -> hashable Python (lists -> tuples, dicts -> dicts)."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if hasattr(value, "items"):
    return {k: _frozen(v) for k, v in value.items()}
  return value


def config_from_meta(meta: dict):
  """The experiment config a training checkpoint carries, or None.

  JSON lists come back as tuples (module fields must be hashable), so the
  config builds the same model it trained.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = meta.get("config") if meta else None
  if not isinstance(config, dict):
    return None
  return ml_collections.ConfigDict(_frozen(config))


class ConfigMismatchError(ValueError):
  """A config that would build another model than the checkpoint holds."""


# Model fields that change how a model computes, not which model it is.
_COMPUTE_ONLY_FIELDS = ("dtype", "remat", "conv_impl")


def config_mismatches(meta: dict, config) -> list[str]:
  """How ``config`` disagrees with a checkpoint's meta on what was trained.

  Compared: every ``config.model`` field but the compute settings (name,
  parts and their ``*_args``, classifier, sizes), the number of classes and
  the dataset. Evaluation settings (``eval.*``), data paths and the like may
  differ. Fields absent on either side (older checkpoints) are not compared.
  Returns one ``'field: checkpoint X, --config Y'`` entry per difference.
  """
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  out = []
  mine = {k: _frozen(v) for k, v in dict(config.model).items()}
  saved = meta.get("config", {}).get("model") if isinstance(meta.get("config"), dict) else None
  if saved is None:
    saved = {"name": meta["model"]} if "model" in meta else {}
  for key in sorted(set(mine) & set(saved)):
    if key in _COMPUTE_ONLY_FIELDS:
      continue
    theirs = _frozen(saved[key])
    if theirs != mine[key]:
      out.append(f"model.{key}: checkpoint {theirs!r}, --config {mine[key]!r}")
  info = datasets.dataset_info(config.data)
  if "num_classes" in meta and int(meta["num_classes"]) != info.num_classes:
    out.append(f"number of classes: checkpoint {meta['num_classes']}, --config {info.num_classes}")
  if "dataset" in meta and meta["dataset"] != info.name:
    out.append(f"data.name: checkpoint {meta['dataset']!r}, --config {info.name!r}")
  return out


def check_config_matches(meta: dict, config, where: str = "the checkpoint") -> None:
  """Raises a one-line :class:`ConfigMismatchError` naming every field where
  ``config`` disagrees with the checkpoint (see :func:`config_mismatches`)."""
  problems = config_mismatches(meta, config)
  if problems:
    raise ConfigMismatchError(
        f"--config does not match {where} (" + "; ".join(problems) + "): it would score "
        "another model. Drop --config to use the checkpoint's own config, or fix these "
        "fields (evaluation settings such as eval.mode may differ)")


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
      step_dir / "state",
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

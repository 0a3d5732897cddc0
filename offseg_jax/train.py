"""Training and evaluation loop, top to bottom.

``train_and_evaluate(config, workdir)``:
  1. mesh over all devices ('data' axis), process-local input pipeline;
  2. model from the registry; ``jax.eval_shape`` of the init -> shardings from the
     config's regex rules -> jitted init directly into those shardings;
  3. AdamW with the official parameter groups and warm-up + poly schedule;
  4. resume from ``WORKDIR/checkpoints`` if present (params, optimizer, step, RNG
     and the data iterator), else optionally initialise from a converted
     checkpoint (``config.init_from``);
  5. jitted train step with the state donated; periodic evaluation with a jitted
     integer confusion matrix; TensorBoard events + readable log lines;
     checkpoints keeping the last N and the best by mIoU;
  6. final evaluation written to ``WORKDIR/metrics.json``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import datasets, loader
from offseg_jax import checkpointing, losses, optim
from offseg_jax.evaluation import metrics as metrics_lib
from offseg_jax.models import build_model, layers

# Train state: a plain dict pytree (big_vision style), saved whole by orbax.
State = dict[str, Any]


# ----------------------------------------------------------------------------
# Mesh and parameter placement.
# ----------------------------------------------------------------------------

def make_mesh(config) -> jax.sharding.Mesh:
  """Mesh from ``config.mesh`` (shape with one -1 filled by the device count)."""
  shape = list(config.mesh.shape)
  axes = tuple(config.mesh.axes)
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)} has more than one -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = n // rest
  if int(np.prod(shape)) != n:
    raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)} does not cover {n} devices")
  return jax.make_mesh(tuple(shape), axes,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for every state leaf from ``(regex, spec)`` rules.

  The path of a leaf is its keys joined by '/', e.g. 'params/backbone/stem/conv/
  kernel' (optimizer moments share their parameter's path suffix, so a rule for
  a parameter also places its Adam moments). Unmatched leaves are replicated.
  """
  compiled = [(re.compile(rx), tuple(spec)) for rx, spec in rules]

  def place(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    for rx, spec in compiled:
      if rx.search(name):
        if len(spec) > len(leaf.shape):
          spec = ()                   # scalars and small leaves stay replicated
        for dim, axis in zip(leaf.shape, spec):
          if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(f"sharding rule {rx.pattern!r} puts {name} dim {dim} "
                             f"on mesh axis {axis!r} of size {mesh.shape[axis]}")
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(place, abstract_state)


# ----------------------------------------------------------------------------
# Model, state and steps.
# ----------------------------------------------------------------------------

def create_model(config, num_classes: int):
  """The registered model of ``config.model`` (dtype given as a string)."""
  model_cfg = dict(config.model)
  if "dtype" in model_cfg:
    model_cfg["dtype"] = jnp.dtype(model_cfg["dtype"])
  return build_model(model_cfg, num_classes)


def init_variables(model, config, rng):
  """Model variables from a dummy crop-sized batch of one."""
  h, w = config.data.crop_size
  dummy = jnp.zeros((1, int(h), int(w), 3), jnp.float32)
  p_rng, d_rng, h_rng = jax.random.split(rng, 3)
  variables = model.init({"params": p_rng, "dropout": d_rng, "ham": h_rng}, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def make_train_step(model, tx, loss_fn, schedule):
  """``step(state, batch) -> (state, metrics)``; jit it with the state donated."""

  def train_step(state: State, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    dropout_rng, ham_rng = jax.random.split(rng)

    def compute_loss(params):
      (logits, aux), new_vars = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, batch["image"],
          train=True, rngs={"dropout": dropout_rng, "ham": ham_rng},
          mutable=["batch_stats"])
      loss, terms = loss_fn(logits, aux, batch["label"], step=state["step"])
      return loss, (terms, new_vars.get("batch_stats", state["batch_stats"]))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                     step=state["step"] + 1)
    out = {"loss": loss, "lr": schedule(state["step"]), "grad_norm": optax.global_norm(grads)}
    out.update({f"loss_{k}": v for k, v in terms.items()})
    return new_state, out

  return train_step


def make_eval_step(model, num_classes: int, ignore_index: int):
  """``step(variables, batch, rng) -> int32 confusion matrix`` of the batch."""

  def eval_step(variables, batch, rng):
    logits, _ = model.apply(variables, batch["image"], train=False, rngs={"ham": rng})
    logits = layers.resize_bilinear(logits.astype(jnp.float32), batch["label"].shape[1:3])
    pred = jnp.argmax(logits, axis=-1)
    return metrics_lib.confusion_matrix(pred, batch["label"], num_classes, ignore_index,
                                        valid=batch["mask"][:, None, None])

  return eval_step


def evaluate(config, model, eval_step, variables, mesh, info, rng) -> tuple[dict, np.ndarray]:
  """Scores the validation split; every image exactly once on every process count."""
  if _fixed_size_dataset(config):
    confusion = np.zeros((info.num_classes, info.num_classes), np.int64)
    for i, batch in enumerate(loader.EvalBatches(config, "val")):
      gbatch = loader.to_global(batch, mesh)
      confusion += np.asarray(eval_step(variables, gbatch, jax.random.fold_in(rng, i)),
                              np.int64)
  else:
    # Variable-size real datasets: the full inference runner (whole/slide/TTA).
    from offseg_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    return runner.evaluate_model(model, variables, config, progress=False)
  summary = metrics_lib.summarize(confusion, info.class_names, tuple(config.eval.metrics),
                                  nan_to_num=config.eval.get("nan_to_num"))
  return summary, confusion


def _fixed_size_dataset(config) -> bool:
  return config.data.name == "synthetic" and config.eval.mode == "whole"


# ----------------------------------------------------------------------------
# Logging.
# ----------------------------------------------------------------------------

class MetricWriter:
  """TensorBoard event files (tensorboardX, no TensorFlow) + log lines, process 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float], prefix: str = ""):
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(prefix + k, float(v), step)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log(msg: str):
  """Readable progress lines on process 0 (other processes log at INFO)."""
  if jax.process_index() == 0:
    print(msg, flush=True)
  else:
    logging.info(msg)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns
  the final validation summary (also written to ``WORKDIR/metrics.json``)."""
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config)
  info = datasets.dataset_info(config.data)
  num_classes = info.num_classes
  if config.batch_size % mesh.shape["data"]:
    raise ValueError(f"global batch_size={config.batch_size} is not divisible by the "
                     f"{mesh.shape['data']} devices of the 'data' mesh axis")
  _log(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: "
       f"{jax.process_count()}, mesh: {dict(mesh.shape)}; dataset {info.name} "
       f"({num_classes} classes); model {config.model.name}")

  # --- Model, optimizer, abstract state and its shardings. -------------------
  model = create_model(config, num_classes)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng, eval_rng = jax.random.split(rng, 3)
  abstract_vars = jax.eval_shape(functools.partial(init_variables, model, config), init_rng)
  tx, schedule = optim.build_optimizer(config, abstract_vars["params"])
  loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})

  def init_state(init_rng):
    variables = init_variables(model, config, init_rng)
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"]), "rng": state_rng}

  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = state_shardings(abstract_state, mesh, config.sharding_rules)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_vars["params"]))
  _log(f"parameters: {num_params / 1e6:.3f} M")

  # --- Checkpoints: resume, or initialise (optionally from converted weights). -
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  train_source = datasets.build_source(config.data, "train")
  train_iter = iter(loader.train_dataset(config, train_source))
  latest = manager.latest_step()
  if latest is not None:
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    state = checkpointing.restore(manager, latest, target, train_iter)
    _log(f"resumed from {manager.directory}/{latest} (step {int(state['step'])})")
  else:
    state = jax.jit(init_state, out_shardings=shardings)(init_rng)
    if config.init_from:
      state = _init_from_checkpoint(config.init_from, state, shardings)

  meta = {"model": config.model.name, "num_classes": num_classes,
          "dataset": info.name, "config": json.loads(config.to_json_best_effort())}
  train_step = jax.jit(make_train_step(model, tx, loss_fn, schedule),
                       in_shardings=(shardings, None), out_shardings=(shardings, None),
                       donate_argnums=(0,))
  repl = NamedSharding(mesh, P())
  eval_step = jax.jit(make_eval_step(model, num_classes, info.ignore_index),
                      out_shardings=repl)
  writer = MetricWriter(workdir)

  # --- Train. ----------------------------------------------------------------
  step = int(state["step"])
  total = int(config.total_steps)
  t_last, step_last = time.time(), step
  summary = None
  while step < total:
    batch = loader.to_global(next(train_iter), mesh)
    state, step_metrics = train_step(state, batch)
    step += 1
    if step % config.log_every == 0 or step == total:
      step_metrics = jax.device_get(step_metrics)
      if not np.isfinite(step_metrics["loss"]):
        raise FloatingPointError(f"loss is {step_metrics['loss']} at step {step}")
      now = time.time()
      ips = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
      eta = (total - step) * (now - t_last) / max(step - step_last, 1)
      _log(f"step {step}/{total} | loss {step_metrics['loss']:.4f} | lr "
           f"{step_metrics['lr']:.3e} | {ips:.1f} img/s | ETA {_fmt_eta(eta)}")
      writer.scalars(step, step_metrics, "train/")
      writer.scalars(step, {"images_per_sec": ips}, "train/")
      t_last, step_last = now, step
    is_eval = step % config.eval_every == 0 or step == total
    if is_eval:
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      summary, confusion = evaluate(config, model, eval_step, variables, mesh, info, eval_rng)
      _log(f"eval step {step}: " + ", ".join(
          f"{k} {v:.2f}" for k, v in summary.items() if k != "per_class"))
      writer.scalars(step, {k: v for k, v in summary.items() if k != "per_class"}, "val/")
      writer.flush()
      t_last = time.time()           # evaluation time is not training throughput
    if is_eval or step % config.checkpoint_every == 0:
      checkpointing.save(manager, step, state, train_iter, meta,
                         metrics={"mIoU": summary["mIoU"]} if is_eval else None)
      _log(f"saved checkpoint at step {step}")
  manager.wait_until_finished()

  # --- Final evaluation (also when resumed after the last step was saved). ----
  if summary is None:
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    summary, confusion = evaluate(config, model, eval_step, variables, mesh, info, eval_rng)
  if jax.process_index() == 0:
    _log(metrics_lib.format_table(summary))
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(dict(summary, step=step, dataset=info.name, model=config.model.name), f, indent=1)
    np.save(os.path.join(workdir, "confusion.npy"), confusion)
  _log(f"final validation mIoU: {summary['mIoU']:.2f} (aAcc {summary['aAcc']:.2f}, "
       f"mAcc {summary['mAcc']:.2f}) -> {os.path.join(workdir, 'metrics.json')}")
  if getattr(train_source, "bad_files", None) is not None:
    _log(train_source.bad_files.summary())     # nothing is dropped silently
  writer.close()
  manager.close()
  if hasattr(train_iter, "close"):
    train_iter.close()
  return summary


def _init_from_checkpoint(path: str, state: State, shardings) -> State:
  """Replaces the matching subtrees of params/batch_stats with a converted checkpoint."""
  from offseg_jax.conversion import variables_io  # pylint: disable=g-import-not-at-top
  partial = variables_io.load_variables(path)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  merged, replaced = variables_io.merge_into(variables, partial)
  _log(f"initialised from {path}: replaced {replaced}")
  state = dict(state, params=merged["params"], batch_stats=merged["batch_stats"])
  return jax.device_put(state, shardings)

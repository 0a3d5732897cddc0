"""Training and evaluation loop, top to bottom.

``train_and_evaluate(config, workdir)``:
  1. mesh over all devices from ``config.mesh`` (named axes, e.g. ('data',) or
     ('data', 'fsdp')), process-local input pipeline;
  2. model from the registry; ``jax.eval_shape`` of the init -> shardings from the
     config's ordered (regex -> replicate | fsdp | spec) rules
     (``offseg_jax.sharding``) -> jitted init directly into those shardings;
  3. AdamW with the official parameter groups and warm-up + poly schedule;
  4. resume from ``WORKDIR/checkpoints`` if present (params, optimizer, step and
     RNG, onto this run's mesh; the data order follows from the step), else
     optionally initialise from a converted checkpoint (``config.init_from``);
  5. jitted train step with the state donated (uint8 images normalised on
     device, optional gradient accumulation, float32 state whatever the compute
     dtype; see ``make_train_step``); pairing problems of every split found
     before the first step; periodic evaluation by the batched, sharded
     evaluator (``offseg_jax.evaluation.evaluator``), each step's checkpoint
     saved before it is evaluated; scalars to TensorBoard and
     ``WORKDIR/scalars.jsonl`` (``offseg_jax.metric_log``) + readable log lines;
     checkpoints keeping the last N and the best by mIoU;
  6. final evaluation written to ``WORKDIR/metrics.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from input_pipeline import check as data_check
from input_pipeline import datasets, image_io, loader
from offseg_jax import checkpointing, losses, metric_log, optim, preemption, sharding, workdir_lock
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import metrics as metrics_lib
from offseg_jax.models import layers
from offseg_jax.models.construction import create_model, init_variables, parameter_table

# Train state: a plain dict pytree (big_vision style), saved whole by orbax.
State = dict[str, Any]


# ----------------------------------------------------------------------------
# Model, state and steps.
# ----------------------------------------------------------------------------

# create_model and init_variables live in offseg_jax.models.construction (the
# evaluator and the tools build models without importing the trainer).


def make_train_step(model, tx, loss_fn, schedule, *, grad_accum_steps: int = 1,
                    mean=None, std=None, bn_stat_groups: int = 1):
  """``step(state, batch) -> (state, metrics)``; jit it with the state donated.

  ``batch`` is a loader batch: ``'image'`` uint8 with ``'valid_hw'`` (normalised
  on device with ``mean``/``std``, see ``loader.normalize_on_device``) or float32
  already normalised, and ``'label'`` (uint8 or int32, 255 = ignore).

  Precision: parameters, gradients, optimizer state, losses and metrics are
  float32 whatever the model's compute dtype (``model.dtype``): modules keep
  float32 parameters and cast them to the compute dtype when used, so the
  gradients come back in float32.

  Gradient accumulation (``grad_accum_steps = k > 1``): the batch is split into
  k micro-batches (example i goes to micro-batch i mod k, so each device keeps
  its own examples) that run one after the other under ``lax.scan``, so only
  one micro-batch's activations are alive at a time; gradients are summed in
  float32 and divided by k, losses and metrics averaged, then one optimizer
  update is made. For models without batch statistics and losses that are
  means over equally sized micro-batches (cross-entropy with
  ``avg_non_ignore=False``), this equals one step on the whole batch to float
  rounding. Models with BatchNorm normalise each micro-batch with its own
  statistics (B/k examples, as B/k per-GPU batches would without SyncBN) and
  update their running averages k times per step; losses normalised by the
  number of labelled pixels (``avg_non_ignore=True``) weight micro-batches
  equally rather than by their labelled pixels. Dropout/drop-path masks are
  drawn per micro-batch.
  """
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def loss_and_grads(params, batch_stats, images, labels, step, rng):
    dropout_rng, ham_rng = jax.random.split(rng)

    def compute_loss(params):
      with layers.batch_stat_groups(bn_stat_groups):
        (logits, aux), new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats}, images,
            train=True, rngs={"dropout": dropout_rng, "ham": ham_rng},
            mutable=["batch_stats"])
      loss, terms = loss_fn(logits, aux, labels, step=step)
      return loss, (terms, new_vars.get("batch_stats", batch_stats))

    (loss, (terms, new_stats)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(params)
    return loss, terms, new_stats, grads

  def accumulate(state, images, labels, rng):
    n = images.shape[0]
    if n % k:
      raise ValueError(f"a batch of {n} examples does not split into "
                       f"grad_accum_steps={k} micro-batches")

    def split(x):                       # (n, ...) -> (k, n / k, ...), example i -> i mod k
      return x.reshape((n // k, k) + x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      grad_sum, batch_stats = carry
      index, micro_images, micro_labels = xs
      loss, terms, batch_stats, grads = loss_and_grads(
          state["params"], batch_stats, micro_images, micro_labels, state["step"],
          jax.random.fold_in(rng, index))
      grad_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (grad_sum, batch_stats), (loss, terms)

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
    (grad_sum, batch_stats), (losses_k, terms_k) = jax.lax.scan(
        body, (zeros, state["batch_stats"]), (jnp.arange(k), split(images), split(labels)))
    grads = jax.tree_util.tree_map(lambda g, p: (g / k).astype(p.dtype), grad_sum, state["params"])
    terms = jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), terms_k)
    return jnp.mean(losses_k), terms, batch_stats, grads

  def train_step(state: State, batch):
    images, labels = loader.device_batch(batch, mean, std)
    rng = jax.random.fold_in(state["rng"], state["step"])
    if k == 1:
      loss, terms, batch_stats, grads = loss_and_grads(
          state["params"], state["batch_stats"], images, labels, state["step"], rng)
    else:
      loss, terms, batch_stats, grads = accumulate(state, images, labels, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                     step=state["step"] + 1)
    out = {"loss": loss, "lr": schedule(state["step"]), "grad_norm": optax.global_norm(grads)}
    out.update({f"loss_{name}": v for name, v in terms.items()})
    return new_state, out

  return train_step


BATCHNORM_STATISTICS = ("global", "per_device")


def config_train_step(config, model, tx, loss_fn, schedule, mesh=None):
  """:func:`make_train_step` with the config's accumulation, data statistics
  and BatchNorm statistics (``config.batchnorm_statistics``: 'global', SyncBN
  as the official recipes train, or 'per_device' over ``mesh``'s batch axes)."""
  stats = config.get("batchnorm_statistics", "global")
  if stats not in BATCHNORM_STATISTICS:
    raise ValueError(f"config.batchnorm_statistics={stats!r}: expected one of "
                     f"{BATCHNORM_STATISTICS}")
  groups = 1
  if stats == "per_device":
    if mesh is None:
      raise ValueError("config.batchnorm_statistics='per_device' needs the mesh")
    groups = sharding.batch_devices(config, mesh)
  return make_train_step(model, tx, loss_fn, schedule,
                         grad_accum_steps=int(config.get("grad_accum_steps", 1)),
                         mean=tuple(config.data.mean), std=tuple(config.data.std),
                         bn_stat_groups=groups)


def make_init_state(model, config, tx, state_rng):
  """``init_state(init_rng) -> State``: fresh variables and optimizer state.

  Everything in the state is float32 (or int32 counters) whatever the model's
  compute dtype. Jit it with ``out_shardings`` to initialise directly into the
  parameter placement, or ``jax.eval_shape`` it for the abstract state.
  """

  def init_state(init_rng):
    variables = init_variables(model, config, init_rng)
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"]), "rng": state_rng}

  return init_state


def check_data(config, splits=("train", "val")) -> None:
  """Finds the pairing problems of every split before the first step.

  An image without its label (or a split-file entry without its image) in any
  split ends the run here, with the check tool's one-line message, instead of
  at the first evaluation after hours of training; with
  ``data.skip_bad_files=True`` the files are left out and counted in the log.
  Labels without images are only reported (nothing would read them). Files
  that are present but unreadable are found when read (training skips or
  stops on them; see :class:`offseg_jax.evaluation.evaluator.Evaluator` for
  evaluation).
  """
  skip = bool(config.data.get("skip_bad_files", False))
  for split in splits:
    problems = data_check.pairing_problems(config.data, split)
    blocking = [p for p in problems if p.kind != data_check.ORPHAN_LABEL]
    orphans = len(problems) - len(blocking)
    if orphans:
      _log(f"{split}: {orphans} label file(s) without an image, e.g. "
           f"{[p for p in problems if p.kind == data_check.ORPHAN_LABEL][0]}")
    if blocking and not skip:
      more = f" (and {len(blocking) - 1} more in {split!r})" if len(blocking) > 1 else ""
      raise image_io.BadFileError(
          blocking[0].path, f"{blocking[0].problem}{more}; list them with python -m "
          "input_pipeline.check, or set data.skip_bad_files=True to skip them",
          blocking[0].kind)
    if blocking:
      _log(f"{split}: skipping {len(blocking)} unpaired file(s) (data.skip_bad_files=True), "
           f"e.g. {blocking[0]}")


def validate(evaluator: evaluator_lib.Evaluator, state: State) -> evaluator_lib.EvalResult:
  """Scores the validation split with the state's variables (every image
  exactly once, on every device of every process)."""
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return evaluator.evaluate(variables, "val")


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

class LossWatch:
  """Stops training at the first non-finite loss, so that none is ever saved.

  Each step's loss is read one step late (while the next step runs, so the
  check costs no device idle time); :meth:`check_all` reads the rest and runs
  before every checkpoint.
  """

  def __init__(self):
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, loss: jax.Array) -> None:
    self._pending.append((step, loss))
    if len(self._pending) > 1:
      self._check(self._pending[:-1])
      self._pending = self._pending[-1:]

  def check_all(self) -> None:
    self._check(self._pending)
    self._pending = []

  @staticmethod
  def _check(items) -> None:
    for step, loss in items:
      value = float(jax.device_get(loss))
      if not np.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}")


@contextlib.contextmanager
def lock_workdir(workdir: epath.Path):
  """Holds ``WORKDIR/lock.json`` from process 0 for the run (every process
  raises ``WorkdirBusyError`` if another run holds it)."""
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = ""
  if lock is not None:
    try:
      lock.acquire()
    except workdir_lock.WorkdirBusyError as e:
      error = str(e)
  if jax.process_count() > 1:
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
      error = f"workdir {workdir} is in use by another run (see process 0's log)"
  if error:
    raise workdir_lock.WorkdirBusyError(error)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns
  the final validation summary (also written to ``WORKDIR/metrics.json``).

  ``workdir`` is any ``etils.epath`` path (local or ``gs://``). Raises
  ``workdir_lock.WorkdirBusyError`` when another run holds the workdir,
  ``preemption.Preempted`` after saving a checkpoint on SIGTERM, and
  ``FloatingPointError`` at the first non-finite loss (no checkpoint of that
  step or later is written).
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock_workdir(workdir), preemption.PreemptionWatcher() as preempt:
    return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config, workdir: epath.Path, preempt) -> dict:
  mesh = sharding.make_mesh(config)
  info = datasets.dataset_info(config.data)
  num_classes = info.num_classes
  sharding.check_batch_split(config, mesh)
  _log(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: "
       f"{jax.process_count()}, mesh: {dict(mesh.shape)}; dataset {info.name} "
       f"({num_classes} classes); model {config.model.name}")
  check_data(config)                # unpaired files of any split: now, not after training

  # --- Model, optimizer, abstract state and its shardings. -------------------
  model = create_model(config, num_classes)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng, _ = jax.random.split(rng, 3)   # (evaluation seeds from config.seed)
  abstract_vars = jax.eval_shape(functools.partial(init_variables, model, config), init_rng)
  tx, schedule = optim.build_optimizer(config, abstract_vars["params"])
  loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})

  init_state = make_init_state(model, config, tx, state_rng)
  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = sharding.config_state_shardings(abstract_state, mesh, config)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_vars["params"]))
  _log(f"parameters: {num_params / 1e6:.3f} M; {sharding.placement_summary(abstract_state, shardings)}")
  if jax.process_index() == 0:      # the per-parameter table goes to a file, not the log
    table_path = workdir / "parameters.txt"
    table_path.write_text(parameter_table(abstract_vars["params"]) + "\n")
    _log(f"parameter table: {table_path}")

  # --- Checkpoints: resume, or initialise (optionally from converted weights). -
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    state = checkpointing.restore(manager, latest, target)
    _log(f"resumed from {manager.directory}/{latest} (step {int(state['step'])})")
  else:
    state = jax.jit(init_state, out_shardings=shardings)(init_rng)
    if config.init_from:
      state = _init_from_checkpoint(config.init_from, state, shardings)
  # The example order is a function of (seed, step): the loader starts at the
  # restored step whatever the process count that saved it.
  train_source = datasets.build_source(config.data, "train")
  train_iter = iter(loader.train_dataset(config, train_source, start_step=int(state["step"])))

  meta = {"model": config.model.name, "num_classes": num_classes,
          "dataset": info.name, "config": json.loads(config.to_json_best_effort())}
  train_step = jax.jit(config_train_step(config, model, tx, loss_fn, schedule, mesh),
                       in_shardings=(shardings, None), out_shardings=(shardings, None),
                       donate_argnums=(0,))
  # One evaluator for the whole run: its plan of the split and its compiled
  # steps are reused at every evaluation.
  evaluator = evaluator_lib.Evaluator(model, config, mesh=mesh, log=_log)
  writer = metric_log.MetricLog(workdir, start_step=int(state["step"]))

  def validate_and_record(step):
    """Validates, attaches mIoU to the step's checkpoint, logs; (summary, confusion)."""
    result = validate(evaluator, state)
    checkpointing.record_metrics(manager, step, {"mIoU": result.summary["mIoU"]})
    _log(f"eval step {step}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in result.summary.items() if k != "per_class"))
    writer.scalars(step, {k: v for k, v in result.summary.items() if k != "per_class"}, "val/")
    writer.scalars(step, {"images_per_sec": result.images_per_s}, "val/")
    writer.flush()
    return result.summary, result.confusion

  # --- Train. ----------------------------------------------------------------
  step = int(state["step"])
  total = int(config.total_steps)
  summary = None
  if (latest is not None and 0 < step < total and step % config.eval_every == 0
      and not checkpointing.has_metrics(manager, step)):
    # The interrupted run saved this step but stopped before evaluating it.
    summary, confusion = validate_and_record(step)
  t_last, step_last = time.time(), step
  loss_watch = LossWatch()
  batch_axes = sharding.batch_partition(config, mesh)
  try:
    while step < total:
      batch = loader.to_global(next(train_iter), mesh, axis=batch_axes)
      state, step_metrics = train_step(state, batch)
      step += 1
      loss_watch.add(step, step_metrics["loss"])
      if step % config.log_every == 0 or step == total:
        step_metrics = jax.device_get(step_metrics)
        now = time.time()
        ips = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
        eta = (total - step) * (now - t_last) / max(step - step_last, 1)
        _log(f"step {step}/{total} | loss {step_metrics['loss']:.4f} | lr "
             f"{step_metrics['lr']:.3e} | {ips:.1f} img/s | ETA {_fmt_eta(eta)}")
        writer.scalars(step, step_metrics, "train/")
        writer.scalars(step, {"images_per_sec": ips}, "train/")
        t_last, step_last = now, step
      preempted = preempt.reached(step)
      is_eval = step % config.eval_every == 0 or step == total
      if is_eval or step % config.checkpoint_every == 0 or preempted:
        loss_watch.check_all()            # a non-finite loss never reaches a checkpoint
        # Saved before evaluating: an evaluation that fails costs no training.
        checkpointing.save(manager, step, state, meta, force=preempted)
        writer.flush()      # the curve up to every checkpoint survives a kill
        _log(f"saved checkpoint at step {step}")
      if preempted:
        manager.wait_until_finished()
        raise preemption.Preempted(step, manager.directory)
      if is_eval:
        summary, confusion = validate_and_record(step)
        t_last = time.time()           # evaluation time is not training throughput
  except FloatingPointError as e:
    manager.wait_until_finished()
    raise FloatingPointError(
        f"{e}: training stopped; the last checkpoint written is step "
        f"{manager.latest_step()} in {manager.directory}") from None
  finally:
    # Whatever ends the loop (an error, a preemption), a checkpoint being
    # written completes on disk: saves are asynchronous.
    manager.wait_until_finished()

  # --- Final evaluation (also when resumed after the last step was saved). ----
  if summary is None:
    result = validate(evaluator, state)
    summary, confusion = result.summary, result.confusion
  if jax.process_index() == 0:
    _log(metrics_lib.format_table(summary))
    (workdir / "metrics.json").write_text(json.dumps(
        dict(summary, step=step, dataset=info.name, model=config.model.name), indent=1))
    with (workdir / "confusion.npy").open("wb") as f:
      np.save(f, confusion)
  _log(f"final validation mIoU: {summary['mIoU']:.2f} (aAcc {summary['aAcc']:.2f}, "
       f"mAcc {summary['mAcc']:.2f}) -> {workdir / 'metrics.json'}")
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

"""The evaluator used by training, ``evaluate`` and ``predict``.

:class:`Evaluator` scores a split with mmsegmentation's test semantics (whole,
slide, multi-scale + flip) as batched, jitted steps over every device of every
host:

1. the sizes of all images are read from file headers and a
   :class:`~offseg_jax.evaluation.geometry.Plan` puts them into static shape
   buckets and global batches (the same plan on every process);
2. each process loads its share of every batch through the grain pipeline of
   :class:`input_pipeline.loader.EvalBatches` (decode, test resize, padding in
   threads, ahead of the devices);
3. the :class:`~offseg_jax.evaluation.engine.Engine` runs the model and adds
   each batch's confusion matrix to a per-device int32 accumulator (flushed to
   int64 on the host long before it could overflow);
4. the per-process totals are summed over all processes once, at the end, and
   summarised with mmseg ``IoUMetric`` semantics.

Every image is scored exactly once whatever the number of processes and
devices, and with the same result: an image's bucket and random streams depend
only on the image. The evaluation log line gives images/s and the compile
count (at most one model compile per bucket and mode).

Bad files: a validation file that cannot be read ends the evaluation (on every
process) with its one-line message, after the whole split was seen; with
``data.skip_bad_files=True`` it is left out of the metrics and counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import datasets, image_io, loader
from offseg_jax import checkpointing
from offseg_jax.evaluation import engine as engine_lib
from offseg_jax.evaluation import geometry as geometry_lib
from offseg_jax.evaluation import metrics
from offseg_jax.models import construction

# Device confusion counts are int32: flush them to the host's int64 total before
# any device could have counted this many pixels.
_FLUSH_PIXELS = (1 << 31) - 1


@dataclasses.dataclass
class EvalResult:
  """What an evaluation found.

  Attributes:
    summary: :func:`metrics.summarize`'s dict (percent).
    confusion: int64 [K, K] over the whole split (rows: ground truth).
    num_images: images scored (over all processes).
    bad_files: one-line messages of files left out (skip_bad_files).
    seconds: wall time of the evaluation.
    compiles: steps compiled during this evaluation.
    model_compiles: distinct model forwards compiled so far (all evaluations).
    buckets: distinct view buckets of the split.
    num_bad_files: files left out, over all processes (``bad_files`` lists
      those seen here and the first of every other process).
  """
  summary: dict
  confusion: np.ndarray
  num_images: int
  bad_files: list[str]
  seconds: float
  compiles: int
  model_compiles: int
  buckets: int
  num_bad_files: int = 0

  @property
  def images_per_s(self) -> float:
    return self.num_images / max(self.seconds, 1e-9)


def metric_names(config) -> tuple[str, ...]:
  """``config.eval.metrics`` (default mIoU), validated."""
  names = tuple(config.eval.get("metrics", ("mIoU",)) or ("mIoU",))
  unknown = [m for m in names if m not in metrics.ALL_METRICS]
  if unknown:
    raise ValueError(f"Unknown config.eval.metrics {unknown}; choose from {metrics.ALL_METRICS}")
  return names


def summarize(confusion: np.ndarray, config, info) -> dict:
  """mmseg's summary of an accumulated confusion matrix for ``config.eval``."""
  return metrics.summarize(confusion, info.class_names, metric_names(config),
                           nan_to_num=config.eval.get("nan_to_num", None))


def _local_rows(array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local-data order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:                    # replicas of a row block count once
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def _host_rows(per_slot: list, slots: int) -> list[np.ndarray]:
  """Per-slot outputs (this process's devices, one image each) -> per host row.

  Host row ``r`` of a batch lives on local device ``r // slots``, slot
  ``r % slots`` (the loader's rows are laid out device after device)."""
  fetched = [_local_rows(x) for x in per_slot]
  return [fetched[r % slots][r // slots] for r in range(len(fetched[0]) * slots)]


def _gather_messages(messages: list[str], count: int) -> tuple[int, list[str]]:
  """Total count and the first message of every process (one collective)."""
  if jax.process_count() == 1:
    return count, messages
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = loader.encode_error(messages[0] if messages else "")
  gathered = multihost_utils.process_allgather(
      np.concatenate([np.asarray([count], np.int32), first.astype(np.int32)]))
  gathered = np.asarray(gathered).reshape(jax.process_count(), -1)
  total = int(gathered[:, 0].sum())
  firsts = [loader.decode_error(row[1:]) for row in gathered]
  return total, [m for m in firsts if m] or messages


def run_step(engine: engine_lib.Engine, variables, host: dict,
             shape: geometry_lib.BatchShape, acc, consts, *, tta: bool, window_group: int = 1,
             with_scores: bool = False):
  """Runs one host batch (``Geometry.keys`` arrays) through ``engine``.

  Args:
    engine: the model's engine.
    variables: replicated model variables.
    host: this process's arrays of the batch.
    shape: the batch's static shape.
    acc: the (D, K, K) confusion accumulator.
    consts: replicated ``(key, mean, std)``.
    tta: average softmax over the views (else one view's logits).
    window_group: slide window slots per model call.
    with_scores: also return the per-pixel scores.

  Returns:
    ``(acc, preds, scores)``: per slot ``j`` of the devices' rows, the (D, h, w)
    predictions of the devices' ``j``-th images (and their scores when asked).
  """
  def to_global(array):
    return jax.make_array_from_process_local_data(engine.data, np.ascontiguousarray(array))

  dev = {k: to_global(v) for k, v in host.items()
         if k not in ("batch", "error") and not k.startswith(("image", "hw"))}
  key, mean, std = consts
  b = host["index"].shape[0]
  views, static = [], []
  for v, vs in enumerate(shape.views):
    view = {f"{axis}_{part}": dev[f"{axis}{v}_{part}"] for axis in ("rows", "cols")
            for part in ("i0", "i1", "w")}
    if vs.window is None:
      images = to_global(host[f"image{v}"][:, None])
      hw = to_global(host[f"hw{v}"][:, None])
      sub = to_global(np.full((b, 1), v * engine_lib.SLOTS_PER_VIEW, np.int32))
      view["logits"] = engine.forward(variables, images, hw, dev["index"], sub, key, mean, std)
    else:
      chunks = engine.windows(to_global(host[f"image{v}"]), dev[f"origins{v}"],
                              dev[f"win_hw{v}"], window=vs.window, group=window_group, view=v)
      view["logits"] = tuple(
          engine.forward(variables, crops, valid_hw, dev["index"], sub, key, mean, std)
          for crops, valid_hw, sub in chunks)
      view["origins"] = dev[f"origins{v}"]
    views.append(view)
    static.append((vs.bucket, vs.window, bool(tta)))
  preds, scores = [], []
  for j in range(shape.per_device):
    slot = jax.device_put(np.int32(j), engine.replicated)
    acc, *out = engine.finish(acc, views, dev["label"], dev["mask"], dev["label_hw"], slot,
                              static=tuple(static), with_scores=with_scores)
    preds.append(out[0])
    if with_scores:
      scores.append(out[1])
  return acc, preds, scores


def constants(engine: engine_lib.Engine, seed: int, mean, std):
  """Replicated ``(key, mean, std)`` for :func:`run_step`."""
  values = (np.asarray(jax.random.PRNGKey(int(seed))), np.asarray(mean, np.float32),
            np.asarray(std, np.float32))
  return tuple(jax.device_put(x, engine.replicated) for x in values)


class Evaluator:
  """Scores a model on dataset splits (and predicts images) on a device mesh.

  Create it once and call :meth:`evaluate` at every evaluation: the plan of a
  split and the compiled steps are reused.

  Args:
    model: a registered model (or any object with ``apply`` following the
      registry interface).
    config: experiment config (``config.data``, ``config.eval``, ``seed``).
    mesh: the training mesh (its devices, in order, become a 1-D 'data' mesh),
      or None for all devices.
    devices: explicit devices instead (e.g. one device in tests).
    mode, tta: override ``config.eval.mode`` / ``config.eval.tta``.
    shard: ``(index, count)`` to score only that share of every batch without
      the cross-process sum, as process ``index`` of ``count`` would (tests
      simulate processes this way).
    log: where progress lines go (process 0), e.g. ``print``; None: silent.
  """

  def __init__(self, model, config, *, mesh=None, devices=None, mode: str | None = None,
               tta: bool | None = None, shard: tuple[int, int] | None = None,
               log: Callable[[str], None] | None = None):
    self.model = model
    self.config = config
    self.info = datasets.dataset_info(config.data)
    self.settings = geometry_lib.InferenceSettings.from_config(config.eval, mode=mode, tta=tta)
    self.divisor = math.lcm(construction.size_divisor(model), self.settings.size_divisor or 1)
    self.mesh = engine_lib.eval_mesh(mesh, devices)
    apply_fn = model.apply if hasattr(model, "apply") else model
    self.engine = engine_lib.get_engine(apply_fn, self.mesh, self.divisor,
                                        self.info.ignore_index)
    self.geometry = geometry_lib.Geometry(self.settings, self.divisor,
                                          tuple(config.data.get("test_scale", ()) or ()))
    self.shard = shard
    self.log = log
    self.seed = int(config.get("seed", 0))
    per_device = -(-self.settings.batch_size // self.engine.num_devices)
    self.batch_size = per_device * self.engine.num_devices      # global, this mesh
    # Slide windows per model call: one slot of every image of the step, or for
    # small steps several slots, up to eval.batch_size windows.
    self.window_group = max(1, self.settings.batch_size // self.batch_size)
    self._batches: dict[tuple, loader.EvalBatches] = {}

  # --- plumbing ------------------------------------------------------------------

  def _processes(self) -> tuple[int, int]:
    if self.shard is not None:
      return int(self.shard[0]), int(self.shard[1])
    return jax.process_index(), jax.process_count()

  def batches(self, split: str = "val", max_images: int | None = None,
              source=None) -> loader.EvalBatches:
    """The (cached) bucketed batches of a split, or of ``source``."""
    key = (split, max_images, id(source) if source is not None else None)
    if key not in self._batches:
      index, count = self._processes()
      # A simulated process feeds the whole mesh with its share.
      simulated = count if self.shard is not None else 1
      self._batches[key] = loader.EvalBatches(
          self.config, split, geometry=self.geometry, batch_size=self.batch_size * simulated,
          process_index=index, num_processes=count,
          num_devices=self.engine.num_devices * simulated, source=source,
          max_images=max_images)
    return self._batches[key]

  def place(self, variables):
    """``variables`` replicated on this evaluator's mesh (no copy if they are)."""
    return jax.device_put(variables, self.engine.replicated)

  def _step(self, variables, host: dict, shape: geometry_lib.BatchShape, acc, consts,
            with_scores: bool = False):
    return run_step(self.engine, variables, host, shape, acc, consts,
                    tta=self.settings.tta, window_group=self.window_group,
                    with_scores=with_scores)

  def _consts(self):
    return constants(self.engine, self.seed, self.config.data.mean, self.config.data.std)

  def run(self, variables, batches: loader.EvalBatches,
          on_batch: Callable[[dict, list, list | None], None] | None = None,
          with_scores: bool = False, progress: bool = False
          ) -> tuple[np.ndarray, list[str], int]:
    """Runs every batch; returns (this process's int64 confusion, bad-file
    messages seen here, examples scored here). ``on_batch(host_batch, outputs)``
    sees each batch with, per host row, its prediction (and scores when asked)
    cropped to its label bucket; ``progress`` shows a bar of batches (process 0)."""
    variables = self.place(variables)
    consts = self._consts()
    k = self.info.num_classes
    acc = self.engine.zeros(k)
    total = np.zeros((k, k), np.int64)
    counted, errors, scored = 0, [], 0

    def flush(acc):
      return total + _local_rows(acc).sum(axis=0, dtype=np.int64)

    iterator = iter(batches)
    if progress and (jax.process_index() == 0 or self.shard is not None):
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      iterator = tqdm(iterator, total=len(batches), desc=f"eval {batches.split}", unit="batch")
    for host in iterator:
      shape = batches.shape(host)
      pixels = shape.per_device * shape.label[0] * shape.label[1]   # at most, per device
      if counted + pixels > _FLUSH_PIXELS:        # the same batches on every process
        total = flush(acc)
        acc, counted = self.engine.zeros(k), 0
      errors += [loader.decode_error(e) for e in host["error"] if e.any()]
      scored += int(np.sum(host["mask"]))
      acc, preds, scores = self._step(variables, host, shape, acc, consts, with_scores)
      counted += pixels
      if on_batch is not None:
        on_batch(host, _host_rows(preds, shape.per_device),
                 _host_rows(scores, shape.per_device) if with_scores else None)
    total = flush(acc)
    return total, errors, scored

  # --- evaluation --------------------------------------------------------------------

  def evaluate(self, variables, split: str = "val", *, max_images: int | None = None,
               callback: Callable[[dict, np.ndarray], None] | None = None,
               max_callbacks: int | None = None, progress: bool = False) -> EvalResult:
    """Scores ``split``; every image exactly once over all processes.

    Args:
      variables: ``{'params', 'batch_stats'}`` (any placement; replicated here).
      split: dataset split.
      max_images: score only the first ``max_images`` images.
      callback: ``callback(example, prediction)`` for images this process scores
        (the original example from the source, int32 prediction at its size);
        predictions only leave the devices when it is given.
      max_callbacks: stop calling (and fetching) after this many images.
      progress: show a progress bar of batches (process 0).

    Returns:
      :class:`EvalResult`. Raises ``image_io.BadFileError`` (one line) when a
      file could not be read and ``data.skip_bad_files`` is False.
    """
    start = time.perf_counter()
    compiles_before = sum(self.engine.compiles.values())
    batches = self.batches(split, max_images)
    calls = {"n": 0}

    def on_batch(host, pred, _):
      if max_callbacks is not None and calls["n"] >= max_callbacks:
        return
      for row, index in enumerate(host["index"]):
        if index < 0 or not host["mask"][row]:
          continue
        if max_callbacks is not None and calls["n"] >= max_callbacks:
          return
        example = loader._load_example(batches.source, int(index))  # pylint: disable=protected-access
        h, w = (int(v) for v in host["label_hw"][row])
        callback(example, pred[row][:h, :w])
        calls["n"] += 1

    confusion, errors, scored = self.run(variables, batches,
                                         on_batch if callback is not None else None,
                                         progress=progress)
    if self.shard is None:                  # the one cross-process reduction
      confusion = metrics.process_sum(confusion)
      scored = int(metrics.process_sum(np.asarray([[scored]], np.int64))[0, 0])
      num_read_errors, errors = _gather_messages(errors, len(errors))
    else:
      num_read_errors = len(errors)
    # Files that could not be sized, and unpaired files a skipping source left
    # out, are known identically on every process: counted once.
    known = [batches.errors[i] for i in sorted(batches.errors)]
    source_log = getattr(batches.source, "bad_files", None)
    known += [str(e) for e in source_log.errors] if source_log is not None else []
    bad = known + errors
    num_bad = len(known) + num_read_errors
    if num_bad and not self.config.data.get("skip_bad_files", False):
      path, _, problem = bad[0].partition(": ")
      raise image_io.BadFileError(
          path, f"{problem} ({num_bad} bad file{'s' if num_bad > 1 else ''} in split "
          f"{split!r}; set data.skip_bad_files=True to leave them out of the metrics)",
          "evaluation")
    result = EvalResult(summarize(confusion, self.config, self.info), confusion, scored,
                        bad, time.perf_counter() - start,
                        sum(self.engine.compiles.values()) - compiles_before,
                        self.engine.model_compiles, len(batches.plan.buckets()), num_bad)
    self._log(self.describe(result, split))
    return result

  def describe(self, result: EvalResult, split: str = "val") -> str:
    """The evaluation log line: throughput and compile count."""
    mode = self.settings.mode + (" + TTA" if self.settings.tta else "")
    return (f"evaluated {result.num_images} {split} images in {result.seconds:.1f} s "
            f"({result.images_per_s:.1f} img/s) on {self.engine.num_devices} devices, "
            f"{mode}, {result.buckets} buckets; compiles: {result.compiles} "
            f"(model: {result.model_compiles} in total)" + (
                f"; skipped {result.num_bad_files} bad file"
                f"{'s' if result.num_bad_files > 1 else ''} (data.skip_bad_files=True), "
                f"e.g. {result.bad_files[0]}" if result.num_bad_files else ""))

  def _log(self, message: str):
    if self.log is not None and (jax.process_index() == 0 or self.shard is not None):
      self.log(message)

  # --- prediction ------------------------------------------------------------------------

  def predict(self, variables, source, callback: Callable[[int, dict, np.ndarray], None],
              *, with_scores: bool = False) -> int:
    """Predicts every example of ``source`` this process holds.

    ``source`` has ``len``, ``load(i) -> {'image', 'name', ...}`` (a ``'label'``
    of None or absent) and ideally ``example_size(i) -> (H, W)``; the output
    size is the image's own. ``callback(index, example, prediction)`` gets the
    int32 prediction (or with ``with_scores`` a ``(prediction, scores)`` pair)
    at the image size. Returns the number of images this process predicted.
    """
    batches = self.batches("predict", None, source=source)
    done = {"n": 0}

    def on_batch(host, pred, scores):
      for row, index in enumerate(host["index"]):
        if index < 0:
          continue
        if not host["mask"][row]:
          raise ValueError(loader.decode_error(host["error"][row]) or
                           f"example {int(index)} could not be read")
        h, w = (int(v) for v in host["label_hw"][row])
        out = pred[row][:h, :w]
        if with_scores:
          out = (out, scores[row][:h, :w])
        callback(int(index), loader._load_example(batches.source, int(index)), out)  # pylint: disable=protected-access
        done["n"] += 1

    self.run(variables, batches, on_batch, with_scores=with_scores)
    return done["n"]


# ----------------------------------------------------------------------------
# Loading a checkpoint for evaluation


def load_for_eval(checkpoint: str, config=None, *, which: str = "latest", mesh=None,
                  devices=None):
  """``(config, model, variables, info)`` for evaluating ``checkpoint``.

  Training checkpoints carry their config: with ``config=None`` it is used; a
  given ``config`` must agree with it on the model and the dataset
  (:func:`checkpointing.check_config_matches`; evaluation settings may
  differ). Variables are restored replicated over the evaluation mesh, whatever
  the devices that saved them.
  """
  meta = checkpointing.checkpoint_meta(checkpoint, which)
  if config is None:
    config = checkpointing.config_from_meta(meta)
    if config is None:
      raise ValueError(f"checkpoint {checkpoint} carries no experiment config (a converted "
                       "or older checkpoint); pass --config")
  else:
    checkpointing.check_config_matches(meta, config, f"checkpoint {checkpoint}")
  info = datasets.dataset_info(config.data)
  model = construction.create_model(config, info.num_classes)
  abstract = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                            jax.random.PRNGKey(0))
  replicated = NamedSharding(engine_lib.eval_mesh(mesh, devices), P())
  template = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  variables = checkpointing.load_eval_variables(checkpoint, template, which=which)
  return config, model, variables, info


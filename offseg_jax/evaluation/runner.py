"""Dataset-level evaluation: every validation image scored exactly once.

Process ``p`` of ``P`` takes images ``p, p + P, ...`` of the split, predicts
each at its original label resolution and accumulates an integer confusion
matrix; the matrices are summed over processes (:func:`metrics.process_sum`)
and summarised with mmseg ``IoUMetric`` semantics. :func:`score_predictions`
does the same for a folder of label PNGs written by ``predict`` (or anything
else in the dataset's own label convention).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from input_pipeline import datasets
from input_pipeline import transforms
from offseg_jax.evaluation import inference
from offseg_jax.evaluation import metrics

# Device confusion counts are int32: flush them to the host's int64 total before
# this many labelled pixels could overflow them.
_FLUSH_PIXELS = 1 << 30
_confusion = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))


def _shard(count: int, shard: tuple[int, int] | None) -> range:
  index, total = shard if shard is not None else (jax.process_index(), jax.process_count())
  if not 0 <= index < total:
    raise ValueError(f"shard index {index} out of range for {total} shards")
  return range(index, count, total)


def _prefetched(load: Callable[[int], Any], indices: Sequence[int], workers: int,
                depth: int) -> Iterator[Any]:
  """``load(i)`` for each index in order, computed ``depth`` ahead by threads
  (decoding and resizing release the GIL), so the host overlaps the device."""
  if workers <= 0:
    yield from (load(i) for i in indices)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for i in indices:
      pending.append(pool.submit(load, i))
      if len(pending) > depth:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


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


def load_model(config, checkpoint: str, which: str = "latest"):
  """``(model, variables, info)`` for ``config`` with weights from ``checkpoint``.

  ``checkpoint`` is anything :func:`checkpointing.load_eval_variables` accepts:
  a training workdir (``which``: its latest or best step), a step directory
  (saved on any number of devices) or a converted official checkpoint.
  """
  from offseg_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  info = datasets.dataset_info(config.data)
  model = train.create_model(config, info.num_classes)
  abstract = jax.eval_shape(functools.partial(train.init_variables, model, config),
                            jax.random.PRNGKey(0))
  # Restore onto this process's first device, whatever mesh saved the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  template = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  variables = checkpointing.load_eval_variables(checkpoint, template, which=which)
  return model, variables, info


def evaluate_model(model: Any, variables, config, split: str = "val",
                   mode: str | None = None, tta: bool | None = None,
                   max_images: int | None = None, progress: bool = True,
                   callback: Callable[[dict, np.ndarray], None] | None = None,
                   shard: tuple[int, int] | None = None):
  """Evaluates ``model`` on a split; returns ``(summary, confusion)``.

  Args:
    model: module (or object with ``apply``) following the registry interface.
    variables: its ``{'params', 'batch_stats'}``.
    config: experiment config (``config.data``, ``config.eval``).
    split: dataset split to score.
    mode, tta: override ``config.eval.mode`` / ``config.eval.tta``.
    max_images: score only the first ``max_images`` images of the split.
    progress: show a progress bar (on process 0).
    callback: called as ``callback(example, prediction)`` for every image this
      process scores (original-resolution example, int32 prediction on host);
      used for sample overlays. Host transfers only happen when it is given.
    shard: ``(index, count)`` to score only that shard without cross-process
      reduction (tests simulate processes this way); default: this JAX process
      of all of them, summed over processes.

  Returns:
    ``summary`` as :func:`metrics.summarize`, and the int64 [K, K] confusion
    matrix over the whole split (rows: ground truth).
  """
  info = datasets.dataset_info(config.data)
  source = datasets.build_source(config.data, split)
  transform = transforms.build_eval_transform(config.data)
  settings = inference.InferenceSettings.from_config(config.eval, mode=mode, tta=tta)
  segmenter = inference.Segmenter(model, variables, settings, mean=config.data.mean,
                                  std=config.data.std, seed=int(config.get("seed", 0)))
  num_classes = info.num_classes
  count = len(source) if max_images is None else min(int(max_images), len(source))
  indices = _shard(count, shard)

  def load(index):
    example = source[index]
    # TTA rescales the original image itself; otherwise the test transform resizes.
    return example, (None if settings.tta else transform(dict(example))["image"])

  workers = int(config.data.get("num_threads", 4) or 0)
  total = np.zeros((num_classes, num_classes), np.int64)
  pending, pending_pixels = None, 0
  show = progress and (shard is not None or jax.process_index() == 0)
  loaded = _prefetched(load, indices, workers, depth=2 * max(workers, 1))
  for example, resized in tqdm(loaded, total=len(indices), desc=f"eval {split}",
                               disable=not show, unit="img"):
    label = np.asarray(example["label"])
    if settings.tta:
      pred = segmenter.labels(np.asarray(example["image"]))
    else:
      pred = segmenter.labels(np.asarray(resized), label.shape)
    if pred.shape != label.shape:
      raise ValueError(f"prediction {pred.shape} and label {label.shape} of "
                       f"{example.get('name', '<unnamed example>')!r} differ in size")
    if pending_pixels + label.size > _FLUSH_PIXELS and pending is not None:
      total += np.asarray(pending, np.int64)
      pending, pending_pixels = None, 0
    counts = _confusion(pred, segmenter.put(label), num_classes, info.ignore_index)
    pending = counts if pending is None else pending + counts
    pending_pixels += label.size
    if callback is not None:
      callback(example, np.asarray(pred))
  if pending is not None:
    total += np.asarray(pending, np.int64)
  if shard is None:
    total = metrics.process_sum(total)
  return summarize(total, config, info), total


def read_label_png(path: str | os.PathLike) -> np.ndarray:
  """A single-channel label PNG as uint8 (palette PNGs give their indices)."""
  try:
    with Image.open(path) as image:
      if image.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"{path}: expected a single-channel label PNG, got mode {image.mode}")
      return np.asarray(image).astype(np.int64)
  except (OSError, SyntaxError) as e:
    raise ValueError(f"cannot read label image {path}: {e}") from e


def labels_from_dataset_convention(raw: np.ndarray, reduce_zero_label: bool,
                                   num_classes: int, name: str = "") -> np.ndarray:
  """Raw label PNG values (the dataset's own convention) -> class indices.

  ``reduce_zero_label`` datasets (ADE20K, Pascal-Context-59) store class ``c``
  as ``c + 1``. A predicted value that is no class cannot be scored the way
  mmseg scores model outputs, so it is an error naming the file.
  """
  labels = raw - 1 if reduce_zero_label else raw
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    values = np.unique(raw[bad])[:8].tolist()
    expect = f"1..{num_classes}" if reduce_zero_label else f"0..{num_classes - 1}"
    raise ValueError(f"{name}: values {values} are not classes (expected {expect})")
  return labels


def score_predictions(pred_dir: str | os.PathLike, config, split: str = "val",
                      max_images: int | None = None, progress: bool = True,
                      shard: tuple[int, int] | None = None):
  """Scores a folder of prediction PNGs against ``split``; ``(summary, confusion)``.

  Each example ``name`` of the split needs ``pred_dir/<name>.png`` (the same
  stems ``predict`` writes, in the dataset's label convention: +1 for
  reduce_zero_label datasets). Missing files are an error listing them.
  """
  pred_dir = Path(pred_dir)
  info = datasets.dataset_info(config.data)
  source = datasets.build_source(config.data, split)
  count = len(source) if max_images is None else min(int(max_images), len(source))
  indices = _shard(count, shard)
  total = np.zeros((info.num_classes, info.num_classes), np.int64)
  missing = []
  show = progress and (shard is not None or jax.process_index() == 0)
  for index in tqdm(indices, desc="score", disable=not show, unit="img"):
    example = source[index]
    path = pred_dir / f"{example['name']}.png"
    if not path.exists():
      missing.append(path.name)
      continue
    pred = labels_from_dataset_convention(read_label_png(path), info.reduce_zero_label,
                                          info.num_classes, str(path))
    label = np.asarray(example["label"])
    if pred.shape != label.shape:
      raise ValueError(f"{path}: prediction {pred.shape} and label {label.shape} differ in size")
    total += metrics.confusion_matrix_np(pred, label, info.num_classes, info.ignore_index)
  if missing:
    raise FileNotFoundError(f"{len(missing)} of {len(indices)} predictions missing in "
                            f"{pred_dir}, e.g. {missing[:5]}")
  if shard is None:
    total = metrics.process_sum(total)
  return summarize(total, config, info), total

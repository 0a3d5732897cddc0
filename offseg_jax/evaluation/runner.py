"""Scoring folders of predictions, and the evaluator's functional entry points.

:func:`evaluate_model` and :func:`load_model` are conveniences over
:class:`offseg_jax.evaluation.evaluator.Evaluator` (the one evaluation path of
training, ``evaluate`` and ``predict``). :func:`score_predictions` scores a
folder of label PNGs written by ``predict`` (or anything else in the dataset's
own label convention) against a split: process ``p`` of ``P`` takes images
``p, p + P, ...``; the confusion matrices are summed over processes
(:func:`metrics.process_sum`) and summarised with mmseg ``IoUMetric`` semantics.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from etils import epath
import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from input_pipeline import datasets
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import metrics

metric_names = evaluator_lib.metric_names
summarize = evaluator_lib.summarize


def _shard(count: int, shard: tuple[int, int] | None) -> range:
  index, total = shard if shard is not None else (jax.process_index(), jax.process_count())
  if not 0 <= index < total:
    raise ValueError(f"shard index {index} out of range for {total} shards")
  return range(index, count, total)


def load_model(config, checkpoint: str, which: str = "latest"):
  """``(model, variables, info)`` for ``config`` with weights from ``checkpoint``.

  ``checkpoint`` is anything :func:`checkpointing.load_eval_variables` accepts:
  a training workdir (``which``: its latest or best step), a step directory
  (saved on any number of devices) or a converted official checkpoint. A
  ``config`` that disagrees with the checkpoint's own on the model or the
  dataset is refused (see :func:`evaluator.load_for_eval`).
  """
  _, model, variables, info = evaluator_lib.load_for_eval(checkpoint, config, which=which)
  return model, variables, info


def evaluate_model(model: Any, variables, config, split: str = "val",
                   mode: str | None = None, tta: bool | None = None,
                   max_images: int | None = None, progress: bool = True,
                   callback: Callable[[dict, np.ndarray], None] | None = None,
                   shard: tuple[int, int] | None = None):
  """Evaluates ``model`` on a split with :class:`evaluator.Evaluator`;
  returns ``(summary, confusion)``.

  Args:
    model: module (or object with ``apply``) following the registry interface.
    variables: its ``{'params', 'batch_stats'}``.
    config: experiment config (``config.data``, ``config.eval``).
    split: dataset split to score.
    mode, tta: override ``config.eval.mode`` / ``config.eval.tta``.
    max_images: score only the first ``max_images`` images of the split.
    progress: show a progress bar (on process 0).
    callback: called as ``callback(example, prediction)`` for every image this
      process scores (original example, int32 prediction on host); predictions
      only leave the devices when it is given.
    shard: ``(index, count)`` to score only that share without cross-process
      reduction (tests simulate processes this way); default: this JAX process
      of all of them, summed over processes.

  Returns:
    ``summary`` as :func:`metrics.summarize`, and the int64 [K, K] confusion
    matrix over the whole split (rows: ground truth).
  """
  evaluator = evaluator_lib.Evaluator(model, config, mode=mode, tta=tta, shard=shard)
  result = evaluator.evaluate(variables, split, max_images=max_images, callback=callback,
                              progress=progress)
  return result.summary, result.confusion


def read_label_png(path: str | os.PathLike) -> np.ndarray:
  """A single-channel label PNG as uint8 (palette PNGs give their indices)."""
  try:
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
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
  pred_dir = epath.Path(pred_dir)
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

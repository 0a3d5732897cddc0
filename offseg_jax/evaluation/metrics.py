"""Confusion-matrix accumulation and mmsegmentation ``IoUMetric`` summaries.

The jitted part is :func:`confusion_matrix`: an integer [K, K] matrix (rows =
ground truth, columns = prediction) of the valid pixels of a batch. Hosts pull
one small matrix per batch and sum in int64 numpy, so no count overflows on big
splits. :func:`summarize` turns the accumulated matrix into mmseg's numbers:

  intersect = diag, pred_area = column sums, label_area = row sums,
  union = pred + label - intersect;
  aAcc = sum(I) / sum(label); IoU = I/U; Acc = Recall = I/label;
  Dice = 2I/(pred+label); Precision = I/pred; Fscore = (1+b^2)PR/(b^2 P + R);
  0/0 -> NaN; summary mX = round(nanmean(X) * 100, 2) (NaN classes skipped).

:class:`IoUMetric` wraps this as a stateful accumulator with mmseg's arguments;
it is registered as ``METRICS['iou_metric']`` (the ``build`` name of the parity
fixture), and :func:`iou_metric_from_fixture` replays that fixture.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.registry import METRICS

ALL_METRICS = ("mIoU", "mDice", "mFscore")


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = 255,
                     valid=None):
  """Jittable int32 [K, K] confusion matrix of one batch.

  Args:
    pred: integer predictions, any shape.
    label: integer labels, same shape; ``ignore_index`` (and any value outside
      [0, K)) is not counted.
    num_classes: K.
    ignore_index: label value to skip.
    valid: optional boolean mask broadcastable to ``label`` (e.g. the per-example
      mask of padded evaluation batches).
  """
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  ok = (label != ignore_index) & (label >= 0) & (label < num_classes)
  ok = ok & (pred >= 0) & (pred < num_classes)
  if valid is not None:
    ok = ok & jnp.broadcast_to(valid, label.shape)
  index = jnp.where(ok, label * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix_np(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = 255) -> np.ndarray:
  """Host (numpy, int64) version of :func:`confusion_matrix` for one image."""
  label = np.asarray(label).astype(np.int64).reshape(-1)
  pred = np.asarray(pred).astype(np.int64).reshape(-1)
  ok = (label != ignore_index) & (label >= 0) & (label < num_classes)
  ok &= (pred >= 0) & (pred < num_classes)
  idx = label[ok] * num_classes + pred[ok]
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes).astype(np.int64)


def areas_from_confusion(confusion: np.ndarray):
  """(intersect, union, pred_area, label_area) per class, as int64."""
  confusion = np.asarray(confusion, dtype=np.int64)
  intersect = np.diag(confusion).copy()
  pred_area = confusion.sum(axis=0)
  label_area = confusion.sum(axis=1)
  union = pred_area + label_area - intersect
  return intersect, union, pred_area, label_area


def _div(a, b):
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.asarray(a, np.float64) / np.asarray(b, np.float64)


def per_class_metrics(confusion: np.ndarray, metrics: Iterable[str] = ("mIoU",),
                      beta: float = 1.0, nan_to_num=None) -> dict[str, np.ndarray]:
  """Per-class fractions (NaN where 0/0) plus scalar ``aAcc``, as mmseg computes them."""
  metrics = tuple(metrics)
  unknown = [m for m in metrics if m not in ALL_METRICS]
  if unknown:
    raise ValueError(f"Unknown metrics {unknown}; choose from {ALL_METRICS}")
  intersect, union, pred_area, label_area = areas_from_confusion(confusion)
  out = {"aAcc": _div(intersect.sum(), label_area.sum())}
  if "mIoU" in metrics:
    out["IoU"] = _div(intersect, union)
    out["Acc"] = _div(intersect, label_area)
  if "mDice" in metrics:
    out["Dice"] = _div(2 * intersect, pred_area + label_area)
    out["Acc"] = _div(intersect, label_area)
  if "mFscore" in metrics:
    precision = _div(intersect, pred_area)
    recall = _div(intersect, label_area)
    with np.errstate(divide="ignore", invalid="ignore"):
      fscore = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    out["Fscore"] = fscore
    out["Precision"] = precision
    out["Recall"] = recall
  if nan_to_num is not None:
    out = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in out.items()}
  return out


def summarize(confusion: np.ndarray, class_names: Sequence[str] | None = None,
              metrics: Iterable[str] = ("mIoU",), beta: float = 1.0,
              nan_to_num=None) -> dict:
  """mmseg's reported numbers: percent, rounded to 2 decimals (half-to-even).

  Returns ``{'aAcc', 'mIoU', 'mAcc', ...: float, 'per_class': {name: {'IoU': ..,
  'Acc': .., ...}}}``; per-class values are percent rounded to 2 decimals, NaN
  for classes absent from both prediction and ground truth.
  """
  confusion = np.asarray(confusion)
  k = confusion.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
  per = per_class_metrics(confusion, metrics, beta, nan_to_num)
  # mmseg computes in float32 and rounds the float32 value; match that.
  summary = {"aAcc": float(np.round(np.float32(per["aAcc"]) * 100, 2))}
  for key, values in per.items():
    if key == "aAcc":
      continue
    v32 = values.astype(np.float32)
    with np.errstate(invalid="ignore"):
      mean = np.nanmean(v32) if np.any(~np.isnan(v32)) else np.float32(np.nan)
    summary["m" + key] = float(np.round(np.float32(mean) * 100, 2))
  summary["per_class"] = {
      name: {key: float(np.round(values[i].astype(np.float32) * 100, 2))
             for key, values in per.items() if key != "aAcc"}
      for i, name in enumerate(names)}
  return summary


def format_table(summary: dict) -> str:
  """A per-class table (name, IoU, Acc, ...) followed by the summary line."""
  per = summary["per_class"]
  cols = list(next(iter(per.values())).keys()) if per else []
  width = max([len("Class")] + [len(n) for n in per]) + 2
  lines = ["Class".ljust(width) + "".join(c.rjust(10) for c in cols)]
  lines.append("-" * len(lines[0]))
  for name, vals in per.items():
    lines.append(name.ljust(width) + "".join(
        ("nan" if np.isnan(vals[c]) else f"{vals[c]:.2f}").rjust(10) for c in cols))
  lines.append("-" * len(lines[0]))
  lines.append("  ".join(f"{k}: {v:.2f}" for k, v in summary.items() if k != "per_class"))
  return "\n".join(lines)


def process_sum(confusion: np.ndarray) -> np.ndarray:
  """Sums a host-local int64 matrix over all JAX processes (identity with one)."""
  if jax.process_count() == 1:
    return confusion
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # int64 is not available on device without x64: split into two int32 halves.
  hi, lo = np.divmod(confusion.astype(np.int64), 1 << 30)
  both = np.stack([hi, lo]).astype(np.int32)
  gathered = multihost_utils.process_allgather(both)   # [P, 2, K, K]
  gathered = np.asarray(gathered, np.int64).sum(axis=0)
  return gathered[0] * (1 << 30) + gathered[1]


class IoUMetric:
  """Host-side accumulator with mmseg ``IoUMetric``'s arguments and results.

  Feed it per-image predictions (:meth:`process`) or ready confusion matrices
  (:meth:`add`); :meth:`compute` sums over processes and returns
  :func:`summarize`'s dict. Counts are int64, so no split is too large.
  """

  def __init__(self, num_classes: int, ignore_index: int = 255,
               iou_metrics: Iterable[str] = ("mIoU",), nan_to_num=None,
               beta: float = 1.0, class_names: Sequence[str] | None = None):
    self.num_classes = int(num_classes)
    self.ignore_index = int(ignore_index)
    self.iou_metrics = tuple(iou_metrics)
    unknown = [m for m in self.iou_metrics if m not in ALL_METRICS]
    if unknown:
      raise ValueError(f"Unknown metrics {unknown}; choose from {ALL_METRICS}")
    self.nan_to_num = nan_to_num
    self.beta = beta
    self.class_names = class_names
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
    self.num_images = 0

  def process(self, pred, label) -> None:
    """Counts one image (integer arrays of the same shape)."""
    self.add(confusion_matrix_np(pred, label, self.num_classes, self.ignore_index))
    self.num_images += 1

  def add(self, confusion) -> None:
    """Adds an already computed [K, K] confusion matrix."""
    self.confusion += np.asarray(confusion, np.int64)

  def per_class(self, reduce_processes: bool = True) -> dict[str, np.ndarray]:
    """Per-class fractions (and ``aAcc``), as ``total_area_to_metrics``."""
    confusion = process_sum(self.confusion) if reduce_processes else self.confusion
    return per_class_metrics(confusion, self.iou_metrics, self.beta, self.nan_to_num)

  def compute(self, reduce_processes: bool = True) -> dict:
    """The reported numbers (see :func:`summarize`)."""
    confusion = process_sum(self.confusion) if reduce_processes else self.confusion
    return summarize(confusion, self.class_names, self.iou_metrics, self.beta,
                     self.nan_to_num)


def iou_metric_from_official(official_config: Mapping[str, Any],
                             num_classes: int) -> IoUMetric:
  """Builds :class:`IoUMetric` given the official (mmseg) constructor arguments.

  Accepts ``iou_metrics``, ``ignore_index``, ``nan_to_num`` and ``beta`` (the
  keys of a fixture's ``metric_args`` too); output/formatting options are
  irrelevant here and ignored.
  """
  cfg = dict(official_config)
  nan_to_num = cfg.get("nan_to_num")
  if isinstance(nan_to_num, (list, tuple)):   # a fixture lists several settings
    nan_to_num = nan_to_num[0]
  return IoUMetric(num_classes, ignore_index=cfg.get("ignore_index", 255),
                   iou_metrics=cfg.get("iou_metrics", ("mIoU",)),
                   nan_to_num=nan_to_num, beta=cfg.get("beta", 1))


METRICS.register("iou_metric", from_official=iou_metric_from_official)(IoUMetric)

_PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")
_SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall")


def _load(npz_or_path):
  if isinstance(npz_or_path, (str, os.PathLike)):
    with epath.Path(npz_or_path).open("rb") as f, np.load(f) as data:
      return {k: data[k] for k in data.files}
  return npz_or_path


def iou_metric_from_fixture(npz, spec) -> dict[str, float]:
  """Replays the ``metrics_iou_ade`` parity fixture; returns the errors.

  Args:
    npz: the fixture's arrays (path or mapping): ``pred/<i>``, ``label/<i>`` and
      the reference ``[nan_to_num_0/]{per_class,table,summary,overall}/*``.
    spec: the fixture's JSON (path or dict) with ``num_classes``,
      ``ignore_index`` and ``metric_args``.

  Returns:
    ``{reference key: error}`` for every reference array: the max relative
    error for ``per_class/*`` and ``overall/aAcc`` (``inf`` when the NaN
    positions differ), the max absolute error for ``table/*`` (percent, 2
    decimals) and ``summary/*``, and the max absolute error of the accumulated
    ``total/*`` areas. Compare with the fixture's ``parity.compare``: rtol 1e-6
    for per-class values, 0.01 for summaries.
  """
  arrays = _load(npz)
  if isinstance(spec, (str, os.PathLike)):
    spec = json.loads(epath.Path(spec).read_text())
  num_classes = int(spec["num_classes"])
  ignore_index = int(spec.get("ignore_index", 255))
  args = dict(spec.get("metric_args", {}))
  settings = args.get("nan_to_num", [None])
  if not isinstance(settings, (list, tuple)):
    settings = [settings]
  indices = sorted(int(k.split("/")[1]) for k in arrays if k.startswith("pred/"))

  confusion = np.zeros((num_classes, num_classes), np.int64)
  for i in indices:
    confusion += confusion_matrix_np(arrays[f"pred/{i}"], arrays[f"label/{i}"],
                                     num_classes, ignore_index)
  errors = {}
  for name, ours in zip(("intersect", "union", "pred_label", "label"),
                        areas_from_confusion(confusion)):
    key = f"total/{name}"
    if key in arrays:
      errors[key] = float(np.max(np.abs(ours - arrays[key].astype(np.float64))))

  for nan_to_num in settings:
    prefix = "" if nan_to_num is None else f"nan_to_num_{nan_to_num}/"
    metric = IoUMetric(num_classes, ignore_index,
                       args.get("iou_metrics", ALL_METRICS), nan_to_num,
                       args.get("beta", 1))
    metric.add(confusion)
    per = metric.per_class(reduce_processes=False)
    summary = metric.compute(reduce_processes=False)
    for key in _PER_CLASS_KEYS + ("aAcc",):
      ref_key = prefix + ("overall/aAcc" if key == "aAcc" else f"per_class/{key}")
      if ref_key not in arrays or key not in per:
        continue
      ref = arrays[ref_key].astype(np.float64).reshape(-1)
      got = np.asarray(per[key], np.float64).reshape(-1)
      if not np.array_equal(np.isnan(ref), np.isnan(got)):
        errors[ref_key] = float("inf")
        continue
      ok = ~np.isnan(ref)
      rel = np.abs(got[ok] - ref[ok]) / np.maximum(np.abs(ref[ok]), np.finfo(np.float32).tiny)
      errors[ref_key] = float(rel.max()) if rel.size else 0.0
    for key in _PER_CLASS_KEYS:
      ref_key = prefix + f"table/{key}"
      if ref_key not in arrays or key not in per:
        continue
      ref = arrays[ref_key].astype(np.float64)
      got = np.array([summary["per_class"][str(c)][key] for c in range(num_classes)])
      if not np.array_equal(np.isnan(ref), np.isnan(got)):
        errors[ref_key] = float("inf")
        continue
      ok = ~np.isnan(ref)
      errors[ref_key] = float(np.max(np.abs(got[ok] - ref[ok]))) if ok.any() else 0.0
    for key in _SUMMARY_KEYS:
      ref_key = prefix + f"summary/{key}"
      if ref_key in arrays and key in summary:
        ref, got = float(arrays[ref_key].reshape(-1)[0]), summary[key]
        same_nan = np.isnan(ref) and np.isnan(got)
        errors[ref_key] = 0.0 if same_nan else abs(got - ref)
  return errors

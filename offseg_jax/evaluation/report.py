"""Evaluation outputs: metrics.json, confusion matrix, figures and a Markdown report.

Figures use matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so this works headless and inside other programs. Training
curves come from a workdir's ``scalars.jsonl`` (:mod:`offseg_jax.metric_log`).

Output folders and workdirs may be local or ``gs://`` (any ``etils.epath``
path): files are written and read through epath, figures rendered in memory.
The paths returned are ``epath.Path``.
"""

from __future__ import annotations

import datetime
import io
import json
import math
from typing import Any, Mapping, Sequence

from etils import epath
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from offseg_jax import metric_log
from offseg_jax.evaluation import metrics

_SUMMARY_ORDER = ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall")


# --- colour maps ---------------------------------------------------------------

def colorize(labels: np.ndarray, palette: np.ndarray,
             ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
  """[H, W] class indices -> [H, W, 3] uint8 RGB using ``palette`` ([K, 3]);
  values outside the palette (the ignore index 255) get ``ignore_color``."""
  palette = np.asarray(palette, np.uint8)
  labels = np.asarray(labels)
  valid = (labels >= 0) & (labels < len(palette))
  rgb = palette[np.where(valid, labels, 0)]
  rgb[~valid] = np.asarray(ignore_color, np.uint8)
  return rgb


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
            opacity: float = 0.5) -> np.ndarray:
  """``image * (1 - opacity) + colour * opacity`` (mmseg's visualisation);
  ignored / out-of-range pixels keep the image."""
  colours = colorize(labels, palette).astype(np.float32)
  blended = np.asarray(image, np.float32) * (1 - opacity) + colours * opacity
  labels = np.asarray(labels)
  keep = (labels < 0) | (labels >= len(palette))
  blended[keep] = np.asarray(image, np.float32)[keep]
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _save(fig: Figure, path) -> epath.Path:
  """Renders ``fig`` in the format of ``path``'s suffix and writes it there."""
  path = epath.Path(path)
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format=path.suffix[1:].lower() or None, dpi=100, bbox_inches="tight")
  path.write_bytes(buffer.getvalue())
  return path


# --- figures -------------------------------------------------------------------

def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path) -> epath.Path:
  """Row-normalised confusion matrix (rows: ground truth) as a PNG."""
  confusion = np.asarray(confusion, np.float64)
  k = confusion.shape[0]
  with np.errstate(invalid="ignore", divide="ignore"):
    rows = confusion / confusion.sum(axis=1, keepdims=True)
  rows = np.nan_to_num(rows)
  side = min(max(6.0, 0.12 * k + 2), 24.0)
  fig = Figure(figsize=(side, side))
  ax = fig.add_subplot()
  im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
  fontsize = max(3.0, min(9.0, 600.0 / max(k, 1) / 4))
  ax.set_xticks(range(k))
  ax.set_yticks(range(k))
  ax.set_xticklabels(class_names, rotation=90, fontsize=fontsize)
  ax.set_yticklabels(class_names, fontsize=fontsize)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  ax.set_title("Confusion matrix (each row normalised to 1)")
  if k <= 30:
    for i in range(k):
      for j in range(k):
        if rows[i, j] >= 0.01:
          ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=6,
                  color="white" if rows[i, j] < 0.6 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return _save(fig, path)


def plot_per_class(summary: Mapping[str, Any], path, key: str = "IoU") -> epath.Path:
  """Bar chart of a per-class metric (percent); NaN classes are left empty."""
  names = list(summary["per_class"])
  values = np.array([summary["per_class"][n].get(key, np.nan) for n in names], np.float64)
  k = len(names)
  fig = Figure(figsize=(min(max(6.0, 0.17 * k + 2), 32.0), 4.5))
  ax = fig.add_subplot()
  ax.bar(range(k), np.nan_to_num(values), color="tab:blue")
  mean = summary.get("m" + key)
  if mean is not None and not math.isnan(mean):
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"m{key} {mean:.2f}")
    ax.legend(loc="upper right")
  ax.set_xticks(range(k))
  ax.set_xticklabels(names, rotation=90, fontsize=9 if k <= 40 else 6)
  ax.set_ylim(0, 100)
  ax.set_ylabel(f"{key} (%)")
  ax.set_title(f"Per-class {key}")
  return _save(fig, path)


def plot_samples(samples: Sequence[Mapping[str, Any]], palette: np.ndarray, path,
                 opacity: float = 0.5) -> epath.Path:
  """Rows of (image | ground truth | prediction) overlays.

  Each sample is ``{'name', 'image' [H,W,3] uint8, 'label' [H,W], 'pred' [H,W]}``.
  """
  n = len(samples)
  fig = Figure(figsize=(12, 3.6 * n))
  for row, sample in enumerate(samples):
    panels = (("image", sample["image"]),
              ("ground truth", overlay(sample["image"], sample["label"], palette, opacity)),
              ("prediction", overlay(sample["image"], sample["pred"], palette, opacity)))
    for col, (title, picture) in enumerate(panels):
      ax = fig.add_subplot(n, 3, row * 3 + col + 1)
      ax.imshow(picture)
      ax.set_axis_off()
      ax.set_title(f"{sample.get('name', row)}: {title}" if col == 0 else title, fontsize=9)
  return _save(fig, path)


# --- training curves -----------------------------------------------------------

def plot_training_curves(scalars: Mapping[str, Sequence[tuple[int, float]]], path,
                         max_panels: int = 12) -> epath.Path | None:
  """One panel per scalar tag (losses and mIoU first); None if there are none."""
  if not scalars:
    return None

  def priority(tag):
    low = tag.lower()
    return (0 if "loss" in low else 1 if "iou" in low else 2 if "acc" in low else 3, tag)

  tags = sorted(scalars, key=priority)[:max_panels]
  cols = min(3, len(tags))
  rows = math.ceil(len(tags) / cols)
  fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
  for i, tag in enumerate(tags):
    steps, values = zip(*scalars[tag])
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.plot(steps, values, marker="." if len(steps) < 30 else None)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


# --- files ---------------------------------------------------------------------

def _json_number(value):
  if isinstance(value, float) and math.isnan(value):
    return None   # strict JSON has no NaN; null marks a class absent from GT and prediction
  return value


def metrics_dict(summary: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict:
  """The ``metrics.json`` content: summary numbers (percent), per-class by name, meta."""
  out = {k: _json_number(v) for k, v in summary.items() if k != "per_class"}
  out["per_class"] = {name: {k: _json_number(v) for k, v in vals.items()}
                      for name, vals in summary["per_class"].items()}
  if meta:
    out["meta"] = dict(meta)
  return out


def save_results(output_dir, summary: Mapping[str, Any], confusion: np.ndarray,
                 class_names: Sequence[str], meta: Mapping[str, Any] | None = None
                 ) -> dict[str, epath.Path]:
  """Writes ``metrics.json``, ``confusion.npy`` and ``confusion.png``."""
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  paths = {"metrics": output_dir / "metrics.json", "confusion_npy": output_dir / "confusion.npy",
           "confusion_png": output_dir / "confusion.png"}
  paths["metrics"].write_text(json.dumps(metrics_dict(summary, meta), indent=2))
  with paths["confusion_npy"].open("wb") as f:
    np.save(f, np.asarray(confusion, np.int64))
  plot_confusion(confusion, class_names, paths["confusion_png"])
  return paths


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "nan" if math.isnan(v) else f"{v:.2f}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(output_dir, summary: Mapping[str, Any], confusion: np.ndarray,
                 class_names: Sequence[str], palette: np.ndarray,
                 samples: Sequence[Mapping[str, Any]] = (), workdir=None,
                 meta: Mapping[str, Any] | None = None, draw_confusion: bool = True
                 ) -> epath.Path:
  """Writes ``report.md`` and its figures into ``output_dir``; returns its path.

  Figures: ``per_class_iou.png``, ``confusion.png`` (unless ``draw_confusion``
  is False because :func:`save_results` just drew it), ``samples.png`` (if
  ``samples``) and ``training_curves.png`` (if ``workdir`` holds the
  training run's ``scalars.jsonl``).
  """
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  figures = {}
  figures["per-class IoU"] = plot_per_class(summary, output_dir / "per_class_iou.png")
  confusion_png = output_dir / "confusion.png"
  if draw_confusion or not confusion_png.exists():
    plot_confusion(confusion, class_names, confusion_png)
  figures["confusion matrix"] = confusion_png
  if samples:
    figures["samples"] = plot_samples(samples, palette, output_dir / "samples.png")
  if workdir is not None:
    curves = plot_training_curves(metric_log.read_scalars(workdir), output_dir / "training_curves.png")
    if curves is not None:
      figures["training curves"] = curves

  keys = [k for k in _SUMMARY_ORDER if k in summary]
  per_class = summary["per_class"]
  columns = list(next(iter(per_class.values())).keys()) if per_class else []
  lines = ["# Evaluation report", ""]
  meta = dict(meta or {})
  meta.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
  lines += [f"- **{k}**: {v}" for k, v in meta.items()]
  lines += ["", "## Summary", "", _markdown_table(keys, [[summary[k] for k in keys]]), ""]
  lines += ["## Per-class results", "",
            _markdown_table(["Class"] + columns,
                            [[name] + [vals[c] for c in columns] for name, vals in per_class.items()]),
            ""]
  absent = [name for name, vals in per_class.items() if math.isnan(vals.get("IoU", 0.0))]
  if absent:
    lines += [f"Classes absent from both ground truth and predictions (NaN, left out of the "
              f"means): {', '.join(absent)}.", ""]
  k = np.asarray(confusion).shape[0]
  worst = _most_confused(confusion, class_names, top=min(10, k))
  if worst:
    lines += ["## Most frequent confusions", "",
              _markdown_table(["ground truth", "predicted as", "% of its pixels"], worst), ""]
  for title, path in figures.items():
    lines += [f"## {title[0].upper() + title[1:]}", "", f"![{title}]({epath.Path(path).name})", ""]
  report = output_dir / "report.md"
  report.write_text("\n".join(lines))
  return report


def _most_confused(confusion: np.ndarray, class_names: Sequence[str], top: int):
  confusion = np.asarray(confusion, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    rows = confusion / confusion.sum(axis=1, keepdims=True)
  rows = np.nan_to_num(rows)
  np.fill_diagonal(rows, 0.0)
  order = np.argsort(rows, axis=None)[::-1][:top]
  out = []
  for flat in order:
    i, j = np.unravel_index(flat, rows.shape)
    if rows[i, j] <= 0:
      break
    out.append([class_names[i], class_names[j], float(rows[i, j] * 100)])
  return out


def format_summary(summary: Mapping[str, Any]) -> str:
  """Per-class table plus the summary line (see :func:`metrics.format_table`)."""
  return metrics.format_table({k: v for k, v in summary.items()
                               if k == "per_class" or k in _SUMMARY_ORDER})


"""What the toolkit needs to know about a dataset's classes: ``DatasetInfo``.

Two ways to make one from ``config.data``: a dataset with fixed classes and
label convention (the standard datasets, synthetic), and a dataset whose
classes come from the config or, failing that, from the data itself (custom
folders, tfds).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import ml_collections
import numpy as np

from input_pipeline import classes

IGNORE_INDEX = classes.IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the toolkit needs to know about a dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_index: int = 255
  reduce_zero_label: bool = False


def _palette_from_config(data_config, num_classes: int, default: np.ndarray) -> np.ndarray:
  if not data_config.palette:
    return default
  palette = np.asarray(data_config.palette, np.int64)
  if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < num_classes \
      or palette.min() < 0 or palette.max() > 255:
    raise ValueError(f"data.palette must be {num_classes} (r, g, b) triples in 0..255, "
                     f"got shape {palette.shape}")
  return palette[:num_classes].astype(np.uint8)


def _check_ignore_index(data_config):
  if data_config.ignore_index != IGNORE_INDEX:
    raise ValueError(
        f"data.ignore_index={data_config.ignore_index}: only 255 is supported (labels "
        "use 255 for ignored pixels, crop padding and reduce_zero_label); convert the "
        "label files so that ignored pixels are 255, or use reduce_zero_label for 0")


def fixed_class_info(name: str, names: Sequence[str], default_palette: np.ndarray,
                     reduce: bool) -> Callable[[ml_collections.ConfigDict], DatasetInfo]:
  """Info function of a dataset whose classes and label convention are fixed.

  The config may recolour the classes (``data.palette``) but not rename them or
  change ``reduce_zero_label``: the label files of that dataset fix both.
  """
  names = tuple(names)

  def info(data_config) -> DatasetInfo:
    _check_ignore_index(data_config)
    if data_config.reduce_zero_label not in (None, reduce):
      raise ValueError(
          f"reduce_zero_label is fixed to {reduce} for dataset {name!r} (its label files "
          "use that convention); leave data.reduce_zero_label unset, or use "
          "name='custom' for a different convention")
    if data_config.class_names and tuple(data_config.class_names) != names:
      raise ValueError(
          f"the classes of dataset {name!r} are fixed ({len(names)} classes); leave "
          "data.class_names empty, or use name='custom' for other classes")
    return DatasetInfo(name, len(names), names,
                       _palette_from_config(data_config, len(names), default_palette),
                       IGNORE_INDEX, reduce)

  return info


def configured_class_info(data_config, fallback_names=(), fallback_palette=None,
                          fallback_reduce=False) -> DatasetInfo:
  """Info of ``custom``/``tfds``: classes from the config, else from the data.

  Args:
    data_config: ``config.data``; ``class_names``, ``palette`` and
      ``reduce_zero_label`` win over the fallbacks when set.
    fallback_names: class names stored with the data (e.g. tfds metadata).
    fallback_palette: their palette, if stored.
    fallback_reduce: the label convention stored with the data.
  """
  _check_ignore_index(data_config)
  names = tuple(data_config.class_names) or tuple(fallback_names)
  if not names:
    raise ValueError(
        f"dataset {data_config.name!r} needs data.class_names (a tuple with one name per "
        "class, in label-value order)")
  if len(names) > 255:
    raise ValueError(f"at most 255 classes fit uint8 labels with 255 = ignore, got {len(names)}")
  if fallback_palette is not None and len(fallback_palette) >= len(names):
    default_palette = np.asarray(fallback_palette, np.uint8)[:len(names)]
  else:
    default_palette = classes.generated_palette(len(names))
  reduce = data_config.reduce_zero_label
  reduce = bool(fallback_reduce) if reduce is None else bool(reduce)
  return DatasetInfo(data_config.name, len(names), names,
                     _palette_from_config(data_config, len(names), default_palette),
                     IGNORE_INDEX, reduce)

"""Dataset registry: ``config.data.name`` -> metadata and random-access sources.

Every dataset is a grain-compatible random-access source (``len`` and ``[i]``)
of ``{'image': HxWx3 uint8 RGB, 'label': HxW uint8, 'name': str}`` with labels
already in training convention (``reduce_zero_label`` applied, 255 = ignore).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from input_pipeline import synthetic


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the toolkit needs to know about a dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_index: int = 255
  reduce_zero_label: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  info: Callable[[ml_collections.ConfigDict], DatasetInfo]
  source: Callable[[ml_collections.ConfigDict, str], object]


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, spec: DatasetSpec):
  if name in DATASETS:
    raise ValueError(f"dataset {name!r} registered twice")
  DATASETS[name] = spec


def _spec(data_config) -> DatasetSpec:
  name = data_config.name
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset config.data.name={name!r}; known: {sorted(DATASETS)}")
  return DATASETS[name]


def dataset_info(data_config) -> DatasetInfo:
  """Metadata (classes, palette, label convention) of ``config.data``."""
  return _spec(data_config).info(data_config)


def build_source(data_config, split: str):
  """The random-access source of ``split`` ('train', 'val', ...) of ``config.data``."""
  return _spec(data_config).source(data_config, split)


def _synthetic_source(data_config, split):
  n = {"train": data_config.num_train, "val": data_config.num_val}.get(split)
  if n is None:
    raise ValueError(f"synthetic dataset has splits 'train' and 'val', not {split!r}")
  return synthetic.SyntheticSource(split=split, num_examples=int(n),
                                   image_size=int(data_config.image_size),
                                   seed=int(data_config.seed))


register("synthetic", DatasetSpec(
    info=lambda cfg: DatasetInfo("synthetic", synthetic.NUM_CLASSES, synthetic.CLASS_NAMES,
                                 synthetic.PALETTE),
    source=_synthetic_source))

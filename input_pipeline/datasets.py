"""Dataset registry: ``config.data.name`` -> metadata and random-access sources.

Every dataset is a grain-compatible random-access source (``len`` and ``[i]``)
of ``{'image': HxWx3 uint8 RGB, 'label': HxW uint8, 'name': str}`` with labels
already in training convention (``reduce_zero_label`` applied, 255 = ignore).

Datasets:
  * ``ade20k``, ``cityscapes``, ``coco_stuff164k``, ``pascal_context59``,
    ``bdd100k``: the standard (mmseg) folder layouts, used as they are;
  * ``custom``: any ``img_dir``/``ann_dir`` + suffix layout with your classes;
  * ``tfds``: a tensorflow-datasets dataset in ArrayRecord format (written by
    ``python -m input_pipeline.pack``, or e.g. ``scene_parse150`` prepared
    elsewhere), read without TensorFlow;
  * ``synthetic``: the embedded default (``input_pipeline/synthetic.py``).

``default_data_config(name)`` gives every field any dataset or transform reads,
with the official defaults of that dataset; a ``data.name`` changed afterwards
must still fit them (``dataset_config.check_choice``: a tfds copy or your own
folders keep the recipe; another dataset is refused with the ``--config`` that
makes its config). A file that cannot be used raises ``image_io.BadFileError``
naming it; with ``data.skip_bad_files=True`` it is replaced by the next usable
example and recorded in ``source.bad_files`` (also logged as a warning), so
nothing disappears silently.

The parts live in: ``dataset_config`` (fields, layouts, recipes, the choice of
dataset), ``class_info`` (``DatasetInfo``), ``bad_files`` (strict or recorded
replacement), ``folder_source`` (file pairing, root resolution, the folder
source) and ``tfds_source`` (ArrayRecord datasets). This module registers them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from input_pipeline import classes
from input_pipeline import synthetic
from input_pipeline.bad_files import BadFileLog, SkippingSource  # noqa: F401  (public names)
from input_pipeline.class_info import (IGNORE_INDEX, DatasetInfo, configured_class_info,
                                       fixed_class_info)
from input_pipeline.dataset_config import (FOLDER_LAYOUTS, FolderLayout,  # noqa: F401
                                        check_choice, data_config_of, defaults, effective)
from input_pipeline import folder_source as _folders
from input_pipeline.folder_source import (FolderListing, FolderSource,  # noqa: F401
                                          list_folder_pairs, resolve_folder_root)
from input_pipeline.tfds_source import TfdsSource, find_tfds_dir, tfds_info, tfds_source  # noqa: F401


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to describe and read one registered dataset.

  Attributes:
    info: ``config.data`` -> ``DatasetInfo``.
    source: ``(config.data, split, info)`` -> random-access source; the config
      it gets already has the chosen dataset's layout (``dataset_config.effective``).
  """
  info: Callable[[ml_collections.ConfigDict], DatasetInfo]
  source: Callable[[ml_collections.ConfigDict, str, DatasetInfo], object]


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, spec: DatasetSpec):
  """Adds dataset ``name`` (an error if it exists)."""
  if name in DATASETS:
    raise ValueError(f"dataset {name!r} registered twice")
  DATASETS[name] = spec


def _chosen(data_config) -> tuple[DatasetSpec, ml_collections.ConfigDict]:
  """The spec of ``data.name`` and the config with its layout; refuses misfits."""
  name = data_config.name
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset config.data.name={name!r}; known: {sorted(DATASETS)}")
  check_choice(data_config)
  return DATASETS[name], effective(data_config)


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """``config.data`` for dataset ``name`` with every field, at official defaults.

  See ``dataset_config.defaults`` for the fields.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}")
  return defaults(name)


def dataset_info(data_config) -> DatasetInfo:
  """Metadata (classes, palette, label convention) of ``config.data``."""
  spec, data_config = _chosen(data_config)
  return spec.info(data_config)


def build_source(data_config, split: str):
  """The random-access source of ``split`` ('train', 'val', ...) of ``config.data``."""
  spec, data_config = _chosen(data_config)
  return spec.source(data_config, split, spec.info(data_config))


def folder_listing(data_config, split: str) -> tuple[FolderListing, str]:
  """Lists split ``split`` of a folder dataset; returns (listing, root)."""
  _, data_config = _chosen(data_config)
  return _folders.folder_listing(data_config, split)


# ----------------------------------------------------------------------------
# Registration


def _synthetic_source(data_config, split, info):
  del info   # fixed classes
  n = {"train": data_config.num_train, "val": data_config.num_val}.get(split)
  if n is None:
    raise ValueError(f"synthetic dataset has splits 'train' and 'val', not {split!r}")
  return synthetic.SyntheticSource(split=split, num_examples=int(n),
                                   image_size=int(data_config.image_size),
                                   seed=int(data_config.seed))


register("synthetic", DatasetSpec(
    info=fixed_class_info("synthetic", synthetic.CLASS_NAMES, synthetic.PALETTE, False),
    source=_synthetic_source))

for _name, (_names, _) in classes.DATASET_CLASSES.items():
  register(_name, DatasetSpec(
      info=fixed_class_info(_name, _names, classes.palette(_name),
                            FOLDER_LAYOUTS[_name].reduce_zero_label),
      source=_folders.folder_source))

register("custom", DatasetSpec(info=configured_class_info, source=_folders.folder_source))
register("tfds", DatasetSpec(info=tfds_info, source=tfds_source))

"""``config.data``: one field set for every dataset, filled with that dataset's defaults.

A data config is made for one dataset (``default_data_config(name)``, recorded
in ``data.defaults_for``): its folder layout, its augmentation recipe (crop and
resize scales, photometric distortion) and, for ``synthetic``, its sizes.
Changing only ``data.name`` on the command line would keep all of those, so a
changed name is accepted only where the rest of the config still fits:

  * ``tfds``: a packed copy of the dataset the config was made for; or a
    packed copy of your own folders, or a foreign tfds dataset, read with the
    config's recipe;
  * ``custom``: your own folders, read with the config's recipe;

the last two not from a ``synthetic`` config, whose recipe and sizes fit only
the generated data. Any other change is refused, with the ``--config`` that
makes a config for that dataset (:func:`check_choice`). Where the name may change, the layout fields
that still hold the old dataset's defaults take the new dataset's
(:func:`effective`), so a ``tfds`` copy of ADE20K reads its ``train``/``val``
splits, not ADE20K's ``training``/``validation`` folders.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections
from ml_collections import config_dict

from input_pipeline import classes


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """Where a folder dataset keeps its files, relative to ``data.root``.

  ``img_dir``/``ann_dir``/``split_file`` may contain ``{split}``, replaced by
  ``split_names[split]``. Without a split file, every file under ``img_dir``
  (recursively) ending in ``img_suffix`` is an example, sorted by path; its
  label is the same relative path under ``ann_dir`` with ``seg_suffix``.
  """
  title: str
  root: str
  img_dir: str
  ann_dir: str
  img_suffix: str
  seg_suffix: str
  split_names: tuple[tuple[str, str], ...]
  split_file: str = ""
  reduce_zero_label: bool = False
  # Folders tried below data.root when it points one level too high.
  root_subdirs: tuple[str, ...] = ()


FOLDER_LAYOUTS = {
    "ade20k": FolderLayout(
        "ADE20K", "data/ade/ADEChallengeData2016", "images/{split}",
        "annotations/{split}", ".jpg", ".png",
        (("train", "training"), ("val", "validation")), reduce_zero_label=True,
        root_subdirs=("ADEChallengeData2016",)),
    "cityscapes": FolderLayout(
        "Cityscapes", "data/cityscapes", "leftImg8bit/{split}", "gtFine/{split}",
        "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
        (("train", "train"), ("val", "val"))),
    "coco_stuff164k": FolderLayout(
        "COCO-Stuff-164k", "data/coco_stuff164k", "images/{split}",
        "annotations/{split}", ".jpg", "_labelTrainIds.png",
        (("train", "train2017"), ("val", "val2017"))),
    "pascal_context59": FolderLayout(
        "Pascal-Context-59", "data/VOCdevkit/VOC2010", "JPEGImages",
        "SegmentationClassContext", ".jpg", ".png",
        (("train", "train"), ("val", "val")),
        split_file="ImageSets/SegmentationContext/{split}.txt",
        reduce_zero_label=True, root_subdirs=("VOC2010", "VOCdevkit/VOC2010")),
    "bdd100k": FolderLayout(
        "BDD100K", "data/bdd100k", "images/10k/{split}",
        "labels/sem_seg/masks/{split}", ".jpg", ".png",
        (("train", "train"), ("val", "val"))),
    "custom": FolderLayout(
        "custom", "data/custom", "img_dir/{split}", "ann_dir/{split}", ".jpg",
        ".png", (("train", "train"), ("val", "val"))),
}

# Augmentation settings that differ between datasets: crop (h, w), resize scale
# (w, h) for training (RandomResize, ratios 0.5-2) and testing (keep-ratio
# Resize), cat_max_ratio and PhotoMetricDistortion. Official values for the real
# datasets; the synthetic default trains on whole images with flips only.
_RECIPE_DEFAULTS = dict(crop_size=(512, 512), train_scale=(2048, 512), test_scale=(2048, 512),
                        cat_max_ratio=0.75, photometric=True)
_RECIPES = {
    "cityscapes": dict(crop_size=(1024, 1024), train_scale=(2048, 1024),
                       test_scale=(2048, 1024)),
    "pascal_context59": dict(crop_size=(480, 480), train_scale=(520, 520),
                             test_scale=(520, 520)),
    "bdd100k": dict(crop_size=(512, 1024), train_scale=(2048, 1024), test_scale=(2048, 1024)),
    "synthetic": dict(crop_size=(64, 64), train_scale=(), test_scale=(), cat_max_ratio=1.0,
                      photometric=False),
}

# The fields that say where a dataset's files are (replaced on a permitted
# change of data.name while they hold the old dataset's defaults).
LAYOUT_FIELDS = ("root", "img_dir", "ann_dir", "img_suffix", "seg_suffix", "split_file",
                 "split_names")

# Names that read your own copy of some data: changing data.name to one of them
# keeps the config's recipe, which is then the recipe of the data being read.
OWN_DATA = ("custom", "tfds")

# One experiment config per dataset that has one, for the refusal message (the
# tests load each and check that it is made for that dataset).
EXPERIMENT_CONFIGS = {
    "synthetic": "experiments/configs/default.py",
    "ade20k": "experiments/configs/offseg.py:t,ade20k",
    "cityscapes": "experiments/configs/offseg.py:t,cityscapes",
    "coco_stuff164k": "experiments/configs/offseg.py:t,coco_stuff164k",
    "pascal_context59": "experiments/configs/segnext_ol.py:t_ol,pascal_context59",
}


def defaults(name: str) -> ml_collections.ConfigDict:
  """``config.data`` for dataset ``name`` with every field, at its defaults.

  All datasets share one field set (configs are locked); fields that a dataset
  does not use keep harmless defaults. Groups:
    * identity and files: ``name``, ``defaults_for`` (the dataset these
      defaults were made for: set here, never overridden), ``root``,
      ``img_dir``, ``ann_dir``, ``img_suffix``, ``seg_suffix``, ``split_file``,
      ``split_names`` (our split -> the dataset's folder/split name),
      ``skip_bad_files``;
    * classes: ``class_names``/``palette`` (empty = the dataset's own; required
      for ``custom``), ``reduce_zero_label`` (None = the dataset's convention;
      fixed for built-in datasets), ``ignore_index`` (255);
    * ``tfds``: ``tfds_name`` (empty: ``root`` is a prepared dataset folder),
      ``tfds_image_key``, ``tfds_label_key``, ``tfds_name_key``,
      ``tfds_label_channel`` (-1: single-channel labels);
    * synthetic: ``image_size``, ``seed``; ``num_train``/``num_val`` are its
      sizes, and for the other datasets a limit (-1 = all examples);
    * training transform: ``crop_size`` (h, w), ``train_scale`` (w, h; empty =
      no resize), ``ratio_range``, ``cat_max_ratio`` (1 = off), ``flip_prob``,
      ``photometric`` and its ``brightness_delta``, ``contrast_range``,
      ``saturation_range``, ``hue_delta``; ``mean``/``std`` (RGB, 0..255);
    * evaluation transform: ``test_scale`` (w, h; empty = no resize);
    * loader: ``num_threads``, ``prefetch``.

  Use ``input_pipeline.datasets.default_data_config``, which also checks that
  ``name`` is registered.

  Returns:
    A ConfigDict (not locked; the experiment config locks the whole tree).
  """
  layout = FOLDER_LAYOUTS.get(name, FOLDER_LAYOUTS["custom"])
  recipe = dict(_RECIPE_DEFAULTS, **_RECIPES.get(name, {}))
  c = ml_collections.ConfigDict()
  c.name = name
  c.defaults_for = name
  c.root = "" if name in ("tfds", "synthetic") else layout.root
  c.img_dir = layout.img_dir
  c.ann_dir = layout.ann_dir
  c.img_suffix = layout.img_suffix
  c.seg_suffix = layout.seg_suffix
  c.split_file = layout.split_file
  c.split_names = ml_collections.ConfigDict(dict(layout.split_names))
  c.skip_bad_files = False

  c.class_names = ()
  c.palette = ()
  c.reduce_zero_label = config_dict.placeholder(bool)
  c.ignore_index = classes.IGNORE_INDEX

  c.tfds_name = ""
  c.tfds_image_key = "image"
  c.tfds_label_key = "label"
  c.tfds_name_key = "name"
  c.tfds_label_channel = -1

  c.image_size = 64
  c.seed = 0
  c.num_train = 4096 if name == "synthetic" else -1
  c.num_val = 512 if name == "synthetic" else -1

  c.crop_size = recipe["crop_size"]
  c.train_scale = recipe["train_scale"]
  c.ratio_range = (0.5, 2.0)
  c.cat_max_ratio = recipe["cat_max_ratio"]
  c.flip_prob = 0.5
  c.photometric = recipe["photometric"]
  c.brightness_delta = 32
  c.contrast_range = (0.5, 1.5)
  c.saturation_range = (0.5, 1.5)
  c.hue_delta = 18
  c.mean = (123.675, 116.28, 103.53)
  c.std = (58.395, 57.12, 57.375)
  c.test_scale = recipe["test_scale"]

  c.num_threads = 8
  c.prefetch = 16
  return c


def data_config_of(config) -> ml_collections.ConfigDict:
  """``config.data`` of an experiment config (or ``config`` if it is a data config)."""
  if "data" in config:
    return config.data
  if "name" in config and "root" in config:
    return config
  raise ValueError("the config has no 'data' field (expected config.data = "
                   "datasets.default_data_config(name), possibly overridden)")


def example_limit(data_config, split: str) -> int:
  """Example limit of ``split`` (-1 = all)."""
  value = {"train": data_config.num_train, "val": data_config.num_val}.get(split, -1)
  return -1 if value is None or value < 0 else int(value)


def made_for(data_config) -> str:
  """The dataset whose defaults fill ``data_config`` (its name if unrecorded)."""
  return data_config.get("defaults_for") or data_config.name


def _how_to_choose(name: str, data_config) -> str:
  """The flags that give a config made for dataset ``name``."""
  root = f" --config.data.root={data_config.root}" if data_config.root else ""
  if name == "synthetic":
    root = ""        # generated, no files
  if name in EXPERIMENT_CONFIGS:
    return f"choose it through the config instead: --config={EXPERIMENT_CONFIGS[name]}{root}"
  if name in OWN_DATA:
    return ("start from the config of a real dataset whose recipe you want, e.g. "
            f"--config={EXPERIMENT_CONFIGS['ade20k']} --config.data.name={name}{root}")
  return (f"no config in experiments/configs is made for {name!r} yet: write one whose "
          f"get_config sets config.data = common.data_config({name!r})")


def check_choice(data_config, packed_from: str | None = None) -> None:
  """Refuses a ``data.name`` that the rest of ``data_config`` was not made for.

  Args:
    data_config: ``config.data``.
    packed_from: for ``name='tfds'``, the dataset the tfds data was packed from
      ('' for a foreign tfds dataset); None when its metadata has not been read
      yet (the check is then completed when it is).

  Raises:
    ValueError: one line naming both datasets and the ``--config`` to use.
  """
  name, base = data_config.name, made_for(data_config)
  if name == base:
    return
  if name == "tfds":
    if packed_from is None or packed_from == base:
      return
    # Foreign tfds data ('') or a packed copy of your own: the config's recipe.
    if packed_from in ("",) + OWN_DATA and base != "synthetic":
      return
    if packed_from not in OWN_DATA and packed_from:
      root = f" --config.data.root={data_config.root}" if data_config.root else ""
      config = EXPERIMENT_CONFIGS.get(packed_from)
      how = (f"load it with the config of {packed_from!r}: --config={config} "
             f"--config.data.name=tfds{root}" if config else
             f"load it with a config made for {packed_from!r} and --config.data.name=tfds")
      raise ValueError(f"data.root holds a packed copy of {packed_from!r}, but config.data "
                       f"was made for {base!r} (its classes and crop/resize recipe); {how}")
  elif name == "custom" and base != "synthetic":
    return
  raise ValueError(
      f"data.name={name!r} does not fit this config: its other data fields (folder layout, "
      f"crop/resize recipe, example counts) were made for {base!r}; "
      + _how_to_choose(name, data_config))


def effective(data_config) -> ml_collections.ConfigDict:
  """``data_config`` with the layout of the dataset ``data.name`` chooses.

  After a permitted change of ``data.name`` (see :func:`check_choice`), the
  layout fields (``root``, folders, suffixes, split file, split names) that
  still hold the defaults of the dataset the config was made for take the
  defaults of the chosen one; fields set to anything else are kept (a field
  set to exactly the old dataset's default cannot be told from one left there,
  and is replaced too). Without a change, ``data_config`` itself is returned.
  """
  name, base = data_config.name, made_for(data_config)
  if name == base:
    return data_config
  old, new = defaults(base), defaults(name)
  if isinstance(data_config, ml_collections.FrozenConfigDict):
    resolved = data_config.as_configdict()
  else:
    resolved = copy.deepcopy(data_config)
  for field in LAYOUT_FIELDS:
    if field == "split_names":
      for split in resolved.split_names:
        if resolved.split_names[split] == old.split_names.get(split, split):
          resolved.split_names[split] = new.split_names.get(split, split)
    elif resolved[field] == old[field]:
      resolved[field] = new[field]
  return resolved     # defaults_for still names the recipe's dataset

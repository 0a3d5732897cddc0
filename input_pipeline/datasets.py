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
with the official defaults of that dataset. A file that cannot be used raises
``image_io.BadFileError`` naming it; with ``data.skip_bad_files=True`` it is
replaced by the next usable example and recorded in ``source.bad_files`` (also
logged as a warning), so nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import threading
from typing import Callable

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np

from input_pipeline import classes
from input_pipeline import image_io
from input_pipeline import synthetic

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


# ----------------------------------------------------------------------------
# Configuration


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


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """``config.data`` for dataset ``name`` with every field, at official defaults.

  All datasets share one field set (configs are locked); fields that a dataset
  does not use keep harmless defaults. Groups:
    * identity and files: ``name``, ``root``, ``img_dir``, ``ann_dir``,
      ``img_suffix``, ``seg_suffix``, ``split_file``, ``split_names`` (our split
      -> the dataset's folder/split name), ``skip_bad_files``;
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

  Args:
    name: a registered dataset name.

  Returns:
    A ConfigDict (not locked; the experiment config locks the whole tree).
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}")
  layout = FOLDER_LAYOUTS.get(name, FOLDER_LAYOUTS["custom"])
  recipe = dict(_RECIPE_DEFAULTS, **_RECIPES.get(name, {}))
  c = ml_collections.ConfigDict()
  c.name = name
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
  c.ignore_index = IGNORE_INDEX

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


def _fixed_class_info(name: str, names: tuple[str, ...], default_palette: np.ndarray,
                      reduce: bool):
  """Info function of a dataset whose classes and label convention are fixed."""

  def info(data_config) -> DatasetInfo:
    _check_ignore_index(data_config)
    if data_config.reduce_zero_label not in (None, reduce):
      raise ValueError(
          f"reduce_zero_label is fixed to {reduce} for dataset {name!r} (its label files "
          "use that convention); leave data.reduce_zero_label unset, or use "
          "name='custom' for a different convention")
    if data_config.class_names and tuple(data_config.class_names) != tuple(names):
      raise ValueError(
          f"the classes of dataset {name!r} are fixed ({len(names)} classes); leave "
          "data.class_names empty, or use name='custom' for other classes")
    return DatasetInfo(name, len(names), tuple(names),
                       _palette_from_config(data_config, len(names), default_palette),
                       IGNORE_INDEX, reduce)

  return info


def _configured_class_info(data_config, fallback_names=(), fallback_palette=None,
                           fallback_reduce=False) -> DatasetInfo:
  """Info of ``custom``/``tfds``: classes from the config, else from the data."""
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


def _limit(data_config, split: str) -> int:
  """Example limit of ``split`` (-1 = all)."""
  value = {"train": data_config.num_train, "val": data_config.num_val}.get(split, -1)
  return -1 if value is None or value < 0 else int(value)


# ----------------------------------------------------------------------------
# Bad files


class BadFileLog:
  """Thread-safe record of the bad files a source skipped (skip_bad_files=True).

  Each distinct file is listed once with its problem and how many times it was
  hit (a file hit again in a later epoch counts again). The loader can print
  ``summary()`` at the end of a run.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._errors: dict[str, image_io.BadFileError] = {}
    self._hits: dict[str, int] = {}

  def record(self, error: image_io.BadFileError) -> None:
    with self._lock:
      first = error.path not in self._errors
      self._errors.setdefault(error.path, error)
      self._hits[error.path] = self._hits.get(error.path, 0) + 1
    if first:
      logging.warning("skipping bad file (data.skip_bad_files=True): %s", error)

  def __len__(self) -> int:
    with self._lock:
      return len(self._errors)

  @property
  def errors(self) -> list[image_io.BadFileError]:
    with self._lock:
      return list(self._errors.values())

  @property
  def total_hits(self) -> int:
    with self._lock:
      return sum(self._hits.values())

  def summary(self, max_listed: int = 20) -> str:
    """One line per skipped file (up to ``max_listed``), or a 'none' line."""
    errors = self.errors
    if not errors:
      return "bad files skipped: none"
    lines = [f"bad files skipped: {len(errors)} files, {self.total_hits} times"]
    lines += [f"  [{e.kind}] {e}" for e in errors[:max_listed]]
    if len(errors) > max_listed:
      lines.append(f"  ... and {len(errors) - max_listed} more")
    return "\n".join(lines)

  def __getstate__(self):
    with self._lock:
      return {"errors": dict(self._errors), "hits": dict(self._hits)}

  def __setstate__(self, state):
    self._lock = threading.Lock()
    self._errors = state["errors"]
    self._hits = state["hits"]


class _SkippingSource:
  """Shared ``__getitem__``: strict loading, or replacement of bad examples."""

  skip_bad_files: bool
  bad_files: BadFileLog

  def load(self, index: int) -> dict:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    n = len(self)
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range [0, {n})")
    if not self.skip_bad_files:
      return self.load(index)
    # Replace a bad example by the next usable one, so batches keep their size
    # and the stream stays deterministic; every skip is recorded. (For
    # evaluation this scores the replacement twice: fix val files instead.)
    for step in range(n):
      try:
        return self.load((index + step) % n)
      except image_io.BadFileError as e:
        self.bad_files.record(e)
    raise ValueError(f"no usable example in this split:\n{self.bad_files.summary()}")


def _finish_label(label: np.ndarray, image_shape, label_path: str, image_path: str,
                  num_classes: int, reduce: bool) -> np.ndarray:
  image_io.check_same_size(image_shape, label.shape, image_path, label_path)
  if reduce:
    label = image_io.reduce_zero_label(label)
  image_io.check_label_values(label, num_classes, label_path, reduce)
  return label


# ----------------------------------------------------------------------------
# Folder datasets


@dataclasses.dataclass
class FolderListing:
  """The examples of a folder split and the files that could not be paired."""
  pairs: list[tuple[str, str, str]]            # (name, image path, label path)
  unpaired_images: list[tuple[str, str]]       # (image path, expected label path)
  missing_images: list[tuple[str, str]]        # (split-file entry, expected image path)
  orphan_labels: list[str]                     # labels without an image


def _walk_suffix(folder: str, suffix: str) -> list[str]:
  """Paths relative to ``folder`` of the files ending in ``suffix``, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames.sort()
    rel_dir = os.path.relpath(dirpath, folder)
    for f in filenames:
      if f.endswith(suffix):
        found.append(f if rel_dir == "." else os.path.join(rel_dir, f))
  return sorted(found)


def list_folder_pairs(img_dir: str, ann_dir: str, img_suffix: str, seg_suffix: str,
                      split_file: str | None = None) -> FolderListing:
  """Pairs images with labels the way mmseg's ``BaseSegDataset`` does.

  With ``split_file``, each non-empty line ``stem`` names ``img_dir/stem +
  img_suffix`` and ``ann_dir/stem + seg_suffix`` (file order kept). Without it,
  every ``*img_suffix`` under ``img_dir`` (recursively, sorted) is an example.
  """
  label_set = set(_walk_suffix(ann_dir, seg_suffix)) if os.path.isdir(ann_dir) else set()
  pairs, unpaired, missing = [], [], []
  if split_file:
    with open(split_file) as f:
      stems = [line.strip() for line in f if line.strip()]
    for stem in stems:
      image_path = os.path.join(img_dir, stem + img_suffix)
      label_path = os.path.join(ann_dir, stem + seg_suffix)
      if not os.path.isfile(image_path):
        missing.append((stem, image_path))
      elif stem + seg_suffix not in label_set:
        unpaired.append((image_path, label_path))
      else:
        pairs.append((stem, image_path, label_path))
    return FolderListing(pairs, unpaired, missing, [])
  images = _walk_suffix(img_dir, img_suffix)
  if os.path.abspath(img_dir) == os.path.abspath(ann_dir):
    # Images and labels side by side: a label file is not an image.
    images = [f for f in images if not f.endswith(seg_suffix)]
  stems = set()
  for rel in images:
    stem = rel[:-len(img_suffix)]
    stems.add(stem)
    label_path = os.path.join(ann_dir, stem + seg_suffix)
    if stem + seg_suffix in label_set:
      pairs.append((stem, os.path.join(img_dir, rel), label_path))
    else:
      unpaired.append((os.path.join(img_dir, rel), label_path))
  orphans = sorted(os.path.join(ann_dir, rel) for rel in label_set
                   if rel[:-len(seg_suffix)] not in stems)
  return FolderListing(pairs, unpaired, missing, orphans)


def _layout_description(layout: FolderLayout, data_config, split_dir: str) -> str:
  parts = [f"{data_config.img_dir.format(split=split_dir)}/**/*{data_config.img_suffix}",
           f"{data_config.ann_dir.format(split=split_dir)}/**/*{data_config.seg_suffix}"]
  if data_config.split_file:
    parts.append(data_config.split_file.format(split=split_dir))
  return f"the {layout.title} layout (" + ", ".join(parts) + ")"


def resolve_folder_root(data_config, layout: FolderLayout, split_dir: str) -> str:
  """``data.root``, or the standard sub-folder of it that holds the layout."""
  root = os.path.expanduser(data_config.root)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"data.root={data_config.root!r} does not exist; expected the folder holding "
        f"{_layout_description(layout, data_config, split_dir)}")
  first = data_config.img_dir.format(split=split_dir).split("/")[0]
  if not os.path.isdir(os.path.join(root, first)):
    for sub in layout.root_subdirs:
      if os.path.isdir(os.path.join(root, sub, first)):
        return os.path.join(root, sub)
  return root


class FolderSource(_SkippingSource):
  """Random-access source over paired image/label files.

  Attributes:
    dataset: dataset name, for messages.
    split: our split name.
    pairs: (name, image path, label path) of every example.
    num_classes: K; label values must lie in [0, K) or be 255.
    reduce_zero_label: whether label files store 0 = ignore, 1..K = classes.
    skip_bad_files: replace unusable examples instead of raising.
    bad_files: the record of replaced examples.
  """

  def __init__(self, *, dataset: str, split: str, pairs, num_classes: int,
               reduce_zero_label: bool, skip_bad_files: bool = False,
               bad_files: BadFileLog | None = None):
    self.dataset = dataset
    self.split = split
    self.pairs = list(pairs)
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label
    self.skip_bad_files = skip_bad_files
    self.bad_files = bad_files if bad_files is not None else BadFileLog()

  def __len__(self) -> int:
    return len(self.pairs)

  def read_encoded(self, index: int) -> dict:
    """The file contents of example ``index`` (labels as stored, not reduced)."""
    name, image_path, label_path = self.pairs[index]
    return {"image": image_io.read_bytes(image_path),
            "label": image_io.read_bytes(label_path), "name": name}

  @property
  def encoded_reduce_zero_label(self) -> bool:
    return self.reduce_zero_label

  def load(self, index: int) -> dict:
    """Decodes and validates example ``index``; raises BadFileError."""
    name, image_path, label_path = self.pairs[index]
    image = image_io.decode_image(image_io.read_bytes(image_path), image_path)
    label = image_io.decode_label(image_io.read_bytes(label_path), label_path)
    label = _finish_label(label, image.shape, label_path, image_path, self.num_classes,
                          self.reduce_zero_label)
    return {"image": image, "label": label, "name": name}

  def __repr__(self):
    return (f"FolderSource({self.dataset}/{self.split}: {len(self)} examples, "
            f"{self.num_classes} classes, reduce_zero_label={self.reduce_zero_label})")


def folder_listing(data_config, split: str) -> tuple[FolderListing, str]:
  """Lists split ``split`` of a folder dataset; returns (listing, root)."""
  layout = FOLDER_LAYOUTS[data_config.name]
  split_dir = data_config.split_names.get(split, split)
  root = resolve_folder_root(data_config, layout, split_dir)
  img_dir = os.path.join(root, data_config.img_dir.format(split=split_dir))
  ann_dir = os.path.join(root, data_config.ann_dir.format(split=split_dir))
  expected = _layout_description(layout, data_config, split_dir)
  split_file = None
  if data_config.split_file:
    split_file = os.path.join(root, data_config.split_file.format(split=split_dir))
    if not os.path.isfile(split_file):
      raise FileNotFoundError(f"split file {split_file} not found; expected {expected} "
                              f"under data.root={root}")
  for folder, what in ((img_dir, "image"), (ann_dir, "label")):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{what} folder {folder} not found; expected {expected} "
                              f"under data.root={root}")
  listing = list_folder_pairs(img_dir, ann_dir, data_config.img_suffix,
                              data_config.seg_suffix, split_file)
  if not (listing.pairs or listing.unpaired_images or listing.missing_images):
    raise FileNotFoundError(f"no '*{data_config.img_suffix}' images in {img_dir}; expected "
                            f"{expected} (check data.img_suffix)")
  return listing, root


def _folder_source(data_config, split: str) -> FolderSource:
  info = dataset_info(data_config)
  listing, _ = folder_listing(data_config, split)
  problems = ([image_io.BadFileError(i, f"no label file {l}", image_io.MISSING)
               for i, l in listing.unpaired_images] +
              [image_io.BadFileError(p, f"image of split-file entry {s!r} does not exist",
                                     image_io.MISSING) for s, p in listing.missing_images])
  bad_files = BadFileLog()
  if problems:
    if not data_config.skip_bad_files:
      more = f" (and {len(problems) - 1} more unpaired files)" if len(problems) > 1 else ""
      raise image_io.BadFileError(problems[0].path, problems[0].problem + more +
                                  "; set data.skip_bad_files=True to skip them",
                                  image_io.MISSING)
    for problem in problems:
      bad_files.record(problem)
  pairs = listing.pairs
  limit = _limit(data_config, split)
  if limit >= 0:
    pairs = pairs[:limit]
  return FolderSource(dataset=data_config.name, split=split, pairs=pairs,
                      num_classes=info.num_classes, reduce_zero_label=info.reduce_zero_label,
                      skip_bad_files=bool(data_config.skip_bad_files), bad_files=bad_files)


# ----------------------------------------------------------------------------
# tensorflow-datasets (ArrayRecord) datasets


def find_tfds_dir(root: str) -> str:
  """The prepared dataset folder (holding dataset_info.json) at or below ``root``.

  Accepts the version folder itself, or a folder with a single dataset below it
  (``root/<name>/<version>/``, as ``input_pipeline.pack --output root`` writes).
  """
  root = os.path.expanduser(root)
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
        f"data.root={root!r} does not exist; for name='tfds' set it to a prepared dataset "
        "folder (<data_dir>/<dataset>/<version>/ with dataset_info.json), or set "
        "data.tfds_name and data.root=<data_dir>")
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  found = sorted(os.path.dirname(p) for pattern in ("*/dataset_info.json",
                                                    "*/*/dataset_info.json")
                 for p in glob.glob(os.path.join(glob.escape(root), pattern)))
  if len(found) == 1:
    return found[0]
  if not found:
    raise FileNotFoundError(f"no prepared tfds dataset (dataset_info.json) in {root} or its "
                            "<dataset>/<version>/ sub-folders")
  raise ValueError(f"several tfds datasets under {root}: {found}; point data.root at one "
                   "of them")


@functools.lru_cache(maxsize=16)
def _tfds_builder(tfds_name: str, root: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not tfds_name:
    return tfds.builder_from_directory(find_tfds_dir(root))
  try:
    return tfds.builder(tfds_name, data_dir=os.path.expanduser(root) or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"tfds dataset {tfds_name!r} not found in data_dir={root!r}: expected "
        f"{root or '~/tensorflow_datasets'}/{tfds_name}/<version>/dataset_info.json") from None


def _tfds_metadata(data_config) -> dict:
  metadata = _tfds_builder(data_config.tfds_name, data_config.root).info.metadata
  return dict(metadata) if metadata else {}


def _tfds_info(data_config) -> DatasetInfo:
  meta = _tfds_metadata(data_config)
  return _configured_class_info(data_config, meta.get("class_names", ()),
                                meta.get("palette"), meta.get("reduce_zero_label", False))


class TfdsSource(_SkippingSource):
  """Random-access source over a tfds dataset stored as ArrayRecord.

  Image features are read as encoded bytes (tfds decoding skipped) and decoded
  by ``image_io`` (no TensorFlow), so errors name the record and labels keep
  their exact values.
  """

  def __init__(self, *, tfds_name: str, root: str, split: str, tfds_split: str,
               image_key: str, label_key: str, name_key: str, label_channel: int,
               num_classes: int, reduce_zero_label: bool, limit: int = -1,
               skip_bad_files: bool = False):
    self.tfds_name, self.root, self.split, self.tfds_split = tfds_name, root, split, tfds_split
    self.image_key, self.label_key, self.name_key = image_key, label_key, name_key
    self.label_channel = label_channel
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label
    self.skip_bad_files = skip_bad_files
    self.bad_files = BadFileLog()
    self._records = None
    builder = _tfds_builder(tfds_name, root)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"tfds dataset {builder.name} is not prepared in data_dir={root!r} (expected "
          f"{builder.data_dir}/dataset_info.json); prepare it in ArrayRecord format first")
    if builder.info.file_format is None or builder.info.file_format.value != "array_record":
      raise ValueError(
          f"tfds dataset {builder.name} is stored as {builder.info.file_format}; random "
          "access without TensorFlow needs ArrayRecord (re-prepare it with "
          "file_format='array_record', or pack it with input_pipeline.pack)")
    features = builder.info.features
    for key, field in ((image_key, "tfds_image_key"), (label_key, "tfds_label_key")):
      if key not in features:
        raise ValueError(f"tfds dataset {builder.name} has features {sorted(features)}, not "
                         f"{key!r}; set data.{field}")
    if tfds_split not in builder.info.splits:
      raise ValueError(f"tfds dataset {builder.name} has splits {sorted(builder.info.splits)}, "
                       f"not {tfds_split!r}; set data.split_names.{split}")
    self.dataset = builder.name
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._encoded_keys = {k for k in (image_key, label_key)
                          if isinstance(features[k], tfds.features.Image)}
    total = builder.info.splits[tfds_split].num_examples
    self._len = total if limit < 0 else min(limit, total)

  def _open(self):
    if self._records is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      decoders = {k: tfds.decode.SkipDecoding() for k in self._encoded_keys}
      if self.tfds_name:
        self._records = tfds.data_source(self.tfds_name, split=self.tfds_split,
                                         data_dir=os.path.expanduser(self.root) or None,
                                         download=False, decoders=decoders)
      else:
        self._records = _tfds_builder("", self.root).as_data_source(
            split=self.tfds_split, decoders=decoders)
    return self._records

  def __len__(self) -> int:
    return self._len

  def _where(self, index: int, key: str) -> str:
    return f"tfds:{self.dataset}/{self.tfds_split}[{index}].{key}"

  def _name(self, record, index: int) -> str:
    name = record.get(self.name_key) if self.name_key else None
    if name is None:
      return f"{self.split}_{index:06d}"
    return name.decode() if isinstance(name, bytes) else str(name)

  def read_encoded(self, index: int) -> dict | None:
    """Encoded image/label bytes of ``index`` (labels as stored), if stored encoded."""
    if len(self._encoded_keys) < 2 or self.label_channel >= 0:
      return None
    record = self._open()[index]
    return {"image": record[self.image_key], "label": record[self.label_key],
            "name": self._name(record, index)}

  @property
  def encoded_reduce_zero_label(self) -> bool:
    return self.reduce_zero_label

  def load(self, index: int) -> dict:
    record = self._open()[index]
    image_where = self._where(index, self.image_key)
    label_where = self._where(index, self.label_key)
    image = record[self.image_key]
    if isinstance(image, bytes):
      image = image_io.decode_image(image, image_where)
    label = record[self.label_key]
    if isinstance(label, bytes):
      label = image_io.decode_label(label, label_where, self.label_channel)
    else:
      label = image_io.to_index_map(np.asarray(label), label_where, self.label_channel)
    label = _finish_label(label, image.shape, label_where, image_where, self.num_classes,
                          self.reduce_zero_label)
    return {"image": np.asarray(image, np.uint8), "label": label,
            "name": self._name(record, index)}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_records"] = None   # reopened lazily in each process
    return state

  def __repr__(self):
    return (f"TfdsSource({self.dataset}/{self.tfds_split}: {len(self)} examples, "
            f"{self.num_classes} classes, reduce_zero_label={self.reduce_zero_label})")


def _tfds_source(data_config, split: str) -> TfdsSource:
  info = dataset_info(data_config)
  return TfdsSource(
      tfds_name=data_config.tfds_name, root=data_config.root, split=split,
      tfds_split=data_config.split_names.get(split, split),
      image_key=data_config.tfds_image_key, label_key=data_config.tfds_label_key,
      name_key=data_config.tfds_name_key, label_channel=int(data_config.tfds_label_channel),
      num_classes=info.num_classes, reduce_zero_label=info.reduce_zero_label,
      limit=_limit(data_config, split), skip_bad_files=bool(data_config.skip_bad_files))


# ----------------------------------------------------------------------------
# Registration


def _synthetic_source(data_config, split):
  n = {"train": data_config.num_train, "val": data_config.num_val}.get(split)
  if n is None:
    raise ValueError(f"synthetic dataset has splits 'train' and 'val', not {split!r}")
  return synthetic.SyntheticSource(split=split, num_examples=int(n),
                                   image_size=int(data_config.image_size),
                                   seed=int(data_config.seed))


register("synthetic", DatasetSpec(
    info=_fixed_class_info("synthetic", synthetic.CLASS_NAMES, synthetic.PALETTE, False),
    source=_synthetic_source))

for _name, (_names, _) in classes.DATASET_CLASSES.items():
  register(_name, DatasetSpec(
      info=_fixed_class_info(_name, _names, classes.palette(_name),
                             FOLDER_LAYOUTS[_name].reduce_zero_label),
      source=_folder_source))

register("custom", DatasetSpec(info=_configured_class_info, source=_folder_source))
register("tfds", DatasetSpec(info=_tfds_info, source=_tfds_source))

"""tensorflow-datasets datasets in ArrayRecord format, read without TensorFlow.

Either a prepared dataset folder (``data.root`` = ``<data_dir>/<name>/<version>``
or a folder with a single such dataset, as ``input_pipeline.pack`` writes) or a
dataset by name (``data.tfds_name`` in ``data.root`` as data_dir). Image
features are read as encoded bytes and decoded by ``image_io``, so errors name
the record and labels keep their exact values.
"""

from __future__ import annotations

import functools
import glob
import os

from etils import epath
import numpy as np

from input_pipeline import image_io
from input_pipeline import storage
from input_pipeline.bad_files import BadFileLog, SkippingSource, finish_label
from input_pipeline.class_info import DatasetInfo, configured_class_info
from input_pipeline.dataset_config import check_choice, example_limit


def find_tfds_dir(root: str) -> str:
  """The prepared dataset folder (holding dataset_info.json) at or below ``root``.

  Accepts the version folder itself, or a folder with a single dataset below it
  (``root/<name>/<version>/``, as ``input_pipeline.pack --output root`` writes).
  """
  root = _expand(root)
  if not root or not epath.Path(root).is_dir():
    raise FileNotFoundError(
        f"data.root={root!r} does not exist; for name='tfds' set it to a prepared dataset "
        "folder (<data_dir>/<dataset>/<version>/ with dataset_info.json), or set "
        "data.tfds_name and data.root=<data_dir>")
  if epath.Path(root, "dataset_info.json").is_file():
    return root
  # glob.escape: a root holding '[' or '*' is matched literally.
  found = sorted(os.fspath(p.parent) for pattern in ("*/dataset_info.json",
                                                     "*/*/dataset_info.json")
                 for p in epath.Path(glob.escape(root)).glob(pattern))
  if len(found) == 1:
    return found[0]
  if not found:
    raise FileNotFoundError(f"no prepared tfds dataset (dataset_info.json) in {root} or its "
                            "<dataset>/<version>/ sub-folders")
  raise ValueError(f"several tfds datasets under {root}: {found}; point data.root at one "
                   "of them")


def _expand(root: str) -> str:
  """``root`` with ``~`` expanded (``''`` stays ``''``: tfds' default data_dir)."""
  return storage.join(epath.Path(root).expanduser()) if root else root


@functools.lru_cache(maxsize=16)
def _tfds_builder(tfds_name: str, root: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not tfds_name:
    return tfds.builder_from_directory(find_tfds_dir(root))
  try:
    return tfds.builder(tfds_name, data_dir=_expand(root) or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"tfds dataset {tfds_name!r} not found in data_dir={root!r}: expected "
        f"{root or '~/tensorflow_datasets'}/{tfds_name}/<version>/dataset_info.json") from None


def _tfds_metadata(data_config) -> dict:
  metadata = _tfds_builder(data_config.tfds_name, data_config.root).info.metadata
  return dict(metadata) if metadata else {}


def tfds_info(data_config) -> DatasetInfo:
  """Classes from the config, else from the metadata ``input_pipeline.pack`` stores.

  Also completes :func:`dataset_config.check_choice` with the dataset the data was
  packed from: a packed ADE20K read with a Cityscapes config is refused.
  """
  meta = _tfds_metadata(data_config)
  check_choice(data_config, packed_from=str(meta.get("source_dataset", "")))
  return configured_class_info(data_config, meta.get("class_names", ()),
                               meta.get("palette"), meta.get("reduce_zero_label", False))


class TfdsSource(SkippingSource):
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
                                         data_dir=_expand(self.root) or None,
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
    """Decodes and validates record ``index``; raises BadFileError."""
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
    label = finish_label(label, image.shape, label_where, image_where, self.num_classes,
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


def tfds_source(data_config, split: str, info: DatasetInfo) -> TfdsSource:
  """The source of our split ``split`` (tfds split ``data.split_names[split]``)."""
  return TfdsSource(
      tfds_name=data_config.tfds_name, root=data_config.root, split=split,
      tfds_split=data_config.split_names.get(split, split),
      image_key=data_config.tfds_image_key, label_key=data_config.tfds_label_key,
      name_key=data_config.tfds_name_key, label_channel=int(data_config.tfds_label_channel),
      num_classes=info.num_classes, reduce_zero_label=info.reduce_zero_label,
      limit=example_limit(data_config, split), skip_bad_files=bool(data_config.skip_bad_files))

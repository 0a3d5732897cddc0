"""Writes a configured dataset as a tensorflow-datasets dataset in ArrayRecord format.

  python -m input_pipeline.pack --config experiments/configs/X.py[:arg] \
      --split train,val --output DIR [--name offseg_ade20k] [--threads 4]

The result, ``DIR/<name>/1.0.0/``, loads with the same ``--config`` plus
``--config.data.name=tfds --config.data.root=DIR/<name>/1.0.0`` (the config
keeps its recipe; the split names become the packed ones), or with
``tfds.data_source(name, data_dir=DIR)``, without TensorFlow. Features: ``image`` (the original
encoded JPEG/PNG bytes), ``label`` (the original label PNG), ``name`` (text).
Folder datasets are copied byte for byte, with ``reduce_zero_label`` recorded
in the dataset metadata next to the class names and palette; sources without
files (synthetic) are stored as PNGs of the decoded arrays. Every example is
decoded and validated first: a bad file stops packing with an error naming it,
or, with ``--config.data.skip_bad_files=True``, is left out and reported.

All splits of a dataset must be packed in one call (a prepared tfds dataset is
not extended afterwards); ``--overwrite`` replaces an existing one.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
import cv2
from etils import epath
from ml_collections import config_flags
import numpy as np

from input_pipeline import command_line
from input_pipeline import datasets
from input_pipeline import image_io

_VERSION = "1.0.0"


def _png(array: np.ndarray) -> bytes:
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  ok, encoded = cv2.imencode(".png", array)
  if not ok:
    raise ValueError("PNG encoding failed")
  return encoded.tobytes()


def _encoded_example(source, index: int, stores_raw: bool) -> dict:
  """Validates example ``index`` and returns what to store (raises BadFileError)."""
  load = getattr(source, "load", source.__getitem__)   # strict load, no replacement
  example = load(index)
  if stores_raw:
    return source.read_encoded(index)
  return {"image": _png(example["image"]), "label": _png(example["label"]),
          "name": example["name"]}


def _builder_class(dataset_name: str):
  """A GeneratorBasedBuilder subclass named ``dataset_name`` (not registered).

  Not registering keeps tfds from ever instantiating it by name: loading goes
  through the read-only builder of the written files.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PackedSegmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image/label pairs of one dataset, in ArrayRecord files."""
    name = dataset_name
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Packed by offseg_jax input_pipeline.pack."}
    # tfds only uses the code path to find download checksums (we download
    # nothing); computing it for a class inside an importable package needs the
    # optional importlib_resources backport, so opt out.
    code_path = None

    def __init__(self, *, splits, metadata, description, **kwargs):
      self._splits = splits            # split -> iterable of (key, example)
      self._metadata = metadata
      self._description = description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self._description,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
              "name": tfds.features.Text(),
          }),
          metadata=tfds.core.MetadataDict(self._metadata),
          disable_shuffling=True)   # keep the source order: index i is example i

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split):
      yield from self._splits[split]

  return PackedSegmentation


def _examples(source, stores_raw: bool, skip_bad_files: bool, num_threads: int,
              report: dict, chunk: int = 256):
  """Yields (index, example) in source order, validating in parallel."""

  def work(index):
    try:
      return index, _encoded_example(source, index, stores_raw), None
    except image_io.BadFileError as e:
      if not skip_bad_files:
        raise
      return index, None, e

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for start in range(0, len(source), chunk):
      for index, example, error in pool.map(work, range(start, min(start + chunk, len(source)))):
        if error is not None:
          report["skipped"].append(error)
          continue
        report["written"] += 1
        yield index, example


def pack(data_config, splits, output_dir: str, name: str | None = None,
         num_threads: int = 4, overwrite: bool = False, log=print) -> str:
  """Packs ``splits`` of ``data_config`` into ``output_dir``; returns the dataset folder.

  Args:
    data_config: ``config.data``.
    splits: our split names, e.g. ('train', 'val'); stored under the same names.
    output_dir: tfds data_dir to write into.
    name: tfds dataset name (default ``offseg_<data.name>``; must not be a tfds
      catalog name, which tfds would resolve to its own builder).
    num_threads: decoding/validation threads.
    overwrite: replace an existing packed dataset of that name.
    log: where progress lines go.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = name or f"offseg_{data_config.name}"
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name {name!r}: use lower-case letters, digits and underscores")
  target = epath.Path(output_dir, name, _VERSION)
  if target.exists():
    if not overwrite:
      raise FileExistsError(f"{target} already exists; pack all splits in one call, or "
                            "pass --overwrite to replace it")
    target.rmtree()
  target = os.fspath(target)

  info = datasets.dataset_info(data_config)
  sources = {split: datasets.build_source(data_config, split) for split in splits}
  first = next(iter(sources.values()))
  stores_raw = (hasattr(first, "read_encoded") and len(first) > 0
                and first.read_encoded(0) is not None)
  raw_reduce = bool(getattr(first, "encoded_reduce_zero_label", False)) if stores_raw else False
  skip = bool(data_config.skip_bad_files)
  reports = {split: {"written": 0, "skipped": []} for split in splits}
  generators = {split: _examples(src, stores_raw, skip, num_threads, reports[split])
                for split, src in sources.items()}
  metadata = {
      "source_dataset": info.name, "num_classes": info.num_classes,
      "class_names": list(info.class_names), "palette": np.asarray(info.palette).tolist(),
      "ignore_index": info.ignore_index,
      # What the stored label files hold: raw files keep the dataset convention.
      "reduce_zero_label": raw_reduce,
  }
  description = (f"{info.name} ({info.num_classes} classes) packed from "
                 f"{data_config.root or data_config.name} by offseg_jax input_pipeline.pack")
  builder = _builder_class(name)(splits=generators, metadata=metadata,
                                 description=description, data_dir=output_dir,
                                 file_format="array_record")
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(download_dir=download_dir)
  for split, report in reports.items():
    log(f"{split}: {report['written']} examples written, {len(report['skipped'])} bad "
        "examples left out")
    for error in report["skipped"]:
      log(f"  [{error.kind}] {error}")
    listing_skips = getattr(sources[split], "bad_files", None)
    if listing_skips is not None and len(listing_skips):   # e.g. images without labels
      log(listing_skips.summary())
  log(f"packed {info.name} to {target}\nload it with the same --config and: "
      f"--config.data.name=tfds --config.data.root={target}")
  return target


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  data_config = datasets.data_config_of(f.config)
  try:
    pack(data_config, [s for s in f.split.split(",") if s], f.output, name=f.name,
         num_threads=f.threads, overwrite=f.overwrite)
  except (OSError, ValueError) as e:   # wrong root/layout, bad file, config misfit
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("split", "train,val", "Comma-separated splits to pack.")
  flags.DEFINE_string("output", None, "tfds data_dir to write the dataset into.",
                      required=True)
  flags.DEFINE_string("name", None, "tfds dataset name (default offseg_<data.name>).")
  flags.DEFINE_integer("threads", 4, "Threads decoding and validating examples.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing packed dataset.")
  command_line.run(main)

"""Folder datasets: pairing image and label files, finding the root, reading examples.

The layouts are mmsegmentation's (``dataset_config.FOLDER_LAYOUTS``), read from the
``data.img_dir``/``ann_dir``/suffix/split fields. The functions here take a
data config whose layout is already the chosen dataset's
(``dataset_config.effective``); ``input_pipeline.datasets`` does that.

Every file operation goes through ``etils.epath``, so ``data.root`` may be a
local folder (relative or absolute, ``~`` expanded) or a ``gs://`` (or other
epath-supported) URL; paths are kept as strings in the same form.
"""

from __future__ import annotations

import dataclasses

from etils import epath

from input_pipeline import image_io
from input_pipeline import storage
from input_pipeline.bad_files import BadFileLog, SkippingSource, finish_label
from input_pipeline.class_info import DatasetInfo
from input_pipeline.dataset_config import FOLDER_LAYOUTS, FolderLayout, example_limit


@dataclasses.dataclass
class FolderListing:
  """The examples of a folder split and the files that could not be paired."""
  pairs: list[tuple[str, str, str]]            # (name, image path, label path)
  unpaired_images: list[tuple[str, str]]       # (image path, expected label path)
  missing_images: list[tuple[str, str]]        # (split-file entry, expected image path)
  orphan_labels: list[str]                     # labels without an image


def _walk_suffix(folder: str, suffix: str) -> list[str]:
  """Paths relative to ``folder`` of the files ending in ``suffix``, sorted
  (links to directories followed, as ``os.walk(folder, followlinks=True)``)."""
  return sorted(rel + f for _, rel, files in storage.walk(folder, follow_links=True)
                for f in files if f.endswith(suffix))


def list_folder_pairs(img_dir: str, ann_dir: str, img_suffix: str, seg_suffix: str,
                      split_file: str | None = None) -> FolderListing:
  """Pairs images with labels the way mmseg's ``BaseSegDataset`` does.

  With ``split_file``, each non-empty line ``stem`` names ``img_dir/stem +
  img_suffix`` and ``ann_dir/stem + seg_suffix`` (file order kept). Without it,
  every ``*img_suffix`` under ``img_dir`` (recursively, sorted) is an example.
  """
  label_set = (set(_walk_suffix(ann_dir, seg_suffix)) if epath.Path(ann_dir).is_dir()
               else set())
  pairs, unpaired, missing = [], [], []
  if split_file:
    with epath.Path(split_file).open() as f:
      stems = [line.strip() for line in f if line.strip()]
    # One listing instead of a file-system query per entry (an RPC each on
    # gs://); entries it does not hold (e.g. '../x') are looked up one by one.
    image_set = set(_walk_suffix(img_dir, img_suffix)) if stems else set()
    for stem in stems:
      image_path = storage.join(img_dir, stem + img_suffix)
      label_path = storage.join(ann_dir, stem + seg_suffix)
      if (stem + img_suffix not in image_set
          and not epath.Path(image_path).is_file()):
        missing.append((stem, image_path))
      elif stem + seg_suffix not in label_set:
        unpaired.append((image_path, label_path))
      else:
        pairs.append((stem, image_path, label_path))
    return FolderListing(pairs, unpaired, missing, [])
  images = _walk_suffix(img_dir, img_suffix)
  if storage.absolute(img_dir) == storage.absolute(ann_dir):
    # Images and labels side by side: a label file is not an image.
    images = [f for f in images if not f.endswith(seg_suffix)]
  stems = set()
  for rel in images:
    stem = rel[:-len(img_suffix)]
    stems.add(stem)
    label_path = storage.join(ann_dir, stem + seg_suffix)
    if stem + seg_suffix in label_set:
      pairs.append((stem, storage.join(img_dir, rel), label_path))
    else:
      unpaired.append((storage.join(img_dir, rel), label_path))
  orphans = sorted(storage.join(ann_dir, rel) for rel in label_set
                   if rel[:-len(seg_suffix)] not in stems)
  return FolderListing(pairs, unpaired, missing, orphans)


def _files(img_dir: str, ann_dir: str, img_suffix: str, seg_suffix: str, split_file: str,
           split_dir: str) -> str:
  parts = [f"{img_dir.format(split=split_dir)}/**/*{img_suffix}",
           f"{ann_dir.format(split=split_dir)}/**/*{seg_suffix}"]
  if split_file:
    parts.append(split_file.format(split=split_dir))
  return ", ".join(parts)


def describe_layout(data_config, split: str) -> str:
  """The files split ``split`` is read from, named as a user would look for them.

  E.g. "the ADE20K layout (images/training/**/*.jpg, annotations/training/**/*.png)";
  where the config changed the dataset's layout, both the configured files and
  the standard layout are named.
  """
  layout = FOLDER_LAYOUTS.get(data_config.name, FOLDER_LAYOUTS["custom"])
  configured = _files(data_config.img_dir, data_config.ann_dir, data_config.img_suffix,
                      data_config.seg_suffix, data_config.split_file,
                      data_config.split_names.get(split, split))
  if data_config.name not in FOLDER_LAYOUTS or data_config.name == "custom":
    return (f"the layout set by data.img_dir, data.ann_dir, data.img_suffix and "
            f"data.seg_suffix ({configured})")
  standard = _files(layout.img_dir, layout.ann_dir, layout.img_suffix, layout.seg_suffix,
                    layout.split_file, dict(layout.split_names).get(split, split))
  if configured == standard:
    return f"the {layout.title} layout ({configured})"
  return (f"{configured} as configured in data.img_dir/ann_dir/img_suffix/seg_suffix/"
          f"split_file/split_names (the {layout.title} layout is {standard})")


def resolve_folder_root(data_config, layout: FolderLayout, split: str) -> str:
  """``data.root``, or the standard sub-folder of it that holds the layout."""
  root = storage.join(epath.Path(data_config.root).expanduser()) if data_config.root else ""
  if not root or not epath.Path(root).is_dir():
    raise FileNotFoundError(
        f"data.root={data_config.root!r} does not exist; expected the folder holding "
        f"{describe_layout(data_config, split)}")
  split_dir = data_config.split_names.get(split, split)
  first = data_config.img_dir.format(split=split_dir).split("/")[0]
  if not epath.Path(root, first).is_dir():
    for sub in layout.root_subdirs:
      if epath.Path(root, sub, first).is_dir():
        return storage.join(root, sub)
  return root


class FolderSource(SkippingSource):
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
    label = finish_label(label, image.shape, label_path, image_path, self.num_classes,
                         self.reduce_zero_label)
    return {"image": image, "label": label, "name": name}

  def __repr__(self):
    return (f"FolderSource({self.dataset}/{self.split}: {len(self)} examples, "
            f"{self.num_classes} classes, reduce_zero_label={self.reduce_zero_label})")


def folder_listing(data_config, split: str) -> tuple[FolderListing, str]:
  """Lists split ``split`` of a folder dataset; returns (listing, root)."""
  layout = FOLDER_LAYOUTS[data_config.name]
  split_dir = data_config.split_names.get(split, split)
  root = resolve_folder_root(data_config, layout, split)
  img_dir = storage.join(root, data_config.img_dir.format(split=split_dir))
  ann_dir = storage.join(root, data_config.ann_dir.format(split=split_dir))
  expected = describe_layout(data_config, split)
  split_file = None
  if data_config.split_file:
    split_file = storage.join(root, data_config.split_file.format(split=split_dir))
    if not epath.Path(split_file).is_file():
      raise FileNotFoundError(f"split file {split_file} not found; expected {expected} "
                              f"under data.root={root}")
  for folder, what in ((img_dir, "image"), (ann_dir, "label")):
    if not epath.Path(folder).is_dir():
      raise FileNotFoundError(f"{what} folder {folder} not found; expected {expected} "
                              f"under data.root={root}")
  listing = list_folder_pairs(img_dir, ann_dir, data_config.img_suffix,
                              data_config.seg_suffix, split_file)
  if not (listing.pairs or listing.unpaired_images or listing.missing_images):
    raise FileNotFoundError(f"no '*{data_config.img_suffix}' images in {img_dir}; expected "
                            f"{expected} (check data.img_suffix)")
  return listing, root


def folder_source(data_config, split: str, info: DatasetInfo) -> FolderSource:
  """The source of ``split``: listed, unpaired files refused or recorded, limited."""
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
  limit = example_limit(data_config, split)
  if limit >= 0:
    pairs = pairs[:limit]
  return FolderSource(dataset=data_config.name, split=split, pairs=pairs,
                      num_classes=info.num_classes, reduce_zero_label=info.reduce_zero_label,
                      skip_bad_files=bool(data_config.skip_bad_files), bad_files=bad_files)

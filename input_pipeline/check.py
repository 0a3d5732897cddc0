"""Validates a dataset before training on it.

  python -m input_pipeline.check --config experiments/configs/X.py[:arg] \
      [--split train,val] [--threads 4] [--max_examples -1]

Reports, per split: unpaired files (images without labels, labels without
images, split-file entries without images), unreadable or truncated images and
labels, colour (RGB) label images, label values outside the classes and the
ignore value 255, and image/label size mismatches; then the class histogram
(pixels and images per class, ignored pixels). Exits with status 1 if any
problem was found, 0 otherwise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from input_pipeline import command_line
from input_pipeline import datasets
from input_pipeline import image_io

ORPHAN_LABEL = "orphan_label"    # a label file without an image (folder datasets)
_KIND_TITLES = {
    image_io.MISSING: "unpaired image (no label) or missing file",
    ORPHAN_LABEL: "label without an image",
    image_io.UNREADABLE: "unreadable image or label",
    image_io.TRUNCATED: "truncated image or label",
    image_io.RGB_LABEL: "colour (RGB) label image",
    image_io.LABEL_VALUES: "label values outside the classes and 255",
    image_io.SIZE_MISMATCH: "image/label size mismatch",
}


@dataclasses.dataclass
class SplitReport:
  """What ``check_split`` found."""
  split: str
  num_examples: int = 0
  problems: list[image_io.BadFileError] = dataclasses.field(default_factory=list)
  pixel_counts: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(256, np.int64))   # per label value
  image_counts: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(256, np.int64))   # images containing the value

  def counts_by_kind(self) -> dict[str, int]:
    return dict(collections.Counter(p.kind for p in self.problems))


def _check_folder_pair(image_path: str, label_path: str, num_classes: int, reduce: bool):
  """Problems of one image/label pair and its label histogram (None if unreadable)."""
  problems, image, label = [], None, None
  try:
    image = image_io.decode_image(image_io.read_bytes(image_path), image_path)
  except image_io.BadFileError as e:
    problems.append(e)
  try:
    label = image_io.decode_label(image_io.read_bytes(label_path), label_path)
  except image_io.BadFileError as e:
    problems.append(e)
  if label is None:
    return problems, None
  if image is not None:
    try:
      image_io.check_same_size(image.shape, label.shape, image_path, label_path)
    except image_io.BadFileError as e:
      problems.append(e)
  if reduce:
    label = image_io.reduce_zero_label(label)
  try:
    image_io.check_label_values(label, num_classes, label_path, reduce)
  except image_io.BadFileError as e:
    problems.append(e)
  return problems, np.bincount(label.ravel(), minlength=256)


def _check_source_example(source, index: int):
  """Problems and histogram of one example of a non-folder source."""
  load = getattr(source, "load", source.__getitem__)
  try:
    label = load(index)["label"]
  except image_io.BadFileError as e:
    return [e], None
  return [], np.bincount(label.ravel(), minlength=256)


def listing_problems(listing: datasets.FolderListing) -> list[image_io.BadFileError]:
  """The pairing problems of a folder split's listing, one error per file."""
  problems = [image_io.BadFileError(i, f"no label file {l}", image_io.MISSING)
              for i, l in listing.unpaired_images]
  problems += [image_io.BadFileError(p, f"image of split-file entry {s!r} does not "
                                     "exist", image_io.MISSING)
               for s, p in listing.missing_images]
  problems += [image_io.BadFileError(l, "label file without an image", ORPHAN_LABEL)
               for l in listing.orphan_labels]
  return problems


def pairing_problems(data_config, split: str) -> list[image_io.BadFileError]:
  """Unpaired files of ``split`` (folder datasets; others have none), found from
  the file listing alone, without decoding anything: quick enough to run
  before training starts."""
  if data_config.name not in datasets.FOLDER_LAYOUTS:
    return []
  listing, _ = datasets.folder_listing(data_config, split)
  return listing_problems(listing)


def check_split(data_config, split: str, num_threads: int = 4,
                max_examples: int = -1) -> SplitReport:
  """Checks every example of ``split`` (or the first ``max_examples``)."""
  info = datasets.dataset_info(data_config)
  report = SplitReport(split)
  if data_config.name in datasets.FOLDER_LAYOUTS:
    listing, _ = datasets.folder_listing(data_config, split)
    report.problems += listing_problems(listing)
    pairs = listing.pairs if max_examples < 0 else listing.pairs[:max_examples]
    tasks = [(_check_folder_pair, (i, l, info.num_classes, info.reduce_zero_label))
             for _, i, l in pairs]
  else:
    source = datasets.build_source(data_config, split)
    n = len(source) if max_examples < 0 else min(max_examples, len(source))
    tasks = [(_check_source_example, (source, i)) for i in range(n)]
  report.num_examples = len(tasks)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for problems, histogram in pool.map(lambda task: task[0](*task[1]), tasks):
      report.problems += problems
      if histogram is not None:
        report.pixel_counts += histogram
        report.image_counts += histogram > 0
  return report


def format_report(report: SplitReport, info: datasets.DatasetInfo, max_listed: int = 10,
                  histogram: bool = True) -> str:
  """Human-readable summary: problems by kind (with examples), class histogram."""
  lines = [f"== {info.name} / {report.split}: {report.num_examples} examples checked, "
           f"{len(report.problems)} problems"]
  by_kind = collections.defaultdict(list)
  for problem in report.problems:
    by_kind[problem.kind].append(problem)
  for kind, problems in by_kind.items():
    lines.append(f"  {_KIND_TITLES.get(kind, kind)}: {len(problems)}")
    lines += [f"    {p}" for p in problems[:max_listed]]
    if len(problems) > max_listed:
      lines.append(f"    ... and {len(problems) - max_listed} more")
  if histogram:
    counts = report.pixel_counts
    labelled = int(counts[:info.num_classes].sum())
    total = int(counts.sum())
    lines.append(f"  class histogram: {labelled} labelled pixels, "
                 f"{int(counts[255])} ignored (255) = "
                 f"{100.0 * counts[255] / max(total, 1):.2f}% of all pixels")
    lines.append(f"  {'id':>4}  {'class':<24} {'pixels':>14} {'% labelled':>10} {'images':>8}")
    for k, name in enumerate(info.class_names):
      lines.append(f"  {k:>4}  {name:<24} {int(counts[k]):>14} "
                   f"{100.0 * counts[k] / max(labelled, 1):>10.3f} "
                   f"{int(report.image_counts[k]):>8}")
    absent = [info.class_names[k] for k in range(info.num_classes) if counts[k] == 0]
    if absent:
      lines.append(f"  classes absent from this split ({len(absent)}): " + ", ".join(absent))
  return "\n".join(lines)


def check(data_config, splits, num_threads: int = 4, max_examples: int = -1,
          max_listed: int = 10, histogram: bool = True, log=print) -> int:
  """Checks ``splits``, prints the reports; returns 1 if any problem, else 0."""
  info = datasets.dataset_info(data_config)
  problems = 0
  for split in splits:
    report = check_split(data_config, split, num_threads, max_examples)
    log(format_report(report, info, max_listed, histogram))
    problems += len(report.problems)
  log(f"{'FAILED' if problems else 'OK'}: {problems} problems in {', '.join(splits)}")
  return 1 if problems else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    status = check(datasets.data_config_of(f.config), [s for s in f.split.split(",") if s],
                   f.threads, f.max_examples, f.max_listed, f.histogram)
  except (OSError, ValueError) as e:   # wrong root/layout, bad config: a finding too
    print(f"FAILED: {e}")
    status = 1
  sys.exit(status)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("split", "train,val", "Comma-separated splits to check.")
  flags.DEFINE_integer("threads", 4, "Decoding threads.")
  flags.DEFINE_integer("max_examples", -1, "Check only the first N examples (-1 = all).")
  flags.DEFINE_integer("max_listed", 10, "Problems listed per kind.")
  flags.DEFINE_bool("histogram", True, "Print the class histogram.")
  command_line.run(main)

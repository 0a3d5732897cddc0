"""Files that cannot be used: strict loading, or replacement that is recorded.

A source raises ``image_io.BadFileError`` naming the file. With
``data.skip_bad_files=True`` it instead returns the next usable example and
records the bad one in its ``bad_files`` log (also logged as a warning once per
file), so nothing disappears silently.
"""

from __future__ import annotations

import threading

from absl import logging
import numpy as np

from input_pipeline import image_io


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
    """Adds one hit of ``error``'s file (a warning the first time)."""
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


class SkippingSource:
  """Shared ``__getitem__`` of the file-backed sources: strict, or replacing.

  Subclasses define ``__len__`` and ``load(index)`` (which raises
  ``BadFileError``) and set ``skip_bad_files`` and ``bad_files``.
  """

  skip_bad_files: bool
  bad_files: BadFileLog

  def load(self, index: int) -> dict:
    raise NotImplementedError

  def __len__(self) -> int:
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


def finish_label(label: np.ndarray, image_shape, label_path: str, image_path: str,
                 num_classes: int, reduce: bool) -> np.ndarray:
  """Checks a decoded label against its image and classes; applies reduce_zero_label."""
  image_io.check_same_size(image_shape, label.shape, image_path, label_path)
  if reduce:
    label = image_io.reduce_zero_label(label)
  image_io.check_label_values(label, num_classes, label_path, reduce)
  return label

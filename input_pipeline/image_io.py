"""Decoding images and label maps, with errors that name the file.

Images decode with cv2 (as the official pipeline's ``LoadImageFromFile``,
including EXIF orientation) and are returned RGB. Label maps are class-index
images: 8-bit grayscale PNGs decode with cv2; palette ("P" mode) and low-bit-depth
PNGs decode with PIL, which returns the stored indices exactly as the official
pillow-based ``LoadAnnotations`` does (cv2 would expand a palette to colours and
scale 1-bit masks to 0/255).

Every failure raises ``BadFileError`` carrying the path and a ``kind`` so that
tools can count problems by type.
"""

from __future__ import annotations

import io
import os

import cv2
from etils import epath
import numpy as np
from PIL import Image

# Problem kinds carried by BadFileError (also the row names of the check tool).
MISSING = "missing"              # a listed or paired file does not exist
UNREADABLE = "unreadable"        # not decodable as an image
TRUNCATED = "truncated"          # the file ends before the image data does
RGB_LABEL = "rgb_label"          # a colour image where a class-index map is expected
LABEL_VALUES = "label_values"    # label values outside the classes and the ignore value
SIZE_MISMATCH = "size_mismatch"  # image and label sizes differ
KINDS = (MISSING, UNREADABLE, TRUNCATED, RGB_LABEL, LABEL_VALUES, SIZE_MISMATCH)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE_PALETTE = 3


class BadFileError(ValueError):
  """A file of the dataset cannot be used; the message starts with its path."""

  def __init__(self, path: str, problem: str, kind: str):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem
    self.kind = kind

  def __reduce__(self):  # picklable across grain worker processes
    return (BadFileError, (self.path, self.problem, self.kind))


def read_bytes(path: str | os.PathLike) -> bytes:
  """The contents of ``path`` (local, ``gs://``, ... through ``etils.epath``);
  a missing or unreadable file is a BadFileError."""
  try:
    with epath.Path(path).open("rb") as f:
      return f.read()
  except FileNotFoundError:
    raise BadFileError(path, "file does not exist", MISSING) from None
  except OSError as e:
    raise BadFileError(path, f"cannot read file ({e.strerror or e})", UNREADABLE) from None


def write_image(path: str | os.PathLike, array: np.ndarray) -> None:
  """``cv2.imwrite`` through ``etils.epath``: encodes ``array`` (BGR, as cv2)
  in the format of ``path``'s suffix, then writes the bytes (local or remote).

  Raises:
    OSError: ``"<path>: cannot write"`` if encoding or writing fails.
  """
  path = epath.Path(path)
  try:
    ok, encoded = cv2.imencode(path.suffix, array)
  except cv2.error:
    ok = False
  if not ok:
    raise OSError(f"{path}: cannot write")
  try:
    path.write_bytes(encoded.tobytes())
  except OSError as e:
    raise OSError(f"{path}: cannot write") from e


def _jpeg_is_complete(data: bytes) -> bool:
  """True if a JPEG stream reaches its end-of-image marker.

  Walks the marker segments up to the first start-of-scan, then looks for the
  end-of-image marker after it. Byte stuffing guarantees FF D9 cannot occur
  inside entropy-coded data, and an embedded EXIF thumbnail (with its own
  FF D9) sits inside an APP segment that the walk skips, so neither fools it.
  """
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      return False
    marker = data[pos + 1]
    if marker == 0xFF:                       # fill byte before a marker
      pos += 1
      continue
    if marker == 0xD9:
      return True
    if 0xD0 <= marker <= 0xD7 or marker == 0x01:   # markers without a length
      pos += 2
      continue
    segment_end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker == 0xDA:                       # start of scan
      return data.find(b"\xff\xd9", segment_end) != -1
    pos = segment_end
  return False


def truncation_problem(data: bytes) -> str | None:
  """Why ``data`` looks cut short (JPEG or PNG), or None if it looks complete.

  cv2 5 refuses truncated files itself, but cv2 4 decodes a truncated JPEG into
  a partly grey image with only a warning on stderr; this check makes the
  behaviour the same everywhere.
  """
  if data[:2] == b"\xff\xd8" and not _jpeg_is_complete(data):
    return "truncated JPEG (no end-of-image marker after the image data)"
  if data[:8] == _PNG_SIGNATURE and b"IEND" not in data[-64:]:
    return "truncated PNG (no IEND chunk at the end of the file)"
  return None


def decode_image(data: bytes, path: str) -> np.ndarray:
  """Decodes an encoded image to ``[H, W, 3]`` uint8 RGB.

  Args:
    data: the encoded file contents (JPEG, PNG, or anything cv2 reads).
    path: where the bytes came from, for error messages.

  Raises:
    BadFileError: empty, undecodable or truncated data.
  """
  if not data:
    raise BadFileError(path, "empty file", UNREADABLE)
  problem = truncation_problem(data)
  if problem:
    raise BadFileError(path, problem, TRUNCATED)
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise BadFileError(path, "cannot decode as an image", UNREADABLE)
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _png_needs_pil(data: bytes) -> bool:
  """Palette PNGs and PNGs below 8 bits per sample (their values are indices)."""
  if data[:8] != _PNG_SIGNATURE or len(data) < 26:
    return False
  bit_depth, colour_type = data[24], data[25]
  return colour_type == _PNG_COLOUR_TYPE_PALETTE or bit_depth < 8


def decode_label(data: bytes, path: str, channel: int = -1) -> np.ndarray:
  """Decodes an encoded class-index map to ``[H, W]`` uint8, values unchanged.

  Args:
    data: the encoded file contents (normally PNG).
    path: where the bytes came from, for error messages.
    channel: -1 requires a single-channel map; ``c >= 0`` takes channel ``c``
      (in file order) of a multi-channel one (for datasets that store the class
      in one channel of an RGB image).

  Raises:
    BadFileError: undecodable or truncated data, a colour image where a
      single-channel map is required, or values above 255.
  """
  if not data:
    raise BadFileError(path, "empty file", UNREADABLE)
  problem = truncation_problem(data)
  if problem:
    raise BadFileError(path, problem, TRUNCATED)
  if _png_needs_pil(data):
    try:
      with Image.open(io.BytesIO(data)) as pil_image:
        label = np.asarray(pil_image)
    except (OSError, ValueError, SyntaxError) as e:
      raise BadFileError(path, f"cannot decode as an image ({e})", UNREADABLE) from None
  else:
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
      raise BadFileError(path, "cannot decode as an image", UNREADABLE)
    if label.ndim == 3 and label.shape[2] >= 3:
      label = cv2.cvtColor(label, cv2.COLOR_BGRA2RGBA if label.shape[2] == 4
                           else cv2.COLOR_BGR2RGB)
  return to_index_map(label, path, channel)


def to_index_map(label: np.ndarray, path: str, channel: int = -1) -> np.ndarray:
  """A decoded label array as ``[H, W]`` uint8 (see ``decode_label``)."""
  if label.ndim == 3:
    if channel >= 0:
      if channel >= label.shape[2]:
        raise BadFileError(path, f"label has {label.shape[2]} channels, cannot take "
                           f"channel {channel}", RGB_LABEL)
      label = label[..., channel]
    elif label.shape[2] == 1:
      label = label[..., 0]
    else:
      same = all(np.array_equal(label[..., 0], label[..., c]) for c in range(1, label.shape[2]))
      hint = ("its channels are all equal: save it as a single-channel (grayscale) PNG"
              if same else "convert colour-coded masks to class indices first")
      raise BadFileError(path, f"label is a {label.shape[2]}-channel colour image; a "
                         f"single-channel map of class indices is expected ({hint})",
                         RGB_LABEL)
  if label.dtype == np.uint8:
    return label
  if label.dtype == np.bool_:
    return label.astype(np.uint8)
  if np.issubdtype(label.dtype, np.integer) and label.size and label.min() >= 0 \
      and label.max() <= 255:
    return label.astype(np.uint8)
  lo, hi = (label.min(), label.max()) if label.size else (0, 0)
  raise BadFileError(path, f"label values must be 0..255 integers, got dtype {label.dtype} "
                     f"with range [{lo}, {hi}]", LABEL_VALUES)


def check_same_size(image_shape, label_shape, image_path: str, label_path: str) -> None:
  """Raises BadFileError (naming both files) unless image and label sizes match."""
  if tuple(image_shape[:2]) != tuple(label_shape[:2]):
    raise BadFileError(
        label_path, f"label size {label_shape[1]}x{label_shape[0]} (WxH) differs from image "
        f"{image_path} size {image_shape[1]}x{image_shape[0]}", SIZE_MISMATCH)


# 0 -> 255 (ignored), k -> k - 1, 255 -> 255: the official "0 -> 255, subtract 1,
# 254 -> 255" sequence as one lookup.
_REDUCE_ZERO_LUT = np.concatenate([[255], np.arange(254), [255]]).astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """The official ``reduce_zero_label``: 0 -> 255, k -> k - 1, 255 stays 255."""
  return _REDUCE_ZERO_LUT[label]


def check_label_values(label: np.ndarray, num_classes: int, path: str,
                       reduced: bool) -> None:
  """Raises BadFileError if ``label`` has values outside [0, K) and 255.

  Args:
    label: the label in training convention (after any reduction).
    num_classes: K.
    path: the label file, for the message.
    reduced: whether ``reduce_zero_label`` was applied (the message then also
      gives the values as stored in the file).
  """
  top = int(label.max()) if label.size else 0
  if top < num_classes:
    return
  bad = (label >= num_classes) & (label != 255)
  if not bad.any():
    return
  values = np.unique(label[bad])
  shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
  stored = ""
  if reduced:
    raw = ", ".join(str(v + 1) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    stored = (f" (stored values {raw}; with reduce_zero_label the file must hold "
              f"0..{num_classes} and 255)")
  raise BadFileError(path, f"{int(bad.sum())} label pixels have values {shown} outside the "
                     f"{num_classes} classes [0, {num_classes}) and the ignore value 255"
                     f"{stored}", LABEL_VALUES)

"""Static shapes for test images of any size: settings, views, buckets, batch plan.

mmsegmentation tests one image at a time; to run batched, jitted steps whose
shapes are known in advance, every image is placed into a *bucket*:

* each view of an image (the test-resized image, or one multi-scale/flip view
  of the original for TTA) is zero-padded bottom/right into a bucket shape: both
  sides rounded up on a ladder with ``buckets_per_octave`` steps between powers
  of two (at most 1/steps of padding per side; 0 = exact sizes), in multiples of
  the model's size divisor. Padded pixels are the mean colour (0 after
  normalisation), as in mmseg's batched test, and are cropped away again;
* the label (original resolution) is padded with 255 to the largest label of
  its group (in whole tiles), so padding never counts; each image's own label
  size bounds the label-resolution work (a loop over tiles);
* the final bilinear resize from the view to the label size, the crop of the
  padding and the un-flip of a flipped view are one gather with per-image
  source indices and weights (:func:`bilinear_taps`), so images of different
  sizes share a compiled step.

A :class:`Plan` groups the images of a split by bucket, sorts each group by
label size and cuts it into global batches; every process takes its share of
every batch, so all processes run the same steps and each image is scored once.
The bucket of an image depends only on its own size (and, for TTA views, on the
sizes in its group), never on the batch size or the number of devices.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np

from input_pipeline import transforms

TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
IGNORE_LABEL = 255
# Label-resolution work (resize to the label, argmax, confusion) runs over
# tiles of this many rows x columns, as many as each image's label needs.
TILE_ROWS = 16
TILE_COLS = 64


def _pair(value, name: str) -> tuple[int, int] | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return int(value), int(value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{name} must be an int or an (h, w) pair, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How to run a model on test images (``config.eval``'s inference fields).

  Attributes:
    mode: 'whole' or 'slide'.
    crop_size: (h, w) slide window; required for 'slide'.
    stride: (h, w) slide step; required for 'slide'.
    size_divisor: pad test images bottom/right to a multiple of this (0: only
      what the model needs, see ``construction.size_divisor``).
    batch_size: global images per evaluation step (rounded up to a multiple of
      the devices); for a single image (:class:`inference.Segmenter`), the
      slide windows per model call.
    tta: multi-scale (+ flip) test-time augmentation.
    tta_ratios: scale factors applied to the original image.
    tta_flip: also run the horizontally flipped view of every scale.
    buckets_per_octave: bucket sides between two powers of two (padding at
      most 1/this per side); 0 pads only to the size divisor (one bucket, and
      one compile, per distinct image size).
  """
  mode: str = "whole"
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  size_divisor: int = 0
  batch_size: int = 1
  tta: bool = False
  tta_ratios: tuple[float, ...] = TTA_RATIOS
  tta_flip: bool = True
  buckets_per_octave: int = 4

  def __post_init__(self):
    object.__setattr__(self, "crop_size", _pair(self.crop_size, "crop_size"))
    object.__setattr__(self, "stride", _pair(self.stride, "stride"))
    object.__setattr__(self, "size_divisor", int(self.size_divisor or 0))
    object.__setattr__(self, "tta_ratios", tuple(float(r) for r in self.tta_ratios))
    object.__setattr__(self, "buckets_per_octave", int(self.buckets_per_octave or 0))
    if self.mode not in ("whole", "slide"):
      raise ValueError(f"eval mode must be 'whole' or 'slide', got {self.mode!r}")
    if self.mode == "slide":
      if self.crop_size is None or self.stride is None:
        raise ValueError("slide inference needs eval.crop_size and eval.stride")
      if min(self.crop_size + self.stride) <= 0:
        raise ValueError(f"crop_size {self.crop_size} and stride {self.stride} must be positive")
    if self.batch_size < 1:
      raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
    if self.tta and (not self.tta_ratios or min(self.tta_ratios) <= 0):
      raise ValueError(f"tta_ratios must be positive, got {self.tta_ratios}")
    if self.buckets_per_octave < 0:
      raise ValueError(f"eval.buckets_per_octave must be >= 0, got {self.buckets_per_octave}")

  @classmethod
  def from_config(cls, eval_config, mode: str | None = None,
                  tta: bool | None = None) -> "InferenceSettings":
    """Reads ``config.eval``; ``mode``/``tta`` (e.g. command-line flags) override it."""
    get = eval_config.get
    return cls(
        mode=mode or get("mode", "whole"),
        crop_size=get("crop_size", None),
        stride=get("stride", None),
        size_divisor=get("size_divisor", 0) or 0,
        batch_size=int(get("batch_size", 1) or 1),
        tta=bool(get("tta", False) if tta is None else tta),
        tta_ratios=tuple(get("tta_ratios", TTA_RATIOS) or TTA_RATIOS),
        tta_flip=bool(get("tta_flip", True)),
        buckets_per_octave=int(get("buckets_per_octave", 4)))


# ----------------------------------------------------------------------------
# Sizes


def round_up(n: int, multiple: int) -> int:
  multiple = max(int(multiple), 1)
  return -(-int(n) // multiple) * multiple


def bucket_side(n: int, divisor: int = 1, steps: int = 4) -> int:
  """The bucket side for a side of ``n`` pixels (``>= n``, a multiple of ``divisor``).

  Between 2^k and 2^(k+1) the sides are the multiples of 2^k / ``steps``
  (themselves rounded up to the divisor), so padding stays below 1/steps of
  the side and a split of arbitrary sizes needs about ``steps`` buckets per
  octave per side. ``steps=0``: exactly ``n`` rounded up to the divisor.
  """
  n, divisor = max(int(n), 1), max(int(divisor), 1)
  if steps <= 0:
    return round_up(n, divisor)
  octave = 1 << (n.bit_length() - 1)              # largest power of two <= n
  grain = round_up(max(octave // int(steps), 1), divisor)
  return round_up(n, grain)


def slide_windows(height: int, width: int, crop_size: Sequence[int],
                  stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg's sliding windows ``(y1, y2, x1, x2)`` over an ``height x width`` image.

  Every window has the same size, ``min(crop, image)`` per axis; the last
  window of each axis is pulled back so that it ends at the border.
  """
  crop_h, crop_w = crop_size
  stride_h, stride_w = stride
  rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
  cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
  windows = []
  for i in range(rows):
    for j in range(cols):
      y2 = min(i * stride_h + crop_h, height)
      x2 = min(j * stride_w + crop_w, width)
      windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
  return windows


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
  """mmcv ``rescale_size`` with a (w, h) ``scale`` pair: the (h, w) after a
  keep-ratio resize that fits the long side into ``max(scale)`` and the short
  side into ``min(scale)``, rounded as ``int(x * f + 0.5)``."""
  return transforms.keep_ratio_size(height, width, scale)


def tta_view_size(height: int, width: int, ratio: float) -> tuple[int, int]:
  """(h, w) of the TTA view at ``ratio`` of an original ``height x width`` image.

  mmcv's ``Resize(scale_factor=r, keep_ratio=True)``: the target scale is the
  image size times ``r`` (rounded), then the keep-ratio rule is applied to it.
  """
  scale = (int(width * ratio + 0.5), int(height * ratio + 0.5))
  return keep_ratio_size(height, width, scale)


def pad_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
  """Zero-pads an HxWxC image at the bottom/right to multiples of ``divisor``."""
  if not divisor:
    return image
  h, w = image.shape[:2]
  pad_h, pad_w = -h % divisor, -w % divisor
  if not pad_h and not pad_w:
    return image
  return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))


def bilinear_taps(n_in: int, n_out: int, length: int | None = None, flip: bool = False):
  """Source rows ``(i0, i1)`` and weights ``w`` of torch's bilinear resize
  (align_corners=False, no antialiasing) from ``n_in`` to ``n_out``, so that
  ``out[d] = x[i0[d]] * (1 - w[d]) + x[i1[d]] * w[d]``.

  ``flip``: the source is stored mirrored (index ``n_in - 1 - i``). Entries
  from ``n_out`` to ``length`` (padding) read row 0 with weight 0.
  """
  length = n_out if length is None else int(length)
  dst = np.arange(n_out, dtype=np.float64)
  src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w = (src - i0).astype(np.float32)
  if flip:
    i0, i1 = n_in - 1 - i0, n_in - 1 - i1
  out_i0 = np.zeros(length, np.int32)
  out_i1 = np.zeros(length, np.int32)
  out_w = np.zeros(length, np.float32)
  out_i0[:n_out], out_i1[:n_out], out_w[:n_out] = i0, i1, w
  return out_i0, out_i1, out_w


# ----------------------------------------------------------------------------
# Views and batch shapes


@dataclasses.dataclass(frozen=True)
class View:
  """One forward view of a test image: ``ratio`` of the original (TTA) or the
  test-resized image (``ratio=None``), optionally mirrored."""
  ratio: float | None = None
  flip: bool = False


@dataclasses.dataclass(frozen=True)
class ViewShape:
  """Static shape of one view in a batch.

  Attributes:
    bucket: (H, W) the view image is padded into (the whole-mode model input
      and the canvas of slide mode).
    window: slide window (h, w) (``min(crop, bucket)``), None in whole mode.
    slots: windows per image (the most any image of the bucket needs); 1 in
      whole mode.
  """
  bucket: tuple[int, int]
  window: tuple[int, int] | None = None
  slots: int = 1


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """Static shapes of a batch.

  Attributes:
    views: the view shapes (all images of the batch share them).
    label: (HL, WL) of the label arrays: the largest label of the image's
      group, in whole tiles (:func:`label_extent`); each image's own label
      size bounds the work done on it.
    per_device: images per device.
  """
  views: tuple[ViewShape, ...]
  label: tuple[int, int]
  per_device: int = 1


def label_extent(hw: Sequence[int]) -> tuple[int, int]:
  """Label array shape holding a (h, w) label: whole evaluation tiles."""
  return round_up(hw[0], TILE_ROWS), round_up(hw[1], TILE_COLS)


class Geometry:
  """Per-image sizes, buckets and host arrays for one set of settings.

  Args:
    settings: :class:`InferenceSettings`.
    divisor: the size divisor every model input must be a multiple of (the
      model's, combined with ``settings.size_divisor``).
    test_scale: (w, h) keep-ratio test resize of ``config.data.test_scale``
      (empty: images keep their size); not used by TTA views, which rescale
      the original image.
    views: explicit views instead of the settings' (e.g. one mirrored view).
  """

  def __init__(self, settings: InferenceSettings, divisor: int = 1,
               test_scale: Sequence[int] = (), views: Sequence[View] | None = None):
    self.settings = settings
    self.divisor = max(int(divisor), 1)
    self.test_scale = tuple(int(v) for v in test_scale) if test_scale else ()
    self.steps = settings.buckets_per_octave
    if views is not None:
      self.views = tuple(views)
    elif settings.tta:
      flips = (False, True) if settings.tta_flip else (False,)
      self.views = tuple(View(r, f) for r in settings.tta_ratios for f in flips)
    else:
      self.views = (View(),)

  # --- sizes -------------------------------------------------------------------

  def view_size(self, label_hw: Sequence[int], view: View) -> tuple[int, int]:
    """(h, w) of ``view`` of an image whose original size is ``label_hw``."""
    h, w = int(label_hw[0]), int(label_hw[1])
    if view.ratio is not None:
      return tta_view_size(h, w, view.ratio)
    if self.test_scale:
      return keep_ratio_size(h, w, self.test_scale)
    return h, w

  def padded(self, hw: Sequence[int]) -> tuple[int, int]:
    return round_up(hw[0], self.divisor), round_up(hw[1], self.divisor)

  def bucket(self, hw: Sequence[int]) -> tuple[int, int]:
    """The bucket of a view of size ``hw`` (after padding to the divisor)."""
    return (bucket_side(round_up(hw[0], self.divisor), self.divisor, self.steps),
            bucket_side(round_up(hw[1], self.divisor), self.divisor, self.steps))

  def label_bucket(self, hw: Sequence[int]) -> tuple[int, int]:
    return bucket_side(hw[0], 1, self.steps), bucket_side(hw[1], 1, self.steps)

  def group_key(self, label_hw: Sequence[int]) -> tuple[int, int]:
    """Images with the same key share view buckets: the bucket of the test
    view, or for TTA the bucket of the original image."""
    if self.settings.tta:
      return self.label_bucket(label_hw)
    return self.bucket(self.view_size(label_hw, self.views[0]))

  def plan(self, label_sizes: Mapping[int, Sequence[int] | None], batch_size: int,
           num_processes: int = 1, num_devices: int | None = None) -> "Plan":
    """:func:`build_plan` of ``label_sizes`` with these sizes and buckets."""
    return build_plan(label_sizes, self, batch_size, num_processes, num_devices)

  def view_shape(self, bucket: tuple[int, int]) -> ViewShape:
    if self.settings.mode == "whole":
      return ViewShape(bucket)
    crop, stride = self.settings.crop_size, self.settings.stride
    window = (min(crop[0], bucket[0]), min(crop[1], bucket[1]))
    rows = max(bucket[0] - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(bucket[1] - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    return ViewShape(bucket, window, rows * cols)

  def group_view_shapes(self, label_sizes: Iterable[Sequence[int]]) -> tuple[ViewShape, ...]:
    """View shapes of a group: per view, the bucket of the largest member view."""
    sizes = list(label_sizes)
    if not self.settings.tta:
      return (self.view_shape(self.group_key(sizes[0])),)
    shapes = []
    for view in self.views:
      hs, ws = zip(*(self.bucket(self.view_size(s, view)) for s in sizes))
      shapes.append(self.view_shape((max(hs), max(ws))))
    return tuple(shapes)

  # --- host arrays of one example ---------------------------------------------

  def keys(self, shape: BatchShape) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of one example's arrays for a batch shape."""
    hl, wl = shape.label
    spec = {"index": ((), np.int32), "mask": ((), np.bool_), "label_hw": ((2,), np.int32),
            "label": ((hl, wl), np.uint8)}
    for v, vs in enumerate(shape.views):
      spec[f"image{v}"] = (vs.bucket + (3,), np.uint8)
      spec[f"hw{v}"] = ((2,), np.int32)
      for axis, n in (("rows", hl), ("cols", wl)):
        spec[f"{axis}{v}_i0"] = ((n,), np.int32)
        spec[f"{axis}{v}_i1"] = ((n,), np.int32)
        spec[f"{axis}{v}_w"] = ((n,), np.float32)
      if vs.window is not None:
        spec[f"origins{v}"] = ((vs.slots, 2), np.int32)
        spec[f"win_hw{v}"] = ((vs.slots, 2), np.int32)
    return spec

  def empty(self, shape: BatchShape, image_dtype=np.uint8) -> dict[str, np.ndarray]:
    """A padding slot: zeros everywhere, label 255, ``mask`` False, index -1."""
    out = {}
    for name, (dims, dtype) in self.keys(shape).items():
      if name.startswith("image"):
        dtype = image_dtype
      out[name] = np.zeros(dims, dtype)
    out["label"][...] = IGNORE_LABEL
    out["index"] = np.int32(-1)
    for name in out:
      if name.startswith("origins"):
        out[name][...] = -1                      # -1: no window in this slot
    return out

  def view_image(self, image: np.ndarray, size: Sequence[int], view: View) -> np.ndarray:
    """The view's image: resized with cv2 bilinear (mmcv's ``imresize``) when
    its size differs, then mirrored for a flip view."""
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] != (h, w):
      image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if view.flip:
      image = image[:, ::-1]
    return image

  def example(self, image: np.ndarray, label: np.ndarray | None, index: int,
              shape: BatchShape, label_hw: Sequence[int] | None = None,
              view_hw: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one example for a batch of ``shape``.

    Args:
      image: the original image (uint8 RGB; float32 images are taken as already
        normalised and must have their view's size).
      label: its label (original resolution, 255 = ignore) or None (predict).
      index: the example's index (seeds its random streams).
      shape: the batch's static shape.
      label_hw: output size when ``label`` is None (default: the image size).
      view_hw: the size of the (single, non-TTA) view when ``image`` is already
        test-resized (default: from ``label_hw`` and the test scale).
    """
    label_hw = tuple(int(v) for v in (label.shape if label is not None else
                                      (label_hw or image.shape[:2])))
    out = self.empty(shape, image.dtype)
    hl, wl = shape.label
    if label_hw[0] > hl or label_hw[1] > wl:
      raise ValueError(f"label {label_hw} does not fit its bucket {shape.label}")
    if label is not None:
      out["label"][:label_hw[0], :label_hw[1]] = label
    out["index"] = np.int32(index)
    out["mask"] = np.bool_(True)
    out["label_hw"] = np.asarray(label_hw, np.int32)
    for v, (view, vs) in enumerate(zip(self.views, shape.views)):
      h, w = self.view_size(label_hw, view) if view_hw is None else tuple(view_hw)
      picture = self.view_image(image, (h, w), view)
      if h > vs.bucket[0] or w > vs.bucket[1]:
        raise ValueError(f"view {h}x{w} does not fit its bucket {vs.bucket}")
      out[f"image{v}"][:h, :w] = picture
      out[f"hw{v}"] = np.asarray((h, w), np.int32)
      for axis, n_in, n_out, length, flip in (("rows", h, label_hw[0], hl, False),
                                              ("cols", w, label_hw[1], wl, view.flip)):
        i0, i1, weight = bilinear_taps(n_in, n_out, length, flip)
        out[f"{axis}{v}_i0"], out[f"{axis}{v}_i1"], out[f"{axis}{v}_w"] = i0, i1, weight
      if vs.window is not None:
        ph, pw = self.padded((h, w))
        windows = slide_windows(ph, pw, self.settings.crop_size, self.settings.stride)
        if len(windows) > vs.slots:
          raise ValueError(f"{len(windows)} windows do not fit the {vs.slots} slots of "
                           f"bucket {vs.bucket}")
        for j, (y1, _, x1, _) in enumerate(windows):
          out[f"origins{v}"][j] = (y1, x1)
          # The part of the window inside the image; the rest is padding (0).
          out[f"win_hw{v}"][j] = (min(vs.window[0], max(h - y1, 0)),
                                  min(vs.window[1], max(w - x1, 0)))
    return out


# ----------------------------------------------------------------------------
# The plan of a split


@dataclasses.dataclass
class Plan:
  """Global batches covering a split once.

  Attributes:
    shapes: the static shape of every global batch.
    slots: per global batch, its image indices (-1 = padding) in global row
      order: device ``d`` holds rows ``[d * b, (d + 1) * b)`` with
      ``b = shape.per_device``.
    num_processes: processes sharing each batch (process ``p`` takes rows
      ``[p * n, (p + 1) * n)`` with ``n = len(slots) / num_processes``).
    skipped: indices left out of the plan (their size could not be read).
  """
  shapes: list[BatchShape]
  slots: list[list[int]]
  num_processes: int
  skipped: list[int] = dataclasses.field(default_factory=list)

  def local_batch(self, batch: int) -> int:
    """Rows of global batch ``batch`` each process holds."""
    return len(self.slots[batch]) // self.num_processes

  def entries(self, process: int) -> list[list[int]]:
    """Per global batch, the image indices (or -1) process ``process`` loads."""
    out = []
    for t, slots in enumerate(self.slots):
      n = self.local_batch(t)
      out.append(slots[process * n:(process + 1) * n])
    return out

  def indices(self, process: int) -> list[int]:
    """The images process ``process`` scores."""
    return [i for rows in self.entries(process) for i in rows if i >= 0]

  @property
  def num_images(self) -> int:
    return sum(1 for slots in self.slots for i in slots if i >= 0)

  def buckets(self) -> list[tuple[tuple[int, int], ...]]:
    """The distinct view buckets, for logs."""
    return sorted({tuple(v.bucket for v in s.views) for s in self.shapes})


def build_plan(label_sizes: Mapping[int, Sequence[int] | None], geometry: Geometry,
               batch_size: int, num_processes: int = 1, num_devices: int | None = None) -> Plan:
  """Groups images by bucket and cuts the groups into global batches.

  A group smaller than ``batch_size`` gets a smaller batch (a multiple of the
  devices), so small splits waste few padding rows; each group keeps one batch
  shape, hence one compiled step per bucket and mode.

  Args:
    label_sizes: ``{index: (H, W)}`` original size of every image to score
      (None: unreadable; such images are listed in ``Plan.skipped``).
    geometry: sizes and buckets.
    batch_size: global images per batch; a multiple of ``num_devices``.
    num_processes: processes sharing every batch.
    num_devices: devices over all processes (default: ``num_processes``).
  """
  devices = int(num_devices or num_processes)
  if batch_size % devices or devices % num_processes:
    raise ValueError(f"global eval batch {batch_size} does not split over {devices} "
                     f"devices of {num_processes} processes")
  groups: dict[tuple[int, int], list[int]] = {}
  skipped = []
  for index in sorted(label_sizes):
    size = label_sizes[index]
    if size is None:
      skipped.append(index)
      continue
    groups.setdefault(geometry.group_key(size), []).append(index)
  shapes, slots = [], []
  for key in sorted(groups):
    members = groups[key]
    views = geometry.group_view_shapes(label_sizes[i] for i in members)
    label = label_extent((max(label_sizes[i][0] for i in members),
                          max(label_sizes[i][1] for i in members)))
    size = min(batch_size, round_up(len(members), devices))
    shape = BatchShape(views, label, size // devices)
    for start in range(0, len(members), size):
      chunk = members[start:start + size]
      shapes.append(shape)
      slots.append(chunk + [-1] * (size - len(chunk)))
  return Plan(shapes, slots, num_processes, skipped)

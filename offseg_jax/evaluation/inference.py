"""Whole, slide and multi-scale + flip inference with mmsegmentation's semantics.

One :class:`Segmenter` runs a model on single images of any size, the way
mmseg's ``EncoderDecoder`` and ``SegTTAModel`` do at test time:

* optional bottom/right zero padding to a multiple of ``size_divisor`` (after
  normalisation, so padded pixels are the mean colour), removed again before
  the final resize;
* ``whole``: one forward over the (padded) image, logits bilinearly resized to
  the padded size;
* ``slide``: ``n = max(H - c + s - 1, 0) // s + 1`` windows per axis, window
  ``i`` spans ``y1 = i*s, y2 = min(y1 + c, H), y1 = max(y2 - c, 0)``; each
  window's logits are resized to the window, summed into a canvas and divided
  by the per-pixel window count. On images smaller than the crop the window is
  the whole (smaller) image, run as-is;
* the logits are resized (bilinear, align_corners=False) to the original label
  size before the argmax;
* TTA: every ratio of ``tta_ratios`` rescales the *original* image with mmcv's
  keep-ratio rule (the mmseg 1.x ``tta_pipeline``: ``Resize(scale_factor=r,
  keep_ratio=True)`` on the loaded image), optionally also flipped; each view's
  logits are mapped back to the original frame, softmaxed and averaged.

Shapes stay static so compiled code is reused: in slide mode the model runs on
a fixed-size batch of windows (the last chunk is padded, its size rounded up to
a power of two, so a handful of compiles serve every image size); in whole mode
one compile serves each padded image size. The model's jitted forward is keyed
by the model, so every :class:`Segmenter` of the same model (e.g. one per
evaluation during training) reuses it. Canvas accumulation and the final resize
are separate, cheap-to-compile functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import transforms
from offseg_jax.models import layers

TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


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
  """How to run a model on one test image (``config.eval``'s inference fields).

  Attributes:
    mode: 'whole' or 'slide'.
    crop_size: (h, w) slide window; required for 'slide'.
    stride: (h, w) slide step; required for 'slide'.
    size_divisor: pad test images bottom/right to a multiple of this (0: off).
    batch_size: windows per jitted call in slide mode.
    tta: multi-scale (+ flip) test-time augmentation.
    tta_ratios: scale factors applied to the original image.
    tta_flip: also run the horizontally flipped view of every scale.
  """
  mode: str = "whole"
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  size_divisor: int = 0
  batch_size: int = 1
  tta: bool = False
  tta_ratios: tuple[float, ...] = TTA_RATIOS
  tta_flip: bool = True

  def __post_init__(self):
    object.__setattr__(self, "crop_size", _pair(self.crop_size, "crop_size"))
    object.__setattr__(self, "stride", _pair(self.stride, "stride"))
    object.__setattr__(self, "size_divisor", int(self.size_divisor or 0))
    object.__setattr__(self, "tta_ratios", tuple(float(r) for r in self.tta_ratios))
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
        tta_flip=bool(get("tta_flip", True)))


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
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


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


def _chunk_size(remaining: int, batch_size: int) -> int:
  """Windows to run in the next call: the batch size, or for the last chunk the
  next power of two, so that few batch shapes are ever compiled."""
  return min(batch_size, 1 << max(remaining - 1, 0).bit_length())


def _accumulate(canvas, window_logits, origins, valid):
  """Adds each valid window's logits into the [H, W, K] canvas at its origin."""
  _, crop_h, crop_w, k = window_logits.shape

  def add_one(i, canvas):
    y, x = origins[i, 0], origins[i, 1]
    current = jax.lax.dynamic_slice(canvas, (y, x, 0), (crop_h, crop_w, k))
    update = current + jnp.where(valid[i], window_logits[i], 0.0)
    return jax.lax.dynamic_update_slice(canvas, update, (y, x, 0))

  return jax.lax.fori_loop(0, window_logits.shape[0], add_one, canvas)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(apply_fn, variables, images, key):
  """Model logits resized to the input size, float32. Jitted per model (the
  apply function is static) and per input shape, so repeated evaluations of
  the same model, e.g. during training, reuse the compiled code."""
  logits, _ = apply_fn(variables, images, train=False, rngs={"ham": key})
  # Accumulate and resize in float32 whatever the model's compute dtype.
  return layers.resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])


_accumulate_jit = jax.jit(_accumulate)
# Donating the canvas lets XLA add windows in place (CPU cannot donate).
_accumulate_donating = jax.jit(_accumulate, donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("valid_hw", "out_hw", "flip", "output"))
def _finish(canvas, count, *, valid_hw, out_hw, flip, output):
  """Canvas -> original frame: average, crop padding, un-flip, resize, reduce."""
  if count is not None:
    canvas = canvas / count[..., None]
  canvas = canvas[:valid_hw[0], :valid_hw[1]]
  if flip:
    canvas = canvas[:, ::-1]
  logits = layers.resize_bilinear(canvas[None], out_hw)[0]
  if output == "labels":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if output == "probs":
    return jax.nn.softmax(logits, axis=-1)
  return logits


def local_copy(variables, device):
  """Puts a pytree on one local device, gathering globally sharded arrays.

  Training keeps variables on a multi-process mesh; inference here runs each
  image on a single local device, so every leaf must be whole on this process.
  Call it on all processes together when leaves are sharded across them.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        x = x.addressable_shards[0].data
      else:
        x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_put(x, device)

  return jax.tree_util.tree_map(one, variables)


class Segmenter:
  """Applies a segmentation model to single test images (mmseg test semantics).

  Args:
    model: a Flax module (or anything with ``apply``) called as
      ``apply(variables, images, train=False, rngs={'ham': key}) -> (logits,
      aux)`` with NHWC normalised images and NHWC logits at the head stride.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    settings: :class:`InferenceSettings`.
    mean, std: RGB normalisation (0..255 scale), as ``config.data.mean/std``.
    seed: seeds the ``'ham'`` stream (SegNeXt draws NMF bases at test time).
    device: where to run (default: this process's first local device).
  """

  def __init__(self, model: Any, variables, settings: InferenceSettings, *,
               mean: Sequence[float], std: Sequence[float], seed: int = 0,
               device=None):
    self.settings = settings
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.device = device or jax.local_devices()[0]
    self.variables = local_copy(variables, self.device)
    self._apply: Callable = model.apply if hasattr(model, "apply") else model
    self._key = jax.random.key(seed)
    self._calls = 0
    self._accumulate = _accumulate_jit if self.device.platform == "cpu" else _accumulate_donating

  def _run_model(self, images: np.ndarray):
    return _forward_logits(self._apply, self.variables, self.put(images), self._next_key())

  def _next_key(self):
    self._calls += 1
    return jax.random.fold_in(self._key, self._calls)

  def put(self, array):
    """Copies a host array (or pytree) to this segmenter's device."""
    return jax.device_put(array, self.device)

  def normalize(self, image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 normalised (floats are passed through unchanged)."""
    if image.dtype == np.uint8:
      return transforms.normalize(image, self.mean, self.std)
    return np.asarray(image, np.float32)

  # --- one view ---------------------------------------------------------------

  def _whole(self, image: np.ndarray):
    return self._run_model(image[None])[0], None

  def _slide(self, image: np.ndarray):
    height, width, channels = image.shape
    settings = self.settings
    windows = slide_windows(height, width, settings.crop_size, settings.stride)
    crop_h = min(settings.crop_size[0], height)
    crop_w = min(settings.crop_size[1], width)
    count = np.zeros((height, width), np.float32)
    canvas = None
    start = 0
    while start < len(windows):
      size = _chunk_size(len(windows) - start, settings.batch_size)
      chunk = windows[start:start + size]
      start += len(chunk)
      crops = np.zeros((size, crop_h, crop_w, channels), np.float32)
      origins = np.zeros((size, 2), np.int32)
      valid = np.zeros((size,), bool)
      for j, (y1, y2, x1, x2) in enumerate(chunk):
        crops[j] = image[y1:y2, x1:x2]
        origins[j] = (y1, x1)
        valid[j] = True
        count[y1:y2, x1:x2] += 1
      logits = self._run_model(crops)
      if canvas is None:
        canvas = jnp.zeros((height, width, logits.shape[-1]), jnp.float32,
                           device=self.device)
      canvas = self._accumulate(canvas, logits, self.put(origins), self.put(valid))
    return canvas, self.put(count)

  def view(self, image: np.ndarray, out_hw: Sequence[int], *, flip: bool = False,
           output: str = "logits") -> jax.Array:
    """Runs one view of an image and maps the result to an ``out_hw`` frame.

    Args:
      image: HxWx3 image as the model sees it (uint8 RGB, or already
        normalised float32), i.e. after the test resize.
      out_hw: (h, w) of the original image / label.
      flip: run on the horizontally flipped image and flip the result back.
      output: 'logits', 'probs' (softmax) or 'labels' (int32 argmax).

    Returns:
      A device array [h, w, K] (or [h, w] labels).
    """
    image = self.normalize(image)
    if flip:
      image = image[:, ::-1]
    height, width = image.shape[:2]
    padded = np.ascontiguousarray(pad_to_multiple(image, self.settings.size_divisor))
    if self.settings.mode == "whole":
      canvas, count = self._whole(padded)
    else:
      canvas, count = self._slide(padded)
    return _finish(canvas, count, valid_hw=(height, width),
                        out_hw=tuple(int(v) for v in out_hw), flip=bool(flip),
                        output=output)

  # --- full test-time behaviour ----------------------------------------------

  def tta_probabilities(self, original: np.ndarray) -> jax.Array:
    """Mean softmax over the TTA views of an original-resolution uint8 image."""
    height, width = original.shape[:2]
    flips = (False, True) if self.settings.tta_flip else (False,)
    total, views = None, 0
    for ratio in self.settings.tta_ratios:
      view_h, view_w = tta_view_size(height, width, ratio)
      image = original
      if (view_h, view_w) != (height, width):
        image = cv2.resize(original, (view_w, view_h), interpolation=cv2.INTER_LINEAR)
      for flip in flips:
        probs = self.view(image, (height, width), flip=flip, output="probs")
        total = probs if total is None else total + probs
        views += 1
    return total / views

  def labels(self, image: np.ndarray, out_hw: Sequence[int] | None = None) -> jax.Array:
    """Device int32 [h, w] prediction in the original frame.

    Without TTA ``image`` is the test-resized image and ``out_hw`` the original
    size (default: the image's own size). With TTA ``image`` must be the
    original image (views are rescaled from it) and ``out_hw`` its size.
    """
    if self.settings.tta:
      if out_hw is not None and tuple(out_hw) != image.shape[:2]:
        raise ValueError("with TTA pass the original image: its size is the output size "
                         f"(got image {image.shape[:2]}, out_hw {tuple(out_hw)})")
      return jnp.argmax(self.tta_probabilities(image), axis=-1).astype(jnp.int32)
    return self.view(image, out_hw or image.shape[:2], output="labels")

  def predict(self, image: np.ndarray, out_hw: Sequence[int] | None = None) -> np.ndarray:
    """Host int32 [h, w] prediction; see :meth:`labels`."""
    return np.asarray(self.labels(image, out_hw))

"""Per-example transforms with the official (mmseg) semantics, in numpy + cv2.

Training, per example (``build_train_transform``), in the official order:
  1. RandomResize: ratio r ~ U[lo, hi), target scale (int(W_s r), int(H_s r)),
     keep-ratio factor f = min(long/long_edge, short/short_edge), new size
     int(x f + 0.5); cv2 INTER_LINEAR for the image, INTER_NEAREST for labels.
  2. RandomCrop to ``crop_size`` (smaller if the image is) with ``cat_max_ratio``:
     up to 10 redraws while the crop holds a single class or one class covers
     >= cat_max_ratio of its labelled pixels; the 11th draw is used unchecked.
  3. RandomFlip (horizontal), image and label together.
  4. PhotoMetricDistortion on uint8 with clipping (truncation to uint8) after
     every step, saturation/hue in cv2 HSV (H in [0, 180)).
Then, per example as well (``build_train_finalize``): ``normalize`` and
``pad_to_crop`` (bottom/right; 0 in *normalised* space, i.e. the mean colour,
and 255 for labels), exactly the official data preprocessor's order. Padding a
uint8 image with 0 before normalising would instead give pixels of value
-mean/std, which is why padding happens last, on the float image.
The trainer's default transfer path (``build_train_finalize_uint8``) pads the
uint8 image, sends it with its unpadded size, and normalises on the device,
where the padded pixels are set to 0: the same batch (to 1 ulp), 4x fewer bytes.

Randomness: every draw comes from the ``np.random.Generator`` passed in (the
loader derives it from (seed, epoch, index)), in a fixed order, once per
example. Steps that are switched off, and crops of images that already fit,
draw nothing.

Images are RGB (the official pipeline works on BGR): resize, crop, flip,
brightness and contrast act per channel and do not care; the HSV conversions
use the RGB variants of the cv2 codes, which give the same HSV as BGR2HSV on
the BGR image.

Evaluation (``build_eval_transform``): keep-ratio resize of the image to
``test_scale`` (the rule above at r = 1), label left at full resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import numpy as np

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------
# Geometry


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
  """Size ``(new_h, new_w)`` of a keep-ratio resize to ``scale`` (official rule).

  The long side is bounded by ``max(scale)`` and the short side by
  ``min(scale)``; the order of ``scale`` does not matter.
  """
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
  """Resizes an image (bilinear) and its label (nearest) to ``size = (h, w)``."""
  dsize = (size[1], size[0])
  image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
  if label is not None:
    label = cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST)
  return image, label


def random_resize(image, label, rng: np.random.Generator, scale: Sequence[int],
                  ratio_range: Sequence[float]):
  """RandomResize with ``ratio_range`` and keep_ratio (one draw)."""
  lo, hi = ratio_range
  ratio = rng.random() * (hi - lo) + lo
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  return resize_pair(image, label, keep_ratio_size(*label.shape[:2], target))


def crop_offsets(label: np.ndarray, crop_size: Sequence[int], rng: np.random.Generator,
                 cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
  """Top-left corner ``(y, x)`` of a random crop (RandomCrop's bbox rule).

  Args:
    label: ``[H, W]`` uint8 label of the (resized) image.
    crop_size: ``(crop_h, crop_w)``.
    rng: the example's generator; offsets are drawn y then x.
    cat_max_ratio: < 1 enables the up-to-10 redraws (see module docstring).
    ignore_index: label value left out of the class histogram.
  """
  crop_h, crop_w = crop_size
  margin_h = max(label.shape[0] - crop_h, 0)
  margin_w = max(label.shape[1] - crop_w, 0)
  if margin_h == 0 and margin_w == 0:
    return 0, 0   # every draw would give (0, 0)

  def draw():
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

  y, x = draw()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      counts = np.bincount(label[y:y + crop_h, x:x + crop_w].ravel(), minlength=256)
      counts[ignore_index] = 0
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = draw()
  return y, x


def random_crop(image, label, rng, crop_size, cat_max_ratio=1.0):
  """Crops image and label at ``crop_offsets`` (no padding)."""
  y, x = crop_offsets(label, crop_size, rng, cat_max_ratio)
  crop_h, crop_w = crop_size
  return image[y:y + crop_h, x:x + crop_w], label[y:y + crop_h, x:x + crop_w]


def random_flip(example: dict, rng: np.random.Generator, prob: float) -> dict:
  """Horizontal flip of image and label with probability ``prob`` (one draw)."""
  if rng.random() < prob:
    example = dict(example, image=example["image"][:, ::-1], label=example["label"][:, ::-1])
  return example


# ----------------------------------------------------------------------------
# Photometric distortion


@dataclasses.dataclass(frozen=True)
class PhotometricParams:
  """The random choices of one PhotoMetricDistortion (None = step skipped).

  Attributes:
    brightness: added to every value.
    contrast_first: contrast right after brightness (official mode 1) or last.
    contrast: multiplies every value.
    saturation: multiplies HSV saturation.
    hue: added to HSV hue, modulo 180.
  """
  brightness: float | None = None
  contrast_first: bool = False
  contrast: float | None = None
  saturation: float | None = None
  hue: int | None = None


def draw_photometric(rng: np.random.Generator, brightness_delta: float = 32,
                     contrast_range: Sequence[float] = (0.5, 1.5),
                     saturation_range: Sequence[float] = (0.5, 1.5),
                     hue_delta: int = 18) -> PhotometricParams:
  """Draws the choices in the official order; each step fires with p = 1/2."""
  brightness = float(rng.uniform(-brightness_delta, brightness_delta)) \
      if rng.integers(2) else None
  contrast_first = bool(rng.integers(2))
  contrast = float(rng.uniform(*contrast_range)) if rng.integers(2) else None
  saturation = float(rng.uniform(*saturation_range)) if rng.integers(2) else None
  hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None  # [-d, d)
  return PhotometricParams(brightness, contrast_first, contrast, saturation, hue)


def _affine_lut(alpha: float, beta: float) -> np.ndarray:
  """uint8 table of clip(float32(v) * alpha + beta) truncated to uint8.

  The official op is elementwise on uint8 input, so a 256-entry table computed
  with the same float32 arithmetic gives identical results, much faster.
  ``alpha``/``beta`` must be Python floats: numpy then keeps float32 (a float64
  scalar would promote and could round differently).
  """
  values = np.arange(256, dtype=np.uint8).astype(np.float32) * alpha + beta
  return np.clip(values, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
  """Applies ``params`` to a ``[H, W, 3]`` uint8 RGB image."""
  image = np.ascontiguousarray(image)
  if params.brightness is not None:
    image = cv2.LUT(image, _affine_lut(1.0, params.brightness))
  if params.contrast_first and params.contrast is not None:
    image = cv2.LUT(image, _affine_lut(params.contrast, 0.0))
  if params.saturation is not None:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], _affine_lut(params.saturation, 0.0))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if params.hue is not None:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = ((np.arange(256) + params.hue) % 180).astype(np.uint8)  # H < 180 always
    hsv[..., 0] = cv2.LUT(hsv[..., 0], shift)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not params.contrast_first and params.contrast is not None:
    image = cv2.LUT(image, _affine_lut(params.contrast, 0.0))
  return image


# ----------------------------------------------------------------------------
# Normalisation and padding


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 RGB -> float32 ``(x - mean) / std`` (mean/std in 0..255 RGB)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


def pad_to_crop(image: np.ndarray, label: np.ndarray, crop_size: Sequence[int],
                image_pad_value: float = 0.0, label_pad_value: int = IGNORE_INDEX):
  """Pads bottom/right to exactly ``crop_size = (h, w)``.

  Call it on the *normalised* float image: the official pad value 0 is in
  normalised space (padded pixels are the mean colour); labels pad with 255 so
  the loss ignores the padding.

  Returns:
    ``(image [crop_h, crop_w, C], label [crop_h, crop_w])``.
  """
  h, w = label.shape
  crop_h, crop_w = crop_size
  if image.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape[:2]} and label {(h, w)} sizes differ")
  if h > crop_h or w > crop_w:
    raise ValueError(f"example {h}x{w} is larger than the crop {crop_h}x{crop_w}")
  if (h, w) == (crop_h, crop_w):
    return image, label
  padded_image = np.full((crop_h, crop_w) + image.shape[2:], image_pad_value, image.dtype)
  padded_image[:h, :w] = image
  padded_label = np.full((crop_h, crop_w), label_pad_value, label.dtype)
  padded_label[:h, :w] = label
  return padded_image, padded_label


# ----------------------------------------------------------------------------
# Pipelines


def _pair(value, field: str, allow_empty: bool = False):
  value = tuple(value)
  if allow_empty and not value:
    return ()
  if len(value) != 2 or min(value) <= 0:
    raise ValueError(f"data.{field} must be two positive numbers"
                     f"{' or empty' if allow_empty else ''}, got {value}")
  return value


def build_train_transform(data_config):
  """``fn(example, rng) -> {'image', 'label'}``: resize, crop, flip, photometric.

  The output image is uint8 RGB of at most ``crop_size`` (smaller when the
  resized image is smaller); finish each example with
  ``build_train_finalize`` (normalise, then pad to the crop).
  """
  crop_size = tuple(int(v) for v in _pair(data_config.crop_size, "crop_size"))
  scale = _pair(data_config.train_scale, "train_scale", allow_empty=True)
  ratio_range = tuple(float(v) for v in data_config.ratio_range)
  if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
    raise ValueError(f"data.ratio_range must be (lo, hi) with 0 < lo <= hi, got {ratio_range}")
  cat_max_ratio = float(data_config.cat_max_ratio)
  flip_prob = float(data_config.flip_prob)
  photometric = bool(data_config.photometric)
  photometric_ranges = dict(
      brightness_delta=float(data_config.brightness_delta),
      contrast_range=tuple(float(v) for v in data_config.contrast_range),
      saturation_range=tuple(float(v) for v in data_config.saturation_range),
      hue_delta=int(data_config.hue_delta))

  def transform(example, rng):
    image, label = example["image"], example["label"]
    if scale:
      image, label = random_resize(image, label, rng, scale, ratio_range)
    image, label = random_crop(image, label, rng, crop_size, cat_max_ratio)
    example = random_flip({"image": image, "label": label}, rng, flip_prob)
    image = example["image"]
    if photometric:
      image = photometric_distortion(image, draw_photometric(rng, **photometric_ranges))
    return {"image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(example["label"])}

  return transform


def build_train_finalize(data_config):
  """``fn(example) -> {'image': float32 [crop_h, crop_w, 3], 'label': uint8}``.

  Normalises with ``data.mean``/``data.std``, then ``pad_to_crop``; apply it
  after ``build_train_transform`` (e.g. as a grain ``.map``).
  """
  crop_size = tuple(int(v) for v in _pair(data_config.crop_size, "crop_size"))
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def finalize(example):
    image, label = pad_to_crop(normalize(example["image"], mean, std), example["label"],
                               crop_size)
    return {"image": image, "label": label}

  return finalize


def build_train_finalize_uint8(data_config):
  """``fn(example) -> {'image': uint8, 'label': uint8, 'valid_hw': int32 (2,)}``.

  The uint8 transfer path: pads image (with 0) and label (with 255) to the crop
  but leaves normalisation to the device (``loader.normalize_on_device``),
  which also resets the padded pixels, outside ``valid_hw`` = the example's
  size before padding, to 0 in normalised space. The device then sees exactly
  the batch ``build_train_finalize`` makes, from a quarter of the bytes.
  """
  crop_size = tuple(int(v) for v in _pair(data_config.crop_size, "crop_size"))

  def finalize(example):
    image = np.asarray(example["image"])
    if image.dtype != np.uint8:
      raise ValueError(f"the uint8 transfer path needs uint8 images, got {image.dtype}")
    label = np.asarray(example["label"])
    if label.dtype != np.uint8:
      if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"labels outside 0..255 cannot travel as uint8 "
                         f"(range {label.min()}..{label.max()})")
      label = label.astype(np.uint8)
    valid_hw = np.asarray(label.shape[:2], np.int32)
    image, label = pad_to_crop(image, label, crop_size, image_pad_value=0)
    return {"image": image, "label": label, "valid_hw": valid_hw}

  return finalize


def build_eval_transform(data_config):
  """``fn(example) -> example`` of the test pipeline.

  Resizes the image (keep-ratio, bilinear) to ``data.test_scale`` and keeps the
  label at its original resolution (metrics are computed there); other keys
  pass through. An empty ``test_scale`` leaves the image as it is.
  """
  scale = _pair(data_config.test_scale, "test_scale", allow_empty=True)

  def transform(example):
    if not scale:
      return dict(example)
    image = example["image"]
    image, _ = resize_pair(image, None, keep_ratio_size(*image.shape[:2], scale))
    return dict(example, image=image)

  return transform

"""Training/eval transforms against hand-computed references and direct cv2 code."""

import collections

import cv2
import numpy as np
import pytest

from input_pipeline import datasets
from input_pipeline import transforms


class ScriptedRng:
  """Stands in for np.random.Generator, returning scripted values in order."""

  def __init__(self, random=(), integers=(), uniform=()):
    self.queues = {"random": collections.deque(random),
                   "integers": collections.deque(integers),
                   "uniform": collections.deque(uniform)}
    self.calls = []

  def _next(self, kind, *args):
    self.calls.append((kind,) + args)
    return self.queues[kind].popleft()

  def random(self):
    return self._next("random")

  def integers(self, low, high=None):
    value = self._next("integers", low, high)
    lo, hi = (0, low) if high is None else (low, high)
    assert lo <= value < hi, (value, lo, hi)
    return value

  def uniform(self, low, high):
    return self._next("uniform", low, high)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("hw, scale, expected", [
    ((375, 500), (2048, 512), (512, 683)),     # short side bound: 375*1.3653+.5 = 512.5 -> 512
    ((1024, 2048), (2048, 1024), (1024, 2048)),
    ((100, 500), (2048, 512), (410, 2048)),    # long side bound: f = 4.096
    ((5, 10), (5, 5), (3, 5)),                 # 2.5 + 0.5 -> 3 (round-half-even would give 2)
    ((480, 640), (520, 520), (390, 520)),      # PC59 rule: long side 520
])
def test_keep_ratio_size_official_rounding(hw, scale, expected):
  assert transforms.keep_ratio_size(*hw, scale) == expected
  assert transforms.keep_ratio_size(*hw, scale[::-1]) == expected   # order-free


def test_random_resize_size_and_interpolation():
  image = _image(40, 60)
  label = np.zeros((40, 60), np.uint8)
  label[::2, ::3] = 10
  label[1::4, 1::2] = 200
  rng = ScriptedRng(random=[0.25])
  # ratio = 0.25 * 1.5 + 0.5 = 0.875 -> target (1792, 448) -> f = min(1792/60, 448/40) = 11.2
  out_image, out_label = transforms.random_resize(image, label, rng, (2048, 512), (0.5, 2.0))
  assert out_image.shape == (448, 672, 3) and out_label.shape == (448, 672)
  np.testing.assert_array_equal(
      out_image, cv2.resize(image, (672, 448), interpolation=cv2.INTER_LINEAR))
  np.testing.assert_array_equal(
      out_label, cv2.resize(label, (672, 448), interpolation=cv2.INTER_NEAREST))
  # Nearest: no blended label values; a bilinear resize would create some.
  assert set(np.unique(out_label)) <= {0, 10, 200}
  assert len(np.unique(cv2.resize(label, (672, 448), interpolation=cv2.INTER_LINEAR))) > 3


# ---------------------------------------------------------------- crop


def _halves_label():
  label = np.full((40, 40), 1, np.uint8)
  label[:, 20:] = 2
  return label


def test_crop_retries_until_two_classes_below_ratio():
  # (0, 0): class 1 only -> redraw; (0, 15): 5 cols of 1 and 5 of 2 -> accepted.
  rng = ScriptedRng(integers=[0, 0, 0, 15, 7, 7])
  assert transforms.crop_offsets(_halves_label(), (10, 10), rng, 0.75) == (0, 15)
  assert len(rng.calls) == 4 and rng.calls[0] == ("integers", 0, 31)


def test_crop_ratio_boundary_and_ignore_are_rejected():
  label = _halves_label()
  label[:, :5] = 255
  # (0, 12): cols 12..19 class 1 (8), 20..21 class 2 (2) -> 0.8 >= 0.75 -> redraw.
  # (0, 0): cols 0..4 ignored, 5..9 class 1 -> one class -> redraw.
  # (0, 14): 6 of class 1, 4 of class 2 -> 0.6 -> accepted.
  rng = ScriptedRng(integers=[0, 12, 0, 0, 0, 14])
  assert transforms.crop_offsets(label, (10, 10), rng, 0.75) == (0, 14)
  # Exactly 0.75 is not below the ratio: 3:1 of 40 columns, crop 4 wide at x=17.
  rng = ScriptedRng(integers=[0, 17, 0, 18])   # 3 cols of 1, 1 of 2 -> 0.75; then 2:2
  assert transforms.crop_offsets(label, (10, 4), rng, 0.75) == (0, 18)


def test_crop_eleventh_draw_is_unchecked():
  label = np.full((30, 30), 3, np.uint8)   # every crop is single-class
  draws = [v for k in range(11) for v in (k, k + 1)]
  rng = ScriptedRng(integers=draws)
  assert transforms.crop_offsets(label, (10, 10), rng, 0.75) == (10, 11)
  assert not rng.queues["integers"]          # exactly 11 draws, 22 numbers


def test_crop_disabled_ratio_and_small_images():
  rng = ScriptedRng(integers=[4, 6])
  assert transforms.crop_offsets(np.full((30, 30), 3, np.uint8), (10, 10), rng, 1.0) == (4, 6)
  # The image fits inside the crop: nothing to draw, crop is the whole image.
  rng = ScriptedRng()
  image, label = transforms.random_crop(_image(8, 12), np.zeros((8, 12), np.uint8), rng,
                                        (16, 16), 0.75)
  assert image.shape == (8, 12, 3) and label.shape == (8, 12) and not rng.calls
  # Larger in one dimension only: crop keeps the smaller side.
  rng = ScriptedRng(integers=[0, 5])
  image, _ = transforms.random_crop(_image(8, 40), np.zeros((8, 40), np.uint8), rng, (16, 16))
  assert image.shape == (8, 16, 3)


# ---------------------------------------------------------------- photometric


def _official_photometric_bgr(image, p: transforms.PhotometricParams):
  """Reference: the official op sequence written directly on a BGR image."""

  def convert(x, alpha=1, beta=0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  if p.brightness is not None:
    image = convert(image, beta=p.brightness)
  if p.contrast_first and p.contrast is not None:
    image = convert(image, alpha=p.contrast)
  if p.saturation is not None:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=p.saturation)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if p.hue is not None:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + p.hue) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if not p.contrast_first and p.contrast is not None:
    image = convert(image, alpha=p.contrast)
  return image


@pytest.mark.parametrize("params", [
    transforms.PhotometricParams(brightness=17.3),
    transforms.PhotometricParams(brightness=-31.9, contrast_first=True, contrast=1.37),
    transforms.PhotometricParams(contrast=0.61, saturation=1.44, hue=-18),
    transforms.PhotometricParams(brightness=5.5, contrast_first=True, contrast=1.49,
                                 saturation=0.52, hue=17),
    transforms.PhotometricParams(saturation=1.2, hue=9),
])
def test_photometric_matches_direct_cv2_on_bgr(params):
  rgb = _image(48, 64, seed=3)
  rgb[0, :8] = 0
  rgb[1, :8] = 255    # exercise clipping at both ends
  ours = transforms.photometric_distortion(rgb, params)
  reference = _official_photometric_bgr(np.ascontiguousarray(rgb[..., ::-1]), params)[..., ::-1]
  np.testing.assert_array_equal(ours, reference)


def test_photometric_truncates_to_uint8_after_each_step():
  pixel = np.array([[[100, 250, 3]]], np.uint8)
  out = transforms.photometric_distortion(pixel, transforms.PhotometricParams(brightness=0.7))
  np.testing.assert_array_equal(out, [[[100, 250, 3]]])        # 100.7 -> 100, not 101
  out = transforms.photometric_distortion(pixel, transforms.PhotometricParams(brightness=20.0))
  np.testing.assert_array_equal(out, [[[120, 255, 23]]])        # 270 clipped
  # Brightness then contrast (last): clipping happens in between.
  out = transforms.photometric_distortion(
      pixel, transforms.PhotometricParams(brightness=20.0, contrast=0.5))
  np.testing.assert_array_equal(out, [[[60, 127, 11]]])         # 255 * .5 = 127.5 -> 127


def test_draw_photometric_order_and_ranges():
  # brightness coin, delta, mode, contrast coin, alpha, saturation coin, hue coin, delta
  rng = ScriptedRng(integers=[1, 1, 1, 0, 1, -18], uniform=[-3.5, 1.25])
  p = transforms.draw_photometric(rng)
  assert p == transforms.PhotometricParams(brightness=-3.5, contrast_first=True,
                                           contrast=1.25, saturation=None, hue=-18)
  assert ("uniform", -32.0, 32.0) in rng.calls and ("integers", -18, 18) in rng.calls
  rng = np.random.default_rng(0)
  hues = {transforms.draw_photometric(rng).hue for _ in range(3000)} - {None}
  assert min(hues) == -18 and max(hues) == 17


# ---------------------------------------------------------------- pipelines


def _config(**overrides):
  c = datasets.default_data_config("ade20k")
  for k, v in overrides.items():
    c[k] = v
  return c


def test_flip_applies_to_image_and_label():
  label = np.arange(6, dtype=np.uint8).reshape(2, 3)
  image = np.stack([label, label + 10, label + 20], -1)
  example = transforms.random_flip({"image": image, "label": label}, ScriptedRng(random=[0.2]),
                                   0.5)
  np.testing.assert_array_equal(example["label"], label[:, ::-1])
  np.testing.assert_array_equal(example["image"][..., 0], example["label"])
  example = transforms.random_flip({"image": image, "label": label}, ScriptedRng(random=[0.7]),
                                   0.5)
  np.testing.assert_array_equal(example["label"], label)


def test_train_transform_crops_and_flips_image_and_label_together():
  # R carries the label (= column index), G the row index.
  yy, xx = np.mgrid[0:60, 0:80].astype(np.uint8)
  image = np.stack([xx, yy, np.full_like(xx, 7)], -1)
  fn = transforms.build_train_transform(_config(
      crop_size=(32, 32), train_scale=(), photometric=False, flip_prob=1.0, cat_max_ratio=1.0))
  for seed in range(3):
    out = fn({"image": image, "label": xx}, np.random.default_rng(seed))
    assert out["label"].shape == (32, 32)
    np.testing.assert_array_equal(out["image"][..., 0], out["label"])
    assert (np.diff(out["label"].astype(int), axis=1) == -1).all()      # flipped
    assert (np.diff(out["image"][..., 1].astype(int), axis=0) == 1).all()  # rows kept


def test_train_transform_is_deterministic_per_rng_and_bounded():
  example = {"image": _image(50, 70), "label": np.random.default_rng(2).integers(
      0, 4, (50, 70)).astype(np.uint8), "name": "x"}
  fn = transforms.build_train_transform(_config(crop_size=(24, 40), train_scale=(100, 40)))
  a = fn(example, np.random.default_rng(7))
  b = fn(example, np.random.default_rng(7))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  for seed in range(10):
    out = fn(example, np.random.default_rng(seed))
    assert out["image"].dtype == np.uint8 and out["image"].shape[:2] == out["label"].shape
    assert out["label"].shape[0] <= 24 and out["label"].shape[1] <= 40


def test_finalize_pads_normalised_image_with_zero_and_label_with_255():
  config = _config(crop_size=(16, 20))
  image = np.full((10, 12, 3), 200, np.uint8)
  label = np.full((10, 12), 3, np.uint8)
  out = transforms.build_train_finalize(config)({"image": image, "label": label})
  assert out["image"].shape == (16, 20, 3) and out["image"].dtype == np.float32
  mean, std = np.array(config.mean, np.float32), np.array(config.std, np.float32)
  np.testing.assert_array_equal(out["image"][:10, :12],
                                np.broadcast_to((200 - mean) / std, (10, 12, 3)))
  assert (out["image"][10:] == 0).all() and (out["image"][:, 12:] == 0).all()
  assert (out["label"][:10, :12] == 3).all()
  assert (out["label"][10:] == 255).all() and (out["label"][:, 12:] == 255).all()
  with pytest.raises(ValueError, match="larger than the crop"):
    transforms.pad_to_crop(np.zeros((20, 20, 3), np.float32), np.zeros((20, 20), np.uint8),
                           (16, 16))


def test_eval_transform_resizes_image_keeps_label():
  image, label = _image(40, 60), np.ones((40, 60), np.uint8)
  out = transforms.build_eval_transform(_config())({"image": image, "label": label,
                                                    "name": "n"})
  assert out["image"].shape == (512, 768, 3) and out["name"] == "n"
  np.testing.assert_array_equal(
      out["image"], cv2.resize(image, (768, 512), interpolation=cv2.INTER_LINEAR))
  assert out["label"] is label
  out = transforms.build_eval_transform(_config(test_scale=()))({"image": image,
                                                                 "label": label})
  assert out["image"] is image


def test_synthetic_defaults_only_flip():
  """The synthetic recipe draws exactly one number per example: the flip."""
  config = datasets.default_data_config("synthetic")
  example = datasets.build_source(config, "train")[3]
  fn = transforms.build_train_transform(config)
  for seed in range(6):
    rng, reference_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    out = fn(example, rng)
    flip = reference_rng.random() < 0.5
    expected = example["image"][:, ::-1] if flip else example["image"]
    np.testing.assert_array_equal(out["image"], expected)
    assert rng.random() == reference_rng.random()   # same number of draws consumed


def test_invalid_transform_config_is_rejected():
  with pytest.raises(ValueError, match="crop_size"):
    transforms.build_train_transform(_config(crop_size=(0, 512)))
  with pytest.raises(ValueError, match="ratio_range"):
    transforms.build_train_transform(_config(ratio_range=(2.0, 0.5)))

"""Whole / slide / TTA inference against straightforward numpy references.

The fake models are fixed linear maps whose output depends on the whole input
window (a context term), so a window placed or averaged wrongly changes the
result; one of them also downsamples by 2 so the logits resize matters.
"""

import numpy as np
import pytest

from offseg_jax.evaluation import inference

K = 5
W = np.random.default_rng(0).normal(size=(3, K)).astype(np.float32)


class ContextModel:
  """1x1 conv, minus 0.7x the window's mean response, then 2x2 average pooling
  (stride 2, floor): logits at half resolution, depending on the window."""

  def __init__(self, stride=2, ramp=0.0):
    self.stride = stride
    self.ramp = ramp          # adds a left-to-right ramp: not flip-equivariant
    self.traces = 0

  def apply(self, variables, images, train=False, rngs=None):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    assert not train and "ham" in rngs
    self.traces += 1
    y = images @ variables["w"]
    y = y - 0.7 * y.mean(axis=(1, 2), keepdims=True)
    if self.ramp:
      y = y + self.ramp * jnp.linspace(0.0, 1.0, y.shape[2])[None, None, :, None] * jnp.arange(K)
    s = self.stride
    b, h, w, k = y.shape
    y = y[:, :h // s * s, :w // s * s].reshape(b, h // s, s, w // s, s, k).mean(axis=(2, 4))
    return y, {}


def ref_model(x, stride=2):
  y = x.astype(np.float64) @ W.astype(np.float64)
  y = y - 0.7 * y.mean(axis=(0, 1), keepdims=True)
  h, w, k = y.shape
  return y[:h // stride * stride, :w // stride * stride].reshape(
      h // stride, stride, w // stride, stride, k).mean(axis=(1, 3))


def ref_resize(x, out_h, out_w):
  """torch bilinear, align_corners=False, no antialias, written per axis."""
  def axis_weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
      src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = min(int(np.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      lam = src - i0
      m[d, i0] += 1 - lam
      m[d, i1] += lam
    return m
  return np.einsum("ah,hwk,bw->abk", axis_weights(x.shape[0], out_h), x,
                   axis_weights(x.shape[1], out_w))


def ref_slide(image, crop, stride):
  """mmseg slide_inference, literally: per-window logits summed and counted."""
  h, w = image.shape[:2]
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  preds = np.zeros((h, w, K))
  count = np.zeros((h, w, 1))
  for i in range(rows):
    for j in range(cols):
      y1, x1 = i * stride, j * stride
      y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      window = image[y1:y2, x1:x2]
      preds[y1:y2, x1:x2] += ref_resize(ref_model(window), y2 - y1, x2 - x1)
      count[y1:y2, x1:x2] += 1
  return preds / count


def segmenter(mode="slide", model=None, **kw):
  settings = inference.InferenceSettings(mode=mode, **kw)
  return inference.Segmenter(model or ContextModel(), {"w": W}, settings,
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def image_of(h, w, seed=1):
  return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("h,w,crop,stride", [(37, 53, 16, 11), (16, 16, 16, 11), (10, 40, 16, 7),
                                             (512, 683, 512, 480), (1024, 2048, 1024, 768)])
def test_slide_windows_follow_the_mmseg_rule(h, w, crop, stride):
  windows = inference.slide_windows(h, w, (crop, crop), (stride, stride))
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  assert len(windows) == rows * cols
  sizes = {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows}
  assert sizes == {(min(crop, h), min(crop, w))}        # one window shape: one compile
  covered = np.zeros((h, w), bool)
  for y1, y2, x1, x2 in windows:
    covered[y1:y2, x1:x2] = True
  assert covered.all()
  assert max(y2 for _, y2, _, _ in windows) == h and max(x2 for *_, x2 in windows) == w


@pytest.mark.parametrize("batch_size", [1, 4])
def test_slide_matches_numpy_reference_on_odd_sizes(batch_size):
  image = image_of(37, 53)
  seg = segmenter(crop_size=16, stride=11, batch_size=batch_size)
  got = np.asarray(seg.view(image, (37, 53)))
  want = ref_slide(image, 16, 11)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Logits are resized to the original (label) size before the argmax.
  got = np.asarray(seg.view(image, (50, 41)))
  np.testing.assert_allclose(got, ref_resize(want, 50, 41), atol=2e-5)
  labels = np.asarray(seg.labels(image, (50, 41)))
  np.testing.assert_array_equal(labels, ref_resize(want, 50, 41).argmax(-1))


def test_one_compile_serves_every_image_size_in_slide_mode():
  model = ContextModel()
  seg = segmenter(model=model, crop_size=16, stride=11, batch_size=4)
  for h, w in [(37, 53), (45, 60), (30, 70)]:         # 15, 20 and 14 windows
    seg.labels(image_of(h, w))
  # Chunks of 4 (the last padded to 2 or 4 windows): at most two window batches.
  assert model.traces <= 2
  traces = model.traces
  # A new Segmenter of the same model (the next evaluation during training)
  # reuses the compiled forward.
  segmenter(model=model, crop_size=16, stride=11, batch_size=4).labels(image_of(40, 40))
  assert model.traces == traces


def test_small_image_runs_unpadded_as_one_window():
  image = image_of(10, 13)
  slide = np.asarray(segmenter(crop_size=16, stride=11).view(image, (10, 13)))
  whole = np.asarray(segmenter("whole").view(image, (10, 13)))
  np.testing.assert_allclose(slide, whole, atol=1e-6)
  np.testing.assert_allclose(slide, ref_resize(ref_model(image), 10, 13), atol=2e-5)


def test_slide_equals_whole_when_one_window_covers_the_image():
  image = image_of(32, 24)
  slide = segmenter(crop_size=(32, 24), stride=(20, 20), batch_size=2)
  whole = segmenter("whole")
  for out in [(32, 24), (45, 31)]:
    np.testing.assert_allclose(np.asarray(slide.view(image, out)),
                               np.asarray(whole.view(image, out)), atol=1e-6)


def test_whole_pads_to_size_divisor_and_crops_before_resizing():
  image = image_of(37, 53)
  got = np.asarray(segmenter("whole", size_divisor=8).view(image, (40, 60)))
  padded = np.zeros((40, 56, 3), np.float32)             # bottom/right, value 0 (mean colour)
  padded[:37, :53] = image
  logits = ref_resize(ref_model(padded), 40, 56)[:37, :53]
  np.testing.assert_allclose(got, ref_resize(logits, 40, 60), atol=2e-5)
  unpadded = np.asarray(segmenter("whole").view(image, (40, 60)))
  assert np.abs(got - unpadded).max() > 1e-3           # padding does change the context


def test_uint8_images_are_normalised_with_mean_and_std():
  raw = np.random.default_rng(3).integers(0, 256, (20, 24, 3)).astype(np.uint8)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  seg = inference.Segmenter(ContextModel(), {"w": W}, inference.InferenceSettings("whole"),
                            mean=mean, std=std)
  normalised = (raw.astype(np.float32) - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(np.asarray(seg.view(raw, (20, 24))),
                             ref_resize(ref_model(normalised), 20, 24), atol=2e-5)


def test_tta_with_ratio_one_and_no_flip_is_plain_inference():
  raw = np.random.default_rng(4).integers(0, 256, (37, 53, 3)).astype(np.uint8)
  kw = dict(crop_size=16, stride=11, batch_size=3)
  plain = segmenter(**kw)
  tta = segmenter(tta=True, tta_ratios=(1.0,), tta_flip=False, **kw)
  logits = np.asarray(plain.view(raw, (37, 53)))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(tta.tta_probabilities(raw)), probs, atol=1e-6)
  np.testing.assert_array_equal(tta.predict(raw), plain.predict(raw))


def test_flip_tta_is_mirror_symmetric():
  raw = np.random.default_rng(5).integers(0, 256, (36, 50, 3)).astype(np.uint8)
  # Any model: averaging a view with its un-flipped mirror makes the result of
  # the mirrored image the mirror of the result.
  seg = segmenter("whole", model=ContextModel(ramp=1.5), tta=True, tta_ratios=(1.0, 0.5))
  probs = np.asarray(seg.tta_probabilities(raw))
  mirrored = np.asarray(seg.tta_probabilities(np.ascontiguousarray(raw[:, ::-1])))
  np.testing.assert_allclose(mirrored, probs[:, ::-1], atol=1e-5)
  assert np.abs(probs - probs[:, ::-1]).max() > 1e-3   # the model itself is not symmetric
  # A flip-equivariant model: flip views change nothing.
  sym = segmenter("whole", model=ContextModel(stride=1), tta=True, tta_ratios=(1.0,))
  no_flip = segmenter("whole", model=ContextModel(stride=1), tta=True, tta_ratios=(1.0,),
                      tta_flip=False)
  np.testing.assert_allclose(np.asarray(sym.tta_probabilities(raw)),
                             np.asarray(no_flip.tta_probabilities(raw)), atol=1e-6)


def test_tta_views_use_the_mmcv_keep_ratio_rule():
  # Resize(scale_factor=r, keep_ratio=True) on the original image.
  assert inference.tta_view_size(512, 683, 1.0) == (512, 683)
  assert inference.tta_view_size(512, 683, 0.5) == (256, 342)
  assert inference.tta_view_size(512, 683, 0.75) == (384, 512)
  assert inference.tta_view_size(375, 500, 1.75) == (656, 875)
  # The test-time keep-ratio resize: ADE (2048, 512) and Cityscapes (2048, 1024).
  assert inference.keep_ratio_size(375, 500, (2048, 512)) == (512, 683)
  assert inference.keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
  assert inference.keep_ratio_size(300, 1500, (2048, 512)) == (410, 2048)


def test_settings_validate_and_read_config_defaults():
  with pytest.raises(ValueError, match="crop_size"):
    inference.InferenceSettings(mode="slide")
  with pytest.raises(ValueError, match="whole"):
    inference.InferenceSettings(mode="sliding")
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"mode": "slide", "crop_size": (512, 512),
                                   "stride": (480, 480), "batch_size": 8})
  s = inference.InferenceSettings.from_config(cfg, tta=True)
  assert s.crop_size == (512, 512) and s.tta and s.tta_flip
  assert s.tta_ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and s.size_divisor == 0
  assert inference.InferenceSettings.from_config(cfg, mode="whole").mode == "whole"

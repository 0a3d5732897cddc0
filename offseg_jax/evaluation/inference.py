"""Whole, slide and multi-scale + flip inference on single images (mmseg semantics).

The semantics are those of mmseg's ``EncoderDecoder`` and ``SegTTAModel`` at
test time:

* bottom/right zero padding to a multiple of the size divisor (after
  normalisation, so padded pixels are the mean colour), removed again before
  the final resize;
* ``whole``: one forward over the (padded) image, logits bilinearly resized to
  the padded size;
* ``slide``: ``n = max(H - c + s - 1, 0) // s + 1`` windows per axis, window
  ``i`` spans ``y1 = i*s, y2 = min(y1 + c, H), y1 = max(y2 - c, 0)``; each
  window's logits are resized to the window, summed into a canvas and divided
  by the per-pixel window count. On images smaller than the crop the window is
  the whole (smaller) image;
* the logits are resized (bilinear, align_corners=False) to the original label
  size before the argmax;
* TTA: every ratio of ``tta_ratios`` rescales the *original* image with mmcv's
  keep-ratio rule (the mmseg 1.x ``tta_pipeline``: ``Resize(scale_factor=r,
  keep_ratio=True)`` on the loaded image), optionally also flipped; each view's
  logits are mapped back to the original frame, softmaxed and averaged.

:class:`Segmenter` runs these on one image at a time through the same jitted
steps as the dataset evaluator (:mod:`offseg_jax.evaluation.engine`), with
exact buckets (each image padded only to the size divisor). The settings and
size rules live in :mod:`offseg_jax.evaluation.geometry` and are re-exported
here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from input_pipeline import transforms
from offseg_jax.evaluation import engine as engine_lib
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import geometry
from offseg_jax.models import construction

TTA_RATIOS = geometry.TTA_RATIOS
InferenceSettings = geometry.InferenceSettings
slide_windows = geometry.slide_windows
keep_ratio_size = geometry.keep_ratio_size
tta_view_size = geometry.tta_view_size
pad_to_multiple = geometry.pad_to_multiple


class Segmenter:
  """Applies a segmentation model to single test images (mmseg test semantics).

  Args:
    model: a Flax module (or anything with ``apply``) called as
      ``apply(variables, images, train=False, rngs={'ham': key}) -> (logits,
      aux)`` with NHWC normalised images and NHWC logits at the head stride.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    settings: :class:`InferenceSettings`; ``batch_size`` is the number of slide
      windows per model call.
    mean, std: RGB normalisation (0..255 scale), as ``config.data.mean/std``.
    seed: seeds the ``'ham'`` stream (SegNeXt draws NMF bases at test time).
    device: where to run (default: this process's first local device).
  """

  def __init__(self, model: Any, variables, settings: InferenceSettings, *,
               mean: Sequence[float], std: Sequence[float], seed: int = 0,
               device=None):
    # One image at a time: pad only to the divisor (one bucket per image size).
    self.settings = dataclasses.replace(settings, buckets_per_octave=0)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.device = device or jax.local_devices()[0]
    self.mesh = Mesh(np.asarray([self.device], dtype=object), ("data",))
    self.divisor = math.lcm(construction.size_divisor(model), self.settings.size_divisor or 1)
    apply_fn = model.apply if hasattr(model, "apply") else model
    self.engine = engine_lib.get_engine(apply_fn, self.mesh, self.divisor)
    self.variables = jax.device_put(variables, self.engine.replicated)
    self._consts = evaluator_lib.constants(self.engine, seed, self.mean, self.std)
    self._calls = 0

  def put(self, array):
    """Copies a host array (or pytree) to this segmenter's device."""
    return jax.device_put(array, self.device)

  def normalize(self, image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 normalised (floats are passed through unchanged)."""
    if image.dtype == np.uint8:
      return transforms.normalize(image, self.mean, self.std)
    return np.asarray(image, np.float32)

  def _run(self, geo: geometry.Geometry, image: np.ndarray, out_hw: Sequence[int],
           view_hw: Sequence[int] | None):
    """Runs one image through the engine; returns (labels, scores) on the host."""
    out_hw = tuple(int(v) for v in out_hw)
    if view_hw is not None:
      views = (geo.view_shape(geo.bucket(view_hw)),)
    else:
      views = geo.group_view_shapes([out_hw])
    shape = geometry.BatchShape(views, geometry.label_extent(out_hw))
    if image.dtype != np.uint8:
      image = np.asarray(image, np.float32)
    # Each call draws fresh random streams, as a new forward would.
    self._calls += 1
    host = geo.example(image, None, self._calls, shape, label_hw=out_hw, view_hw=view_hw)
    host = {k: np.asarray(v)[None] for k, v in host.items()}
    acc = self.engine.zeros(1)
    _, labels, scores = evaluator_lib.run_step(
        self.engine, self.variables, host, shape, acc, self._consts,
        tta=len(geo.views) > 1 or geo.settings.tta,
        window_group=max(self.settings.batch_size, 1), with_scores=True)
    h, w = out_hw
    return np.asarray(labels[0])[0, :h, :w], np.asarray(scores[0])[0, :h, :w]

  # --- one view ---------------------------------------------------------------

  def view(self, image: np.ndarray, out_hw: Sequence[int], *, flip: bool = False,
           output: str = "logits") -> np.ndarray:
    """Runs one view of an image and maps the result to an ``out_hw`` frame.

    Args:
      image: HxWx3 image as the model sees it (uint8 RGB, or already
        normalised float32), i.e. after the test resize.
      out_hw: (h, w) of the original image / label.
      flip: run on the horizontally flipped image and flip the result back.
      output: 'logits', 'probs' (softmax) or 'labels' (int32 argmax).

    Returns:
      [h, w, K] scores (or [h, w] labels).
    """
    if output not in ("logits", "probs", "labels"):
      raise ValueError(f"output must be 'logits', 'probs' or 'labels', got {output!r}")
    settings = dataclasses.replace(self.settings, tta=False)
    geo = geometry.Geometry(settings, self.divisor, views=(geometry.View(None, bool(flip)),))
    labels, logits = self._run(geo, image, out_hw, image.shape[:2])
    if output == "labels":
      return labels
    if output == "probs":
      return np.asarray(jax.nn.softmax(logits, axis=-1))
    return logits

  # --- full test-time behaviour ----------------------------------------------

  def tta_probabilities(self, original: np.ndarray) -> np.ndarray:
    """Mean softmax over the TTA views of an original-resolution uint8 image."""
    settings = dataclasses.replace(self.settings, tta=True)
    geo = geometry.Geometry(settings, self.divisor)
    _, probs = self._run(geo, original, original.shape[:2], None)
    return probs

  def labels(self, image: np.ndarray, out_hw: Sequence[int] | None = None) -> np.ndarray:
    """int32 [h, w] prediction in the original frame.

    Without TTA ``image`` is the test-resized image and ``out_hw`` the original
    size (default: the image's own size). With TTA ``image`` must be the
    original image (views are rescaled from it) and ``out_hw`` its size.
    """
    if self.settings.tta:
      if out_hw is not None and tuple(out_hw) != image.shape[:2]:
        raise ValueError("with TTA pass the original image: its size is the output size "
                         f"(got image {image.shape[:2]}, out_hw {tuple(out_hw)})")
      return np.argmax(self.tta_probabilities(image), axis=-1).astype(np.int32)
    return self.view(image, out_hw or image.shape[:2], output="labels")

  def predict(self, image: np.ndarray, out_hw: Sequence[int] | None = None) -> np.ndarray:
    """Host int32 [h, w] prediction; see :meth:`labels`."""
    return np.asarray(self.labels(image, out_hw))

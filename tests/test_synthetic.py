"""The embedded default dataset: deterministic, fixed splits, and not trivial."""

import numpy as np
import pytest

from input_pipeline import datasets, synthetic
from experiments.configs import default


def test_examples_are_a_pure_function_of_seed_split_and_index():
  a = synthetic.SyntheticSource("train", 10, 48, seed=3)
  b = synthetic.SyntheticSource("train", 10, 48, seed=3)
  np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
  np.testing.assert_array_equal(a[7]["label"], b[7]["label"])
  assert not np.array_equal(a[7]["image"], a[8]["image"])
  val = synthetic.SyntheticSource("val", 10, 48, seed=3)
  assert not np.array_equal(a[0]["image"], val[0]["image"])      # disjoint splits
  other = synthetic.SyntheticSource("train", 10, 48, seed=4)
  assert not np.array_equal(a[0]["image"], other[0]["image"])
  with pytest.raises(IndexError):
    a[10]


def test_all_classes_occur_with_occlusion_and_per_image_appearance():
  src = synthetic.SyntheticSource("train", 200, 64, seed=0)
  labels = [src[i]["label"] for i in range(200)]
  counts = np.bincount(np.concatenate([l.ravel() for l in labels]), minlength=9)
  assert len(counts) == synthetic.NUM_CLASSES >= 9 and (counts > 0).all()
  # The same class has different mean colours across images (appearance shift).
  means = [src[i]["image"][labels[i] == 1].mean(0) for i in range(200) if (labels[i] == 1).sum() > 50]
  assert np.std(np.array(means), axis=0).mean() > 30


def test_config_builds_the_synthetic_dataset():
  c = default.get_config()
  info = datasets.dataset_info(c.data)
  assert info.num_classes == 9 and info.class_names[0] == "background"
  src = datasets.build_source(c.data, "val")
  assert len(src) == c.data.num_val and src[0]["image"].shape == (64, 64, 3)


@pytest.mark.slow
def test_per_pixel_colour_classifier_stays_below_half_miou(tmp_path):
  """A 1x1-conv-only model (no spatial context) cannot solve the dataset."""
  from offseg_jax import train
  c = default.get_config("pixel_linear")
  c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 400, 400, 400, 100
  c.batch_size = 16
  c.optimizer.lr = 5e-3
  c.optimizer.warmup_steps = 20
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["mIoU"] < 50.0, summary["mIoU"]

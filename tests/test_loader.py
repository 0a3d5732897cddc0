"""The grain training loader: determinism, exact resumption, global batches;
evaluation batches covering every image once on any number of processes."""

import numpy as np

from experiments.configs import default
from input_pipeline import loader


def _config():
  c = default.get_config("tiny")
  c.batch_size, c.data.num_train, c.data.num_val, c.eval.batch_size = 4, 12, 10, 4
  c.data.num_threads = 2
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_training_stream_resumes_exactly_from_the_iterator_state():
  c = _config()
  it = iter(loader.train_dataset(c))
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 5)                      # crosses an epoch boundary (12 examples / 4)
  again = iter(loader.train_dataset(c))
  again.set_state(state)
  for a, b in zip(expected, _take(again, 5)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_epochs_reshuffle_and_augmentation_depends_on_seed():
  c = _config()
  batches = _take(iter(loader.train_dataset(c)), 6)
  first, second = np.concatenate([b["label"] for b in batches[:3]]), np.concatenate(
      [b["label"] for b in batches[3:]])
  # Same 12 examples in both epochs, in another order.
  assert not np.array_equal(first, second)
  c2 = _config()
  c2.seed = 1
  other = _take(iter(loader.train_dataset(c2)), 1)[0]
  assert not np.array_equal(other["image"], batches[0]["image"])
  # uint8 over the wire (normalised on device; see tests/test_precision.py).
  assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (4, 64, 64, 3)
  assert batches[0]["label"].dtype == np.uint8 and batches[0]["valid_hw"].shape == (4, 2)


def test_eval_batches_score_every_image_exactly_once_on_any_process_count(monkeypatch):
  c = _config()
  for pc in (1, 2, 3):
    covered, masked_total, batch_counts = [], 0, set()
    for pid in range(pc):
      monkeypatch.setattr(loader.jax, "process_index", lambda pid=pid: pid)
      monkeypatch.setattr(loader.jax, "process_count", lambda pc=pc: pc)
      c.eval.batch_size = 2 * pc
      ev = loader.EvalBatches(c, "val")
      covered += ev.indices
      batches = list(ev)
      batch_counts.add(len(batches))             # every process runs the same steps
      masked_total += sum(int(b["mask"].sum()) for b in batches)
    assert sorted(covered) == list(range(c.data.num_val))
    assert masked_total == c.data.num_val and len(batch_counts) == 1

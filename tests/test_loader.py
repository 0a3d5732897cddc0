"""The grain training loader: determinism, exact resumption, global batches;
evaluation batches covering every image once on any number of processes."""

import numpy as np
import pytest

from experiments.configs import default
from input_pipeline import datasets, loader


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


def _examples(batches):
  """Per example in stream order: (identity, flipped). The identity is the
  example's bytes in a canonical orientation (the lexicographically smaller of
  the image and its mirror), so a horizontal flip does not change it."""
  out = []
  for batch in batches:
    for image in batch["image"]:
      raw, mirrored = image.tobytes(), image[:, ::-1].tobytes()
      out.append((min(raw, mirrored), raw != min(raw, mirrored)))
  return out


def test_each_epoch_is_a_new_order_of_the_same_examples():
  c = _config()                                # 12 examples, 3 batches an epoch
  c.data.flip_prob = 0.0                       # no augmentation: an example is its bytes
  examples = _examples(_take(iter(loader.train_dataset(c)), 6))
  first, second = [e for e, _ in examples[:12]], [e for e, _ in examples[12:]]
  assert len(set(first)) == 12                 # every example once per epoch
  assert sorted(first) == sorted(second)       # the same examples again ...
  assert first != second                       # ... in another order


def test_augmentation_is_drawn_per_seed_epoch_and_example():
  c = _config()
  c.data.flip_prob = 0.5
  seed0 = _examples(_take(iter(loader.train_dataset(c)), 6))
  c.seed = 1
  seed1 = _examples(_take(iter(loader.train_dataset(c)), 3))
  epoch1, epoch2 = dict(seed0[:12]), dict(seed0[12:])
  assert epoch1.keys() == epoch2.keys() == dict(seed1).keys()
  # Some examples are flipped and some not, the same example is flipped in one
  # epoch and not in the next, and another seed flips other examples.
  assert 0 < sum(epoch1.values()) < 12
  assert epoch1 != epoch2
  assert epoch1 != dict(seed1)


def test_batches_go_over_the_wire_as_uint8():
  batch = _take(iter(loader.train_dataset(_config())), 1)[0]
  # uint8 over the wire (normalised on device; see tests/test_precision.py).
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 64, 64, 3)
  assert batch["label"].dtype == np.uint8 and batch["valid_hw"].shape == (4, 2)


def _assert_batches_equal(got, want):
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _local_batches(c, source, steps, pc, pid, start_step=0):
  ds = loader.train_dataset(c, source, start_step=start_step, process_index=pid,
                            process_count=pc)
  return _take(iter(ds), steps)


def test_global_batches_are_the_same_for_any_process_count():
  c = _config()                                # B = 4, 12 examples: 3 steps an epoch
  source = datasets.build_source(c.data, "train")
  steps = 4                                    # crosses an epoch boundary
  single = _local_batches(c, source, steps, 1, 0)
  for pc in (2, 4):
    parts = [_local_batches(c, source, steps, pc, pid) for pid in range(pc)]
    for s in range(steps):
      assert parts[0][s]["image"].shape[0] == c.batch_size // pc
      joined = {k: np.concatenate([p[s][k] for p in parts]) for k in single[s]}
      _assert_batches_equal(joined, single[s])


def test_start_step_continues_a_fresh_run_on_any_process_count():
  c = _config()
  source = datasets.build_source(c.data, "train")
  fresh = _local_batches(c, source, 5, 1, 0)
  it = iter(loader.train_dataset(c, source, start_step=2))
  for want in fresh[2:]:
    _assert_batches_equal(next(it), want)
  # grain's iterator state counts global steps, so a saved state agrees with start_step.
  assert it.get_state() == {"next_index": 5}
  # Saved by 1 process at step 3, resumed by 2 (rows 2:4 of each global batch).
  resumed = _local_batches(c, source, 2, 2, 1, start_step=3)
  for got, want in zip(resumed, fresh[3:]):
    _assert_batches_equal(got, {k: v[2:] for k, v in want.items()})


def test_each_epoch_is_a_new_permutation_of_every_example():
  n, batch, seed = 12, 4, 0
  epochs = 3
  for pc in (1, 2, 4):
    steps = [[] for _ in range(epochs * n // batch)]
    for pid in range(pc):
      local = loader.train_positions(n, seed, batch, process_index=pid, process_count=pc)
      b = batch // pc
      for s in range(len(steps)):
        steps[s] += [local[s * b + r] for r in range(b)]
    pairs = [pair for step in steps for pair in step]
    assert [g for g, _ in pairs] == list(range(epochs * n))      # global positions in order
    order = [int(i) for _, i in pairs]
    per_epoch = [order[e * n:(e + 1) * n] for e in range(epochs)]
    assert all(sorted(e) == list(range(n)) for e in per_epoch)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    # The same order whoever builds it (deterministic, seeded by (seed, epoch)).
    again = loader.train_order(n, seed)
    assert order == [again[g] for g in range(epochs * n)]
  assert order != [loader.train_order(n, seed + 1)[g] for g in range(epochs * n)]


def test_batch_not_divisible_by_the_process_count_is_rejected():
  c = _config()
  with pytest.raises(ValueError, match=r"config.batch_size=4 is not divisible by the process count 3"):
    loader.train_dataset(c, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="fewer than 4 processes"):
    loader.train_dataset(c, source=[{}] * 3, process_index=0, process_count=4)


def _eval_geometry(c):
  """The evaluator's geometry for ``c.eval`` (size divisor 1)."""
  from offseg_jax.evaluation import geometry  # pylint: disable=g-import-not-at-top
  settings = geometry.InferenceSettings.from_config(c.eval)
  return geometry.Geometry(settings, settings.size_divisor or 1, tuple(c.data.test_scale))


def test_eval_batches_score_every_image_exactly_once_on_any_process_count(monkeypatch):
  c = _config()
  for pc in (1, 2, 3):
    covered, masked_total, batch_counts = [], 0, set()
    for pid in range(pc):
      monkeypatch.setattr(loader.jax, "process_index", lambda pid=pid: pid)
      monkeypatch.setattr(loader.jax, "process_count", lambda pc=pc: pc)
      c.eval.batch_size = 2 * pc
      ev = loader.EvalBatches(c, "val", geometry=_eval_geometry(c))
      covered += ev.indices
      batches = list(ev)
      batch_counts.add(len(batches))             # every process runs the same steps
      masked_total += sum(int(b["mask"].sum()) for b in batches)
    assert sorted(covered) == list(range(c.data.num_val))
    assert masked_total == c.data.num_val and len(batch_counts) == 1

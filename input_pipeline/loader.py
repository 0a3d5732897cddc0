"""grain loaders: per-process shards -> host batches -> global sharded jax.Arrays.

Training: indices are sharded per process, shuffled per epoch, repeated forever;
each example's augmentation randomness comes from ``(seed, epoch, index)``, so the
data order and the augmentation are a pure function of the seed and position.
The iterator's state (grain ``get_state``) is saved in every checkpoint, so a
resumed run sees exactly the examples an uninterrupted run would have seen.

Evaluation: process ``p`` of ``P`` takes images ``p, p + P, ...``; every process
runs the same number of batches, padding the last one with masked copies, so
every image is scored exactly once and no remainder is dropped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import datasets, transforms


@dataclasses.dataclass
class _TrainExample:
  """Picklable per-example training function (used by grain worker threads)."""
  source: object
  data_config: object
  seed: int
  shard_len: int

  def __post_init__(self):
    self.transform = transforms.build_train_transform(self.data_config)
    # Normalise, then pad the float image with 0 and the label with 255.
    self.finalize = transforms.build_train_finalize(self.data_config)

  def __call__(self, position: int, index: int):
    epoch = position // self.shard_len
    rng = np.random.default_rng([self.seed, epoch, int(index)])
    example = self.finalize(self.transform(self.source[int(index)], rng))
    return {"image": example["image"].astype(np.float32),
            "label": np.asarray(example["label"]).astype(np.int32)}


def local_batch_size(global_batch: int) -> int:
  """The per-process share of a global batch (must divide evenly)."""
  pc = jax.process_count()
  if global_batch % pc:
    raise ValueError(f"global batch_size={global_batch} is not divisible by "
                     f"{pc} processes")
  return global_batch // pc


def train_dataset(config, source=None) -> grain.IterDataset:
  """The training IterDataset of host-local batches (numpy dicts).

  ``source`` defaults to ``datasets.build_source(config.data, 'train')``; pass
  it to keep a handle on it (e.g. its ``bad_files`` log with
  ``data.skip_bad_files=True``).
  """
  if source is None:
    source = datasets.build_source(config.data, "train")
  n = len(source)
  pid, pc = jax.process_index(), jax.process_count()
  shard = grain.MapDataset.range(n)[pid::pc]
  shard_len = len(shard)
  if shard_len == 0:
    raise ValueError(f"training split has {n} examples, fewer than {pc} processes")
  fn = _TrainExample(source, config.data, int(config.seed), shard_len)
  ds = (shard.shuffle(seed=int(config.seed)).repeat(None)
        .map_with_index(fn)
        .batch(local_batch_size(config.batch_size), drop_remainder=True))
  threads = int(config.data.num_threads)
  return ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(int(config.data.prefetch), threads)))


def to_global(batch: dict, mesh, axis: str = "data") -> dict:
  """Assembles host-local numpy batches into global arrays sharded over ``axis``."""
  sharding = NamedSharding(mesh, P(axis))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


@dataclasses.dataclass
class EvalBatches:
  """Fixed-size evaluation batches covering every image of a split exactly once.

  Yields ``{'image' (B,H,W,3) f32, 'label' (B,H,W) i32, 'mask' (B,) bool}`` host
  batches; masked entries are padding. All images of the split must share one
  size (e.g. the synthetic default); variable-size datasets are evaluated by
  ``offseg_jax.evaluation.runner``.
  """
  config: object
  split: str = "val"

  def __post_init__(self):
    self.source = datasets.build_source(self.config.data, self.split)
    self.eval_transform = transforms.build_eval_transform(self.config.data)
    self.local_batch = local_batch_size(int(self.config.eval.batch_size))
    pid, pc = jax.process_index(), jax.process_count()
    self.indices = list(range(pid, len(self.source), pc))
    per_process = math.ceil(len(self.source) / pc)
    self.num_batches = math.ceil(per_process / self.local_batch)

  def __iter__(self) -> Iterator[dict]:
    mean, std = tuple(self.config.data.mean), tuple(self.config.data.std)
    for b in range(self.num_batches):
      chunk = self.indices[b * self.local_batch:(b + 1) * self.local_batch]
      mask = [True] * len(chunk) + [False] * (self.local_batch - len(chunk))
      # Padding entries repeat an image of this process (or image 0) and are masked.
      fill = chunk[0] if chunk else (self.indices[0] if self.indices else 0)
      chunk = chunk + [fill] * (self.local_batch - len(chunk))
      images, labels = [], []
      for i in chunk:
        ex = self.eval_transform(self.source[i])
        images.append(transforms.normalize(ex["image"], mean, std))
        labels.append(np.asarray(ex["label"], np.int32))
      shapes = {im.shape for im in images} | {lb.shape + (3,) for lb in labels}
      if len(shapes) != 1:
        raise ValueError(
            f"EvalBatches needs equally sized images, got {sorted(shapes)}; "
            "use offseg_jax.evaluation.runner for variable-size datasets")
      yield {"image": np.stack(images), "label": np.stack(labels),
             "mask": np.asarray(mask, bool)}

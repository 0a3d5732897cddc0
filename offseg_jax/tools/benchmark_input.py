"""Throughput of the full training input pipeline (images/s).

  python -m offseg_jax.tools.benchmark_input --config experiments/configs/X.py[:arg] \
      [--workers 8] [--batches 20] [--batch_size 8] [--fake 32] [--transfer both]

Runs decode + RandomResize/RandomCrop/RandomFlip/PhotoMetricDistortion +
normalise + pad + batch through grain with ``--workers`` threads, at the
config's crop size, and prints images/s (wall clock) and CPU-ms per image (a
figure that carries over between machines and is less sensitive to other jobs
sharing the CPUs), plus a single-thread breakdown per stage.

``--transfer=both`` (default) then times the loader *including the transfer*:
each batch is placed on the local devices as the trainer does
(``loader.to_global``) and turned into the train step's inputs there
(``loader.device_batch``), until ready. ``float32`` is the path before
issue 12 (normalised on the host, float32 image + int32 label sent);
``uint8`` is the trainer's default (uint8 image + label + sizes sent,
normalised on the device): 4x fewer bytes and no host normalisation.

``--fake N`` writes N generated photo-like examples per split in the layout of
``data.name`` (at that dataset's usual image size, or ``--fake_size W,H``) to a
temporary folder and benchmarks those, so no download is needed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

from absl import flags
import cv2
from etils import epath
from ml_collections import config_flags
import numpy as np

from input_pipeline import datasets
from input_pipeline import image_io
from input_pipeline import transforms
from offseg_jax import cli

# Typical image size (w, h) of each dataset, for --fake.
FAKE_SIZES = {"ade20k": (683, 512), "cityscapes": (2048, 1024), "coco_stuff164k": (640, 480),
              "pascal_context59": (500, 375), "bdd100k": (1280, 720), "custom": (640, 512)}


def _fake_pair(rng: np.random.Generator, width: int, height: int, num_values: int):
  """A photo-like RGB image (smooth colour field + mild noise) and a blocky label."""
  coarse = rng.integers(0, 256, (height // 48 + 2, width // 48 + 2, 3), dtype=np.uint8)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  image = np.clip(image + rng.normal(0.0, 4.0, image.shape), 0, 255).astype(np.uint8)
  coarse_label = rng.integers(0, num_values, (height // 96 + 2, width // 96 + 2), dtype=np.uint8)
  label = cv2.resize(coarse_label, (width, height), interpolation=cv2.INTER_NEAREST)
  return image, label


def write_fake_dataset(data_config, root: str, num_per_split: int,
                       size: tuple[int, int] | None = None, seed: int = 0) -> None:
  """Writes generated examples in the folder layout configured by ``data_config``.

  File names follow the dataset's conventions (``<city>/<city>_..._leftImg8bit
  .png`` for Cityscapes); labels use the stored convention (0 = ignore and
  1..K when ``reduce_zero_label``).
  """
  info = datasets.dataset_info(data_config)
  width, height = size or FAKE_SIZES.get(data_config.name, (640, 512))
  num_values = info.num_classes + (1 if info.reduce_zero_label else 0)
  rng = np.random.default_rng(seed)
  for split in ("train", "val"):
    split_dir = data_config.split_names.get(split, split)
    img_dir = epath.Path(root, data_config.img_dir.format(split=split_dir))
    ann_dir = epath.Path(root, data_config.ann_dir.format(split=split_dir))
    stems = [(f"fake/fake_{split}_{i:06d}" if data_config.name == "cityscapes"
              else f"fake_{split}_{i:06d}") for i in range(num_per_split)]
    for stem in stems:
      image, label = _fake_pair(rng, width, height, num_values)
      image_path = img_dir / (stem + data_config.img_suffix)
      label_path = ann_dir / (stem + data_config.seg_suffix)
      for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
      image_io.write_image(image_path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
      image_io.write_image(label_path, label)
    if data_config.split_file:
      split_file = epath.Path(root, data_config.split_file.format(split=split_dir))
      split_file.parent.mkdir(parents=True, exist_ok=True)
      split_file.write_text("\n".join(stems) + "\n")


def stage_times(source, train_transform, finalize, num_examples: int = 8, seed: int = 0):
  """CPU milliseconds per example of each stage: (decode, augment, normalise+pad).

  Measured as this thread's CPU time, so other jobs on the machine barely
  affect it (cv2's own worker threads, if any, are not counted).
  """
  rng = np.random.default_rng(seed)
  totals = np.zeros(3)
  n = min(num_examples, len(source))
  for i in range(n):
    t0 = time.thread_time()
    example = source[i]
    t1 = time.thread_time()
    example = train_transform(example, rng)
    t2 = time.thread_time()
    finalize(example)
    totals += (t1 - t0, t2 - t1, time.thread_time() - t2)
  return tuple(1000.0 * totals / max(n, 1))


def _batches(source, train_transform, finalize, workers: int, batch_size: int,
             prefetch: int | None, seed: int) -> Iterator[dict]:
  """The grain training pipeline over ``source``: an endless iterator of batches."""
  import grain  # pylint: disable=g-import-not-at-top
  dataset = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
             .random_map(train_transform, seed=seed).map(finalize)
             .batch(batch_size, drop_remainder=True))
  read_options = grain.ReadOptions(num_threads=workers,
                                   prefetch_buffer_size=prefetch or max(workers, 1))
  return iter(dataset.to_iter_dataset(read_options))


def _timed_batches(iterator: Iterator[dict], batches: int, warmup: int,
                   consume: Callable[[dict], object] = lambda batch: None
                   ) -> tuple[float, float, dict]:
  """``(wall s, process CPU s, last batch)`` of taking and consuming ``batches``
  batches after ``warmup`` untimed ones; closes the iterator (its threads)."""
  batch = None
  try:
    for _ in range(warmup):
      batch = next(iterator)
      consume(batch)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(iterator)
      consume(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, batch
  finally:
    close = getattr(iterator, "close", None)
    if close:
      close()


def transfer_benchmark(data_config, transfer: str, split: str = "train", workers: int = 8,
                       batches: int = 20, batch_size: int = 8, warmup: int = 2,
                       prefetch: int | None = None, seed: int = 0, log=print) -> dict:
  """Loader + host->device images/s for one transfer path ('float32' or 'uint8').

  Times ``batches`` batches from the grain pipeline to normalised float32
  images and int32 labels ready on the local devices (sharded over them as in
  training).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from input_pipeline import loader  # pylint: disable=g-import-not-at-top
  if transfer not in loader.TRANSFER_DTYPES:
    raise ValueError(f"transfer={transfer!r}; choose one of {loader.TRANSFER_DTYPES}")
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f"batch_size={batch_size} does not split over {len(devices)} devices")
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  source = datasets.build_source(data_config, split)
  train_transform = transforms.build_train_transform(data_config)
  if transfer == "uint8":
    finalize = transforms.build_train_finalize_uint8(data_config)
  else:
    float_finalize = transforms.build_train_finalize(data_config)

    def finalize(example):   # as the loader's float path: float32 image, int32 label
      out = float_finalize(example)
      return {"image": out["image"].astype(np.float32),
              "label": np.asarray(out["label"]).astype(np.int32)}
  to_inputs = jax.jit(lambda b: loader.device_batch(b, tuple(data_config.mean),
                                                     tuple(data_config.std)))
  wall, cpu, batch = _timed_batches(
      _batches(source, train_transform, finalize, workers, batch_size, prefetch, seed),
      batches, warmup,
      consume=lambda b: jax.block_until_ready(to_inputs(loader.to_global(b, mesh))))
  sent = batches * sum(v.nbytes for v in batch.values())    # every batch has these shapes
  images = batches * batch_size
  result = {"transfer": transfer, "images_per_s": images / wall,
            "cpu_ms_per_image": 1000.0 * cpu / images, "bytes_per_image": sent / images,
            "devices": len(devices), "platform": devices[0].platform}
  log(f"  loader + transfer ({transfer}): {result['images_per_s']:.1f} images/s, "
      f"{result['cpu_ms_per_image']:.1f} CPU-ms/image, {sent / images / 1024:.0f} KiB/image "
      f"sent to {len(devices)} {devices[0].platform} device(s)")
  return result


def benchmark(data_config, split: str = "train", workers: int = 8, batches: int = 20,
              batch_size: int = 8, warmup: int = 2, prefetch: int | None = None,
              seed: int = 0, log=print) -> dict:
  """Times ``batches`` batches of the grain training pipeline; returns the figures."""
  source = datasets.build_source(data_config, split)
  train_transform = transforms.build_train_transform(data_config)
  finalize = transforms.build_train_finalize(data_config)
  wall, cpu, batch = _timed_batches(
      _batches(source, train_transform, finalize, workers, batch_size, prefetch, seed),
      batches, warmup)
  images = batches * batch_size
  result = {
      "images_per_s": images / wall, "cpu_ms_per_image": 1000.0 * cpu / images,
      "batch_image_shape": tuple(batch["image"].shape), "workers": workers,
      "cpu_count": os.cpu_count(),
  }
  decode_ms, augment_ms, finalize_ms = stage_times(source, train_transform, finalize, seed=seed)
  result.update(decode_ms=decode_ms, augment_ms=augment_ms, finalize_ms=finalize_ms)
  sizes = {source[i]["image"].shape[:2] for i in range(min(4, len(source)))}
  log(f"{data_config.name}/{split}: {len(source)} examples, image sizes (h, w) {sorted(sizes)}, "
      f"crop {tuple(data_config.crop_size)}, batch {batch_size}, {workers} grain threads, "
      f"{os.cpu_count()} CPUs")
  log(f"  {result['images_per_s']:.1f} images/s, {result['cpu_ms_per_image']:.1f} CPU-ms/image "
      f"({batches} batches of {result['batch_image_shape']} after {warmup} warm-up)")
  log(f"  single-thread CPU-ms/example: decode {decode_ms:.1f}, resize+crop+flip+photometric "
      f"{augment_ms:.1f}, normalise+pad {finalize_ms:.1f}")
  bad_files = getattr(source, "bad_files", None)
  if bad_files is not None and len(bad_files):
    log(bad_files.summary())
  return result


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (defined only when it runs)."""
  on = {"flag_values": values}
  config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].",
                                  lock_config=True, **on)
  flags.DEFINE_string("split", "train", "Split to read.", **on)
  flags.DEFINE_integer("workers", None, "grain threads (default data.num_threads).", **on)
  flags.DEFINE_integer("batches", 20, "Timed batches.", **on)
  flags.DEFINE_integer("batch_size", 8, "Examples per batch.", **on)
  flags.DEFINE_integer("warmup", 2, "Untimed batches first.", **on)
  flags.DEFINE_integer("prefetch", None, "grain prefetch buffer (default = workers).", **on)
  flags.DEFINE_integer("fake", 0, "Generate N fake examples per split and benchmark those.",
                       **on)
  flags.DEFINE_string("fake_size", "", "Fake image size 'W,H' (default: the dataset's usual).",
                      **on)
  flags.DEFINE_enum("transfer", "both", ["both", "float32", "uint8", "none"],
                    "Also time loader + host->device transfer for these paths.", **on)
  flags.mark_flag_as_required("config", flag_values=values)
  flags.register_validator("fake_size", lambda v: not v or re.fullmatch(r"\d+,\d+", v),
                           "give W,H in pixels, e.g. --fake_size=683,512", **on)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Times the pipeline of ``--config``'s data (or fake data in its layout)."""
  cli.positional(argv)
  data_config = datasets.data_config_of(values.config)
  workers = values.workers if values.workers is not None else int(data_config.num_threads)
  options = dict(split=values.split, workers=workers, batches=values.batches,
                 batch_size=values.batch_size, warmup=values.warmup, prefetch=values.prefetch)
  paths = {"none": (), "both": ("float32", "uint8")}.get(values.transfer, (values.transfer,))

  def run():
    benchmark(data_config, **options)
    results = {p: transfer_benchmark(data_config, p, **options) for p in paths}
    if len(results) == 2:
      before, after = results["float32"], results["uint8"]
      print(f"  uint8 transfer vs float32: {after['images_per_s'] / before['images_per_s']:.2f}x "
            f"images/s, {before['bytes_per_image'] / after['bytes_per_image']:.1f}x fewer bytes")

  try:
    if not values.fake:
      run()
      return 0
    size = tuple(int(v) for v in values.fake_size.split(",")) if values.fake_size else None
    with tempfile.TemporaryDirectory() as root:
      with data_config.unlocked():
        data_config.root = root
      write_fake_dataset(data_config, root, values.fake, size)
      run()
    return 0
  except (OSError, ValueError) as e:   # wrong root/layout, bad file, batch vs devices
    print(f"error: {e}", file=sys.stderr)
    return 1


# main([...]): the command in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)

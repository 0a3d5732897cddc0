"""grain loaders: per-process shards -> host batches -> global sharded jax.Arrays.

Training: indices are sharded per process, shuffled per epoch, repeated forever;
each example's augmentation randomness comes from ``(seed, epoch, index)``, so the
data order and the augmentation are a pure function of the seed and position.
The iterator's state (grain ``get_state``) is saved in every checkpoint, so a
resumed run sees exactly the examples an uninterrupted run would have seen.

Host -> device transfer (``config.transfer_dtype``): with ``'uint8'`` (default)
a training batch is ``{'image' uint8, 'label' uint8, 'valid_hw' int32 (B, 2)}``,
a quarter of the bytes of the float path, and the train step normalises it on
the device with :func:`normalize_on_device` (the same values to 1 ulp); ``'float32'``
normalises on the host and sends ``{'image' float32, 'label' int32}``.

Evaluation (:class:`EvalBatches`): images are grouped into static shape buckets
(``offseg_jax.evaluation.geometry``) and cut into global batches; every process
loads its share of every batch, padding slots are masked, so every process runs
the same steps and every image is scored exactly once, on any number of
processes and devices.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import jax.numpy as jnp
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
  transfer: str = "uint8"

  def __post_init__(self):
    self.transform = transforms.build_train_transform(self.data_config)
    if self.transfer == "uint8":
      # Pad uint8 image (0) and label (255); normalisation happens on device.
      self.finalize = transforms.build_train_finalize_uint8(self.data_config)
    else:
      # Normalise, then pad the float image with 0 and the label with 255.
      self.finalize = transforms.build_train_finalize(self.data_config)

  def __call__(self, position: int, index: int):
    epoch = position // self.shard_len
    rng = np.random.default_rng([self.seed, epoch, int(index)])
    example = self.finalize(self.transform(self.source[int(index)], rng))
    if self.transfer == "uint8":
      return example
    return {"image": example["image"].astype(np.float32),
            "label": np.asarray(example["label"]).astype(np.int32)}


TRANSFER_DTYPES = ("uint8", "float32")


def transfer_dtype(config) -> str:
  """``config.transfer_dtype`` (default 'uint8'), checked."""
  value = str(config.get("transfer_dtype", "uint8"))
  if value not in TRANSFER_DTYPES:
    raise ValueError(f"config.transfer_dtype={value!r}; choose one of {TRANSFER_DTYPES}")
  return value


def normalize_on_device(image, valid_hw, mean, std):
  """The float path's ``normalize`` + ``pad_to_crop`` on device, from uint8.

  Args:
    image: ``(B, H, W, 3)`` uint8 RGB, padded bottom/right to the crop.
    valid_hw: ``(B, 2)`` int32 height and width of each example before padding,
      or None when nothing was padded.
    mean, std: per-channel RGB statistics in 0..255.

  Returns:
    ``(B, H, W, 3)`` float32 ``(x - mean) / std`` with padded pixels set to 0
    (the mean colour): the values ``transforms.build_train_finalize`` gives, to
    one unit in the last place (XLA divides by a constant as a multiply by its
    reciprocal).
  """
  x = (image.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  if valid_hw is None:
    return x
  h, w = image.shape[1], image.shape[2]
  valid_hw = valid_hw.astype(jnp.int32)
  inside = ((jnp.arange(h)[None, :, None] < valid_hw[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < valid_hw[:, 1, None, None]))
  return jnp.where(inside[..., None], x, 0.0)


def device_batch(batch: dict, mean, std) -> tuple:
  """``(images float32 normalised, labels int32)`` of a training batch on device.

  Accepts both transfer paths: uint8 images are normalised here (see
  :func:`normalize_on_device`), float images are taken as already normalised.
  """
  image = batch["image"]
  if image.dtype == jnp.uint8:
    if mean is None or std is None:
      raise ValueError("uint8 training images need the data mean/std to be normalised on device")
    image = normalize_on_device(image, batch.get("valid_hw"), mean, std)
  return image, batch["label"].astype(jnp.int32)


def batch_spec(config, num_examples: int | None = None) -> dict:
  """``{key: (shape, dtype)}`` of a training batch as the loader yields it.

  ``num_examples`` defaults to the global ``config.batch_size``; ahead-of-time
  tools build abstract inputs from this.
  """
  b = int(config.batch_size if num_examples is None else num_examples)
  h, w = (int(v) for v in config.data.crop_size)
  if transfer_dtype(config) == "uint8":
    return {"image": ((b, h, w, 3), np.uint8), "label": ((b, h, w), np.uint8),
            "valid_hw": ((b, 2), np.int32)}
  return {"image": ((b, h, w, 3), np.float32), "label": ((b, h, w), np.int32)}


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
  fn = _TrainExample(source, config.data, int(config.seed), shard_len, transfer_dtype(config))
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


# ----------------------------------------------------------------------------
# Evaluation


def _label_size_from_header(data_or_path) -> tuple[int, int]:
  """(H, W) of an encoded image from its header (PIL reads no pixels)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  handle = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
  with Image.open(handle) as image:
    width, height = image.size
  return int(height), int(width)


def _load_example(source, index: int) -> dict:
  """Example ``index`` as stored: ``load`` (no replacement of bad files) when
  the source has it, so a bad validation file is reported, never scored twice."""
  load = getattr(source, "load", None)
  return load(index) if load is not None else source[index]


def example_sizes(source, count: int, num_threads: int = 8):
  """Original (label) sizes of examples ``0 .. count - 1``, read from headers.

  Returns ``(sizes, errors)``: ``{index: (H, W)}`` of every readable example
  and ``{index: message}`` of the others (the one-line ``BadFileError``).
  Folder and ArrayRecord sources are sized from the label file's header; other
  sources (and unreadable headers) by loading the example.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  from input_pipeline import image_io, synthetic  # pylint: disable=g-import-not-at-top

  def size_of(index: int):
    if hasattr(source, "example_size"):          # e.g. predict's image files
      return tuple(source.example_size(index)), None
    if isinstance(source, synthetic.SyntheticSource):
      return (source.image_size, source.image_size), None
    try:
      if isinstance(source, datasets.FolderSource):
        return _label_size_from_header(source.pairs[index][2]), None
      encoded = source.read_encoded(index) if hasattr(source, "read_encoded") else None
      if encoded is not None:
        return _label_size_from_header(encoded["label"]), None
    except Exception:  # pylint: disable=broad-except
      pass                                 # an unreadable header: decode to find out why
    try:
      label = np.asarray(_load_example(source, index)["label"])
      return tuple(int(v) for v in label.shape[:2]), None
    except image_io.BadFileError as e:
      return None, str(e)

  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as pool:
    results = list(pool.map(size_of, range(count)))
  sizes = {i: r for i, (r, _) in enumerate(results) if r is not None}
  errors = {i: e for i, (r, e) in enumerate(results) if r is None}
  return sizes, errors


_ERROR_BYTES = 512


def encode_error(message: str) -> np.ndarray:
  """A message as a fixed-size uint8 array (batched with the example)."""
  data = message.encode("utf-8", "replace")[:_ERROR_BYTES]
  out = np.zeros(_ERROR_BYTES, np.uint8)
  out[:len(data)] = np.frombuffer(data, np.uint8)
  return out


def decode_error(array: np.ndarray) -> str:
  return bytes(np.asarray(array, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


@dataclasses.dataclass
class _EvalBatch:
  """Picklable per-batch evaluation function: loads, resizes and pads this
  process's images of one global batch into its bucket (masked padding rows
  for missing or unreadable images) and stacks them."""
  source: object
  geometry: object
  shapes: list

  def _one(self, shape, index: int) -> dict:
    from input_pipeline import image_io  # pylint: disable=g-import-not-at-top
    error = ""
    if index >= 0:
      try:
        example = _load_example(self.source, index)
        label = example.get("label")
        out = self.geometry.example(np.asarray(example["image"]),
                                    None if label is None else np.asarray(label), index, shape)
      except image_io.BadFileError as e:
        error = str(e)
      except ValueError as e:            # decoded size differs from the header's
        error = f"example {index}: {e}"
    if index < 0 or error:
      out = self.geometry.empty(shape)
    out["error"] = encode_error(error)
    return out

  def __call__(self, element):
    batch_id, indices = int(element[0]), element[1]
    shape = self.shapes[batch_id]
    rows = [self._one(shape, int(i)) for i in indices]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["batch"] = np.full(len(rows), batch_id, np.int32)
    return batch


class EvalBatches:
  """Bucketed evaluation batches covering every image of a split exactly once.

  A :class:`offseg_jax.evaluation.geometry.Plan` groups the images by bucket
  (from their sizes, read from file headers) and cuts the groups into global
  batches; this process loads its share of every batch through a grain
  pipeline (threads decode, resize and pad whole batches ahead of the device).
  Every process yields the same number of batches in the same order.

  Each host batch holds, per example (see ``Geometry.keys``): ``'image<v>'``
  uint8 padded views, ``'hw<v>'``, label taps, slide ``'origins<v>'`` /
  ``'win_hw<v>'``, the ``'label'`` (255 = ignore and padding), ``'label_hw'``,
  ``'index'`` (-1 = padding), ``'mask'`` (a real, readable example) and, host
  only, ``'batch'`` (the plan's batch id) and ``'error'`` (why an example
  could not be read, see :func:`decode_error`).

  Args:
    config: experiment config (``config.data``, ``config.eval``).
    split: dataset split.
    geometry: sizes and buckets (default: ``config.eval`` settings, size
      divisor 1).
    batch_size: largest global batch (default ``config.eval.batch_size``,
      rounded up to a multiple of the devices).
    process_index, num_processes: this process's share (default: JAX's).
    num_devices: devices over all processes (default: one per process).
    source: the split's source (default: built from ``config.data``).
    max_images: only the first ``max_images`` examples.
  """

  def __init__(self, config, split: str = "val", *, geometry=None,
               batch_size: int | None = None, process_index: int | None = None,
               num_processes: int | None = None, num_devices: int | None = None,
               source=None, max_images: int | None = None):
    from offseg_jax.evaluation import geometry as geometry_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.split = split
    self.source = source if source is not None else datasets.build_source(config.data, split)
    if geometry is None:
      settings = geometry_lib.InferenceSettings.from_config(config.eval)
      geometry = geometry_lib.Geometry(settings, settings.size_divisor or 1,
                                       tuple(config.data.test_scale))
    self.geometry = geometry
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.num_processes = jax.process_count() if num_processes is None else int(num_processes)
    devices = int(num_devices or self.num_processes)
    size = int(batch_size or config.eval.batch_size)
    size = -(-size // devices) * devices
    count = len(self.source) if max_images is None else min(int(max_images), len(self.source))
    threads = int(config.data.get("num_threads", 8) or 1)
    self.sizes, self.errors = example_sizes(self.source, count, threads)
    self.plan = geometry_lib.build_plan(self.sizes, geometry, size, self.num_processes, devices)
    self.entries = self.plan.entries(self.process_index)
    self.indices = self.plan.indices(self.process_index)
    self.num_batches = len(self.plan.slots)

  def shape(self, batch: dict):
    """The static shape (``geometry.BatchShape``) of a yielded batch."""
    return self.plan.shapes[int(batch["batch"][0])]

  def dataset(self) -> grain.IterDataset:
    """The grain pipeline of this process's batches."""
    fn = _EvalBatch(self.source, self.geometry, self.plan.shapes)
    elements = [(t, tuple(rows)) for t, rows in enumerate(self.entries)]
    threads = int(self.config.data.get("num_threads", 8) or 0)
    # Elements are whole batches: a few ahead keep the devices busy.
    return grain.MapDataset.source(elements).map(fn).to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(threads, 2)))

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    if not self.num_batches:
      return iter(())
    return iter(self.dataset())

"""grain loaders: one global order -> per-process rows -> global sharded jax.Arrays.

Training (:func:`train_dataset`): one global example order, the same for any
number of processes. Epoch ``e`` is a permutation of ``range(n)`` (grain's
``shuffle(seed=config.seed)`` + ``repeat(None)``: epoch ``e`` is shuffled with
seed ``config.seed + e``); global position ``g`` is the ``g``-th element of that
endless order, the global batch of step ``s`` is positions ``[s*B, (s+1)*B)``
(``B = config.batch_size``), and process ``p`` of ``P`` loads rows
``[p*b, (p+1)*b)`` of it (``b = B / P``), the rows
``jax.make_array_from_process_local_data`` places on that process's devices.
Each example's augmentation randomness comes from ``(seed, epoch, index)`` with
the global epoch ``g // n``. So the batches, and every pixel in them, are a pure
function of the seed and the step: 1 process x 8 devices and 2 processes x 4
devices train on the same global batches (with one process this is also the
stream earlier versions of this loader gave).

Resumption: the data position comes from the train step, not from saved
iterator state: build the dataset with ``start_step=<restored step>``; a run
saved with any number of processes continues the same example order with any
other. The iterator stays checkpointable by grain (``get_state`` /
``set_state``), and its ``next_index`` is the absolute global step on every
process, so restoring a state saved by this loader agrees with ``start_step``;
it is not needed.

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
import sys
from typing import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import datasets, transforms


@dataclasses.dataclass
class _TrainExample:
  """Picklable per-example training function (used by grain worker threads).

  Called with ``(position, index)``: the global position in the training order
  and the example index there; the augmentation RNG is seeded with
  ``(seed, epoch, index)``, ``epoch = position // num_examples`` (the global
  epoch, whatever the number of processes).
  """
  source: object
  data_config: object
  seed: int
  num_examples: int
  transfer: str = "uint8"

  def __post_init__(self):
    self.transform = transforms.build_train_transform(self.data_config)
    if self.transfer == "uint8":
      # Pad uint8 image (0) and label (255); normalisation happens on device.
      self.finalize = transforms.build_train_finalize_uint8(self.data_config)
    else:
      # Normalise, then pad the float image with 0 and the label with 255.
      self.finalize = transforms.build_train_finalize(self.data_config)

  def __call__(self, element):
    position, index = int(element[0]), int(element[1])
    epoch = position // self.num_examples
    rng = np.random.default_rng([self.seed, epoch, index])
    example = self.finalize(self.transform(self.source[index], rng))
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


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  """The per-process share of a global batch (must divide evenly).

  ``process_count`` defaults to ``jax.process_count()``.
  """
  pc = jax.process_count() if process_count is None else int(process_count)
  if global_batch % pc:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"process count {pc}")
  return global_batch // pc


def train_order(num_examples: int, seed: int) -> grain.MapDataset:
  """The global training order: element ``g`` is the example index at position ``g``.

  Endless; epoch ``e`` (positions ``[e*n, (e+1)*n)``) is a permutation of
  ``range(n)``, a deterministic function of ``(seed, e)`` (grain shuffles epoch
  ``e`` with seed ``seed + e``).
  """
  return grain.MapDataset.range(int(num_examples)).shuffle(seed=int(seed)).repeat(None)


class _ProcessRows(grain.MapDataset):
  """One process's rows of the global batches of an endless order.

  Element ``j`` is ``(g, order[g])`` with the global position
  ``g = (j // b) * B + p * b + j % b`` (``B`` the global batch, ``b = B / P``):
  batching this by ``b`` gives, as local batch ``s``, rows ``[p*b, (p+1)*b)``
  of global batch ``s``.
  """

  _MUTATES_ELEMENT_SPEC = True

  def __init__(self, order: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(order)
    self._global_batch = int(global_batch)
    self._local_batch = local_batch_size(self._global_batch, process_count)
    self._offset = int(process_index) * self._local_batch

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return (f"_ProcessRows(global_batch={self._global_batch}, "
            f"rows={self._offset}:{self._offset + self._local_batch})")

  def position(self, j: int) -> int:
    """The global position of local element ``j``."""
    step, row = divmod(int(j), self._local_batch)
    return step * self._global_batch + self._offset + row

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    g = self.position(j)
    return g, self._parent[g]

  def _getitems(self, indices):
    positions = [self.position(j) for j in indices]
    return list(zip(positions, self._parent._getitems(positions)))  # pylint: disable=protected-access


def train_positions(num_examples: int, seed: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process's ``(global position, example index)`` pairs, local batch after
  local batch (see :class:`_ProcessRows`); ``train_dataset`` loads these."""
  if not 0 <= int(process_index) < int(process_count):
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return _ProcessRows(train_order(num_examples, seed), global_batch,
                      process_index, process_count)


class _StartAt(grain.IterDataset):
  """Iterates its parent (a ``to_iter_dataset`` of local batches indexed by the
  global step) from step ``start``; ``get_state`` keeps counting global steps."""

  def __init__(self, parent: grain.IterDataset, start: int):
    super().__init__(parent)
    self._start = int(start)

  def __iter__(self):
    iterator = self._parent.__iter__()
    if self._start:
      grain.experimental.set_next_index(iterator, self._start)
    return iterator

  def __str__(self) -> str:
    return f"_StartAt(step={self._start})"


def train_dataset(config, source=None, *, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """The training IterDataset of host-local batches (numpy dicts).

  Batch ``k`` of the iterator is this process's rows ``[p*b, (p+1)*b)`` of the
  global batch of step ``start_step + k`` (see the module docstring): the same
  global batches for any number of processes, so a run resumes by passing the
  restored train step as ``start_step``, no iterator state needed.

  Args:
    config: experiment config (``seed``, ``batch_size``, ``data``,
      ``transfer_dtype``).
    source: the training source; defaults to
      ``datasets.build_source(config.data, 'train')``; pass it to keep a handle
      on it (e.g. its ``bad_files`` log with ``data.skip_bad_files=True``).
    start_step: the global step of the first batch.
    process_index, process_count: this process's share (default: JAX's).
  """
  if source is None:
    source = datasets.build_source(config.data, "train")
  n = len(source)
  pid = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if n < pc:
    raise ValueError(f"training split has {n} examples, fewer than {pc} processes")
  if int(start_step) < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  b = local_batch_size(int(config.batch_size), pc)
  fn = _TrainExample(source, config.data, int(config.seed), n, transfer_dtype(config))
  ds = (train_positions(n, int(config.seed), int(config.batch_size),
                        process_index=pid, process_count=pc)
        .map(fn)
        .batch(b, drop_remainder=True))
  threads = int(config.data.num_threads)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(int(config.data.prefetch), threads)))
  return _StartAt(ds, int(start_step))


def to_global(batch: dict, mesh, axis: str = "data") -> dict:
  """Assembles host-local numpy batches into global arrays sharded over ``axis``."""
  sharding = NamedSharding(mesh, P(axis))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Evaluation


def _label_size_from_header(data_or_path) -> tuple[int, int]:
  """(H, W) of an encoded image from its header (PIL reads no pixels)."""
  import io  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(data_or_path, bytes):
    with Image.open(io.BytesIO(data_or_path)) as image:
      width, height = image.size
  else:                      # a path, local or remote: only the header is read
    with epath.Path(data_or_path).open("rb") as f, Image.open(f) as image:
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
    geometry: a :class:`offseg_jax.evaluation.geometry.Geometry`: sizes,
      views and buckets (the evaluator's; the input pipeline imports nothing
      from ``offseg_jax``).
    batch_size: largest global batch (default ``config.eval.batch_size``,
      rounded up to a multiple of the devices).
    process_index, num_processes: this process's share (default: JAX's).
    num_devices: devices over all processes (default: one per process).
    source: the split's source (default: built from ``config.data``).
    max_images: only the first ``max_images`` examples.
  """

  def __init__(self, config, split: str = "val", *, geometry,
               batch_size: int | None = None, process_index: int | None = None,
               num_processes: int | None = None, num_devices: int | None = None,
               source=None, max_images: int | None = None):
    self.config = config
    self.split = split
    self.source = source if source is not None else datasets.build_source(config.data, split)
    self.geometry = geometry
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.num_processes = jax.process_count() if num_processes is None else int(num_processes)
    devices = int(num_devices or self.num_processes)
    size = int(batch_size or config.eval.batch_size)
    size = -(-size // devices) * devices
    count = len(self.source) if max_images is None else min(int(max_images), len(self.source))
    threads = int(config.data.get("num_threads", 8) or 1)
    self.sizes, self.errors = example_sizes(self.source, count, threads)
    self.plan = geometry.plan(self.sizes, size, self.num_processes, devices)
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

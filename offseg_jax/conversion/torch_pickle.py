"""Reads PyTorch ``.pth``/``.pt`` checkpoints into numpy, without torch.

``torch.save`` (torch >= 1.6) writes a zip archive::

  <root>/data.pkl        the pickled object tree (protocol 2)
  <root>/data/<key>      one raw little-endian buffer per storage
  <root>/byteorder       'little' or 'big' (absent in old files: little)
  <root>/version, ...    bookkeeping we do not need

Tensors inside ``data.pkl`` are ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` calls whose ``storage`` argument is a persistent id
``('storage', <torch.XStorage>, key, location, numel)``. We unpickle with a
restricted unpickler: the tensor rebuild functions produce numpy arrays
(strides and offsets honoured, copied out of the storage buffer), storage types
and torch dtypes map to numpy dtypes (bfloat16/float8 through ``ml_dtypes``),
and a short list of harmless builtins is allowed. Every other global (e.g. the
``mmengine.logging.MessageHub`` object in an mmengine training checkpoint)
becomes an inert :class:`OpaqueObject` that records its name and arguments, so
no code from the file ever runs and such checkpoints still read.

Old non-zip checkpoints (``_use_new_zipfile_serialization=False``) are read
with ``torch.load(weights_only=True)`` when torch is installed.

Checkpoint layouts understood by :func:`read_checkpoint`:
  * mmengine / mmseg: ``{'meta': ..., 'state_dict': ..., 'optimizer': ...}``;
  * ImageNet backbones (EfficientFormerV2 ``eformer_s1_450.pth``): ``{'model': ...}``;
  * mmseg pretrain files (MiT, MSCAN): a bare state dict or ``{'state_dict': ...}``.
A leading ``module.`` (DataParallel) is stripped from every key.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Mapping

from etils import epath
import ml_dtypes
import numpy as np

# Entries of a checkpoint dict that may hold the weights, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")


class CheckpointReadError(ValueError):
  """The file is not a readable PyTorch checkpoint; the message names the file."""


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------

# torch dtype name -> numpy dtype. Names are how torch pickles a torch.dtype.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
}

# Legacy typed storage classes (how torch pickles a storage's element type).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    # Untyped storages hold bytes; _rebuild_tensor_v3 names the element dtype.
    "UntypedStorage": np.uint8, "_UntypedStorage": np.uint8,
}


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  """Stand-in for a pickled ``torch.<dtype>`` or ``torch.<X>Storage`` class."""
  name: str
  numpy_dtype: Any


# ----------------------------------------------------------------------------
# Objects we refuse to construct
# ----------------------------------------------------------------------------

class OpaqueObject:
  """An object of a class we do not import: its name and pickled data only.

  Reading such an object never runs its code. ``args`` are the constructor
  arguments, ``state`` what ``__setstate__`` would have received, ``items`` /
  ``list_items`` any dict or list content.
  """
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs = args, kwargs
    obj.state, obj.items, obj.list_items = None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  def __repr__(self):
    return f"<opaque {self.qualname}>"


def _opaque_class(module: str, name: str) -> type:
  return type(name, (OpaqueObject,), {"qualname": f"{module}.{name}"})


def _reconstructor(cls, base, state):
  """``copyreg._reconstructor`` restricted to opaque classes."""
  if isinstance(cls, type) and issubclass(cls, OpaqueObject):
    return cls(base, state)
  raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


# ----------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Storage:
  """A storage's flat numpy buffer (typed, or bytes for untyped storages)."""
  key: str
  flat: np.ndarray
  byteorder: str = "<"


def _strided_copy(flat: np.ndarray, offset, size, stride, what: str) -> np.ndarray:
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"{what}: size {size} and stride {stride} disagree")
  if any(n == 0 for n in size):
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or any(s < 0 for s in stride) or last >= flat.size:
    raise pickle.UnpicklingError(
        f"{what}: a tensor of size {size}, stride {stride}, offset {offset} reads "
        f"past its storage of {flat.size} elements (truncated or corrupt file)")
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
      writeable=False)
  return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _strided_copy(storage.flat, storage_offset, size, stride, f"storage {storage.key}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  flat = storage.flat
  if not isinstance(dtype, _TorchDtype):
    raise pickle.UnpicklingError(f"unsupported tensor dtype {dtype!r}")
  target = np.dtype(dtype.numpy_dtype).newbyteorder(storage.byteorder)
  if flat.dtype != target:
    usable = flat.nbytes - flat.nbytes % target.itemsize
    flat = flat.view(np.uint8)[:usable].view(target)
  return _strided_copy(flat, storage_offset, size, stride, f"storage {storage.key}")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses: rebuild the plain tensor and drop the subclass."""
  del new_type, state
  if func not in _REBUILD_FUNCTIONS.values():
    raise pickle.UnpicklingError(f"refusing to call {func!r}")
  return func(*args)


_REBUILD_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}

# Harmless callables a state dict or an mmengine ``meta`` may need.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,          # bytes under protocol 2
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): str,
    **{("builtins", n): getattr(builtins, n)
       for n in ("set", "frozenset", "slice", "complex", "range", "bytearray", "tuple",
                 "list", "dict", "int", "float", "str", "bool", "bytes")},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` into numpy arrays and plain containers."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._storages: dict[str, _Storage] = {}
    self.opaque: set[str] = set()

  def find_class(self, module, name):
    key = (module, name)
    if key in _REBUILD_FUNCTIONS:
      return _REBUILD_FUNCTIONS[key]
    if key in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[key]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _TorchDtype(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name, _TORCH_DTYPES[name])
    self.opaque.add(f"{module}.{name}")
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _TorchDtype):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      flat, byteorder = self._load_storage(key, storage_type.numpy_dtype, numel)
      self._storages[key] = _Storage(key, flat, byteorder)
    return self._storages[key]


# ----------------------------------------------------------------------------
# File formats
# ----------------------------------------------------------------------------

def _load_zip(file: BinaryIO, path: str) -> Any:
  with zipfile.ZipFile(file) as zf:
    names = zf.namelist()
    roots = [n[: -len("data.pkl")] for n in names
             if n.endswith("data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
      raise CheckpointReadError(
          f"{path}: a zip file but not a torch checkpoint (expected one "
          f"'<root>/data.pkl', found {len(roots)})")
    root = roots[0]
    byteorder = "little"
    if root + "byteorder" in names:
      byteorder = zf.read(root + "byteorder").decode().strip()
    order = "<" if byteorder == "little" else ">"

    def load_storage(key, dtype, numel):
      record = f"{root}data/{key}"
      try:
        raw = zf.read(record)
      except KeyError:
        raise pickle.UnpicklingError(f"storage record {record!r} is missing") from None
      dtype = np.dtype(dtype).newbyteorder(order)
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"storage record {record!r} holds {len(raw)} bytes, {numel} elements of "
            f"{dtype.name} need {numel * dtype.itemsize}")
      return np.frombuffer(raw, dtype=dtype, count=numel), order

    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(root + "data.pkl")), load_storage)
    return unpickler.load()


def _torch_to_numpy(obj):
  import torch  # pylint: disable=g-import-not-at-top

  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()
  if isinstance(obj, Mapping):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _torch_to_numpy(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v) for v in obj)
  return obj


def _load_legacy(file: BinaryIO, path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointReadError(
        f"{path}: a legacy (pre-zip) torch checkpoint; reading it needs torch. "
        "Install torch, or re-save it with torch >= 1.6 (torch.save(torch.load(f), f)).") from None
  try:
    obj = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:   # weights_only refuses foreign classes
    raise CheckpointReadError(
        f"{path}: a legacy (pre-zip) torch checkpoint holding objects that "
        f"torch.load(weights_only=True) refuses ({e}). Re-save only its weights with "
        "torch >= 1.6: torch.save({'state_dict': ckpt['state_dict']}, 'new.pth').") from e
  return _torch_to_numpy(obj)


def load_pickle(path: str | os.PathLike) -> Any:
  """Loads the object tree of a torch checkpoint, tensors as numpy arrays.

  Raises:
    CheckpointReadError: the file is missing, truncated, corrupt or not a
      torch checkpoint; the message names the file.
  """
  path = os.fspath(path)
  file_path = epath.Path(path)       # local, gs://, ...
  if not file_path.is_file():
    raise CheckpointReadError(f"{path}: no such checkpoint file")
  try:
    with file_path.open("rb") as f:  # zipfile and torch.load read (and seek) the file object
      if zipfile.is_zipfile(f):
        f.seek(0)
        return _load_zip(f, path)
      f.seek(0)
      head = f.read(2)
      if head[:1] == b"\x80":       # a bare pickle: the legacy torch format
        f.seek(0)
        return _load_legacy(f, path)
  except CheckpointReadError:
    raise
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError,
          TypeError, IndexError, AttributeError, RuntimeError, OSError) as e:
    raise CheckpointReadError(f"{path}: unreadable torch checkpoint "
                              f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
  raise CheckpointReadError(f"{path}: not a torch checkpoint (neither a torch zip "
                            "archive nor a pickle)")


# ----------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TorchCheckpoint:
  """The weights and metadata of one checkpoint file.

  Attributes:
    path: the file read.
    state_dict: flat ``{key: np.ndarray}``, ``module.`` prefixes stripped.
    meta: the checkpoint's ``meta`` dict (mmengine/mmcv), or None.
    source_key: the top-level entry holding the weights (``'state_dict'``,
      ``'model'``...), or None for a bare state dict.
    skipped: keys of the weights entry that were not arrays.
    opaque_classes: classes named in the file that were not constructed.
  """
  path: str
  state_dict: dict[str, np.ndarray]
  meta: dict | None
  source_key: str | None
  skipped: list[str]
  opaque_classes: list[str]


def _flatten_arrays(tree: Mapping, prefix: str, out: dict, skipped: list):
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, np.ndarray):
      out[key] = v
    elif isinstance(v, Mapping):
      _flatten_arrays(v, key + ".", out, skipped)
    else:
      skipped.append(key)


def read_checkpoint(path: str | os.PathLike, key: str | None = None) -> TorchCheckpoint:
  """Reads a torch checkpoint into a flat numpy state dict plus its ``meta``.

  Args:
    path: a ``.pth``/``.pt`` file written by ``torch.save``.
    key: the top-level entry holding the weights; by default the first of
      :data:`STATE_DICT_KEYS` present, else the whole file is the state dict.

  Raises:
    CheckpointReadError: unreadable file, or no weights in it.
  """
  path = os.fspath(path)
  obj = load_pickle(path)
  opaque = sorted({type(o).qualname for o in _walk(obj) if isinstance(o, OpaqueObject)})
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else None
  if key is not None:
    if key not in obj:
      raise CheckpointReadError(f"{path}: no entry {key!r}; top-level keys: {list(obj)[:20]}")
    source_key = key
  else:
    source_key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
  weights = obj[source_key] if source_key is not None else obj
  if not isinstance(weights, Mapping):
    raise CheckpointReadError(f"{path}: entry {source_key!r} is not a state dict")
  state, skipped = {}, []
  _flatten_arrays(weights, "", state, skipped)
  if source_key is None:
    skipped = [k for k in skipped if k != "meta"]
  if not state:
    raise CheckpointReadError(f"{path}: no tensors found (top-level keys: {list(obj)[:20]})")
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
  return TorchCheckpoint(path=path, state_dict=state, meta=dict(meta) if meta else None,
                         source_key=source_key, skipped=skipped, opaque_classes=opaque)


def load_state_dict(path: str | os.PathLike, key: str | None = None
                    ) -> tuple[dict[str, np.ndarray], dict | None]:
  """``(state_dict, meta)`` of a torch checkpoint; see :func:`read_checkpoint`."""
  ckpt = read_checkpoint(path, key)
  return ckpt.state_dict, ckpt.meta


def _walk(obj, depth: int = 0):
  """Yields every object of a loaded tree (bounded depth: meta may nest)."""
  yield obj
  if depth > 20:
    return
  if isinstance(obj, Mapping):
    children = list(obj.values())
  elif isinstance(obj, (list, tuple, set, frozenset)):
    children = list(obj)
  elif isinstance(obj, OpaqueObject):
    children = [obj.args, obj.kwargs, obj.state, obj.items, obj.list_items]
  else:
    children = []
  for child in children:
    yield from _walk(child, depth + 1)

"""Name-based mapping between official PyTorch state dicts and flax variables.

Our modules are named after the torch modules they port, so the torch key of a
flax leaf is its module path joined with '.' plus the torch name of the leaf:

  ===========  ==============  ==================  ================================
  collection   flax leaf       torch leaf          layout change
  ===========  ==============  ==================  ================================
  params       kernel (4-D)    weight              OIHW -> HWIO (transpose 2,3,1,0)
  params       kernel (2-D)    weight              (out, in) -> (in, out)
  params       scale           weight              none (norm affine weight)
  params       bias            bias                none
  batch_stats  mean / var      running_mean / _var none
  params       anything else   same name           none, or a reshape that only
                                                   adds/removes singleton axes
  ===========  ==============  ==================  ================================

Parameters that have an awkward torch layout (e.g. ``nn.MultiheadAttention``'s
packed ``in_proj_weight``) are stored by our modules in the torch layout under
the torch name, so nothing model-specific is needed here.

Every torch key must be consumed or match an ignore pattern, and every flax leaf
must be found, or :class:`ConversionError` lists them by name.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import flax
import numpy as np

_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}

# Keys that never carry information for a JAX model.
DEFAULT_IGNORE = (r".*\.num_batches_tracked$",)


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message names the keys."""


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The official state-dict key of the flax leaf at ``path``."""
  *modules, leaf = path
  if collection == "batch_stats":
    leaf = _STAT_NAMES.get(leaf, leaf)
  elif leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(list(modules) + [leaf])


def _to_flax_layout(name: str, value: np.ndarray, target_shape, key: str) -> np.ndarray:
  target_shape = tuple(target_shape)
  if name == "kernel" and value.ndim == 4 and len(target_shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif name == "kernel" and value.ndim == 2 and len(target_shape) == 2:
    value = value.T
  if value.shape != target_shape:
    squeeze_src = tuple(d for d in value.shape if d != 1)
    squeeze_dst = tuple(d for d in target_shape if d != 1)
    if squeeze_src == squeeze_dst:
      value = value.reshape(target_shape)
    else:
      raise ConversionError(
          f"Shape mismatch for {key!r}: checkpoint has {tuple(value.shape)} "
          f"(after layout change), the model expects {target_shape}")
  return value


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  if name == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if name == "kernel" and value.ndim == 2:
    return value.T
  return value


def torch_to_flax(state: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
                  prefix: str = "", ignore: Iterable[str] = (), strict: bool = True):
  """Maps an official state dict onto the structure of ``template``.

  Args:
    state: torch key -> numpy array (a checkpoint's ``state_dict``).
    template: flax variables (arrays or ShapeDtypeStructs), e.g. from
      ``jax.eval_shape(model.init, ...)``; gives the structure and shapes.
    prefix: prepended to every derived torch key (e.g. ``'backbone.'`` when the
      template is a bare backbone but the checkpoint is a full segmentor).
    ignore: regexes of torch keys to skip silently (added to ``num_batches_tracked``).
    strict: raise on missing or unexpected keys; otherwise only report them.

  Returns:
    ``(variables, report)``: numpy variables with the template's structure, and a
    dict with ``missing`` (flax leaves without a torch key), ``unexpected`` (torch
    keys not used and not ignored) and ``ignored`` key lists.
  """
  patterns = [re.compile(p) for p in tuple(DEFAULT_IGNORE) + tuple(ignore)]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  out, used, missing = {}, set(), []
  for full_path, leaf in flat.items():
    collection, path = full_path[0], full_path[1:]
    key = prefix + torch_key(collection, path)
    if key not in state:
      missing.append(key)
      continue
    value = np.asarray(state[key])
    out[full_path] = _to_flax_layout(path[-1], value, leaf.shape, key).astype(
        np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else value.dtype)
    used.add(key)
  ignored = [k for k in state if k not in used and any(p.match(k) for p in patterns)]
  unexpected = [k for k in state if k not in used and k not in set(ignored)]
  report = {"missing": missing, "unexpected": unexpected, "ignored": ignored}
  if strict and (missing or unexpected):
    lines = []
    if missing:
      lines.append(f"{len(missing)} model weights missing from the checkpoint: {missing[:20]}"
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"{len(unexpected)} checkpoint keys the model does not use: {unexpected[:20]}"
                   + (" ..." if len(unexpected) > 20 else ""))
    raise ConversionError("Checkpoint does not fit the model:\n  " + "\n  ".join(lines))
  return flax.traverse_util.unflatten_dict(out), report


def flax_to_torch(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """The inverse mapping: flax variables -> official-style state dict."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  return {prefix + torch_key(p[0], p[1:]): _to_torch_layout(p[-1], np.asarray(v))
          for p, v in flat.items()}

"""The converted-checkpoint format and merging partial (backbone) checkpoints.

A converted checkpoint is a directory::

  OUT_DIR/variables/   orbax StandardCheckpointer of {'params': ..., 'batch_stats': ...}
  OUT_DIR/meta.json    {'model', 'num_classes', 'source', 'report', ...}

written by ``python -m offseg_jax.convert``. A backbone-only checkpoint holds
just ``params/backbone`` and ``batch_stats/backbone``; a trainer initialises
fresh variables and calls :func:`merge_into` to put it in place.

``OUT_DIR`` may be local or a ``gs://`` (or other ``etils.epath``) URL: the
directory checks and ``meta.json`` go through epath, the arrays through orbax
(which handles such paths itself).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Mapping

from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from input_pipeline import storage

VARIABLES_DIR = "variables"
META_FILE = "meta.json"


class CheckpointMismatchError(ValueError):
  """Stored variables do not fit the requested structure; names the keys."""


def _flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _name_list(paths, limit: int = 20) -> str:
  names = [_path_str(p) for p in sorted(paths)]
  more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


# The orbax calls, in one place (tests serve them a fake remote file system).

def _orbax_save(path: epath.Path, tree) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()


def _orbax_metadata(path: epath.Path):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(path)


def _orbax_restore(path: epath.Path, target=None):
  with ocp.StandardCheckpointer() as checkpointer:
    if target is None:
      return checkpointer.restore(path)
    return checkpointer.restore(path, target)


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
  """True if ``path`` is a directory written by :func:`save_variables`."""
  path = epath.Path(path)
  return (path / VARIABLES_DIR).is_dir() and (path / META_FILE).is_file()


def _checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  path = storage.absolute(path)
  if is_converted_checkpoint(path):
    return path
  parent = path.parent
  if path.name == VARIABLES_DIR and is_converted_checkpoint(parent):
    return parent
  raise FileNotFoundError(
      f"{path}: not a converted checkpoint (expected {VARIABLES_DIR}/ and {META_FILE}; "
      "create one with `python -m offseg_jax.convert`)")


def save_variables(out_dir: str | os.PathLike, variables: Mapping[str, Any],
                   meta: Mapping[str, Any]) -> str:
  """Writes ``variables`` (numpy or jax arrays) and ``meta`` under ``out_dir``.

  An existing converted checkpoint in ``out_dir`` is overwritten. ``meta`` must
  be JSON-serialisable. Returns the absolute directory (a URL stays a URL).
  """
  out_dir = storage.absolute(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(dict(meta), indent=1, sort_keys=True)   # fail before writing anything
  _orbax_save(out_dir / VARIABLES_DIR, flax.core.unfreeze(variables))
  (out_dir / META_FILE).write_text(text + "\n")
  return os.fspath(out_dir)


def load_meta(path: str | os.PathLike) -> dict:
  """The ``meta.json`` of a converted checkpoint (directory or its variables/)."""
  return json.loads((_checkpoint_dir(path) / META_FILE).read_text())


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """``{'params/backbone/...': shape}`` of every stored array, without reading data."""
  metadata = _orbax_metadata(_checkpoint_dir(path) / VARIABLES_DIR)
  tree = metadata.item_metadata.tree
  return {_path_str(p): tuple(m.shape) for p, m in _flatten(tree).items()}


def _as_restore_target(leaf):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
  return jax.ShapeDtypeStruct(np.shape(leaf), np.result_type(leaf), sharding=sharding)


def load_variables(path: str | os.PathLike, target: Mapping[str, Any] | None = None):
  """Restores the variables of a converted checkpoint.

  Args:
    path: the checkpoint directory (or its ``variables/`` subdirectory).
    target: optional pytree of ``jax.ShapeDtypeStruct`` (or arrays) with the
      expected structure; leaves with a ``sharding`` are restored as jax arrays
      with that sharding, the others as numpy arrays. Dtypes are cast to the
      target's.

  Returns:
    The variables dict (numpy arrays when no target/sharding is given).

  Raises:
    CheckpointMismatchError: the stored structure or shapes differ from
      ``target``; the message names every differing key.
  """
  ckpt_dir = _checkpoint_dir(path)
  variables_path = ckpt_dir / VARIABLES_DIR
  if target is None:
    return _orbax_restore(variables_path)
  target = jax.tree.map(_as_restore_target, flax.core.unfreeze(target))
  stored = {tuple(k.split("/")): v for k, v in stored_shapes(ckpt_dir).items()}
  wanted = {p: tuple(leaf.shape) for p, leaf in _flatten(target).items()}
  absent = set(wanted) - set(stored)
  extra = set(stored) - set(wanted)
  shapes = sorted(p for p in set(wanted) & set(stored) if wanted[p] != stored[p])
  if absent or extra or shapes:
    lines = []
    if absent:
      lines.append(f"{len(absent)} expected arrays are not in the checkpoint: "
                   f"{_name_list(absent)}")
    if extra:
      lines.append(f"{len(extra)} stored arrays are not expected: {_name_list(extra)}")
    if shapes:
      lines.append(f"{len(shapes)} shape mismatches: " + ", ".join(
          f"{_path_str(p)} stored {stored[p]} expected {wanted[p]}" for p in shapes[:20]))
    raise CheckpointMismatchError(f"{ckpt_dir} does not fit the model:\n  " + "\n  ".join(lines))
  return _orbax_restore(variables_path, target)


@dataclasses.dataclass(frozen=True)
class MergeReport:
  """What :func:`merge_into` did; ``str()`` gives a one-line summary.

  Attributes:
    replaced: leaf paths ('params/backbone/...') taken from the checkpoint.
    kept: leaf paths left as they were (e.g. the decode head, or weights the
      checkpoint lacks).
    replaced_subtrees: the largest subtrees replaced entirely.
  """
  replaced: list[str]
  kept: list[str]
  replaced_subtrees: list[str]

  def __str__(self):
    subtrees = ", ".join(self.replaced_subtrees[:8])
    if len(self.replaced_subtrees) > 8:
      subtrees += f", ... ({len(self.replaced_subtrees) - 8} more)"
    return (f"{len(self.replaced)} arrays replaced ({subtrees}); "
            f"{len(self.kept)} kept")


def _largest_subtrees(replaced: set, all_paths) -> list[str]:
  total, done = collections.Counter(), collections.Counter()
  for path in all_paths:
    for depth in range(1, len(path) + 1):
      total[path[:depth]] += 1
      if path in replaced:
        done[path[:depth]] += 1
  subtrees = set()
  for path in replaced:
    depth = next(d for d in range(1, len(path) + 1) if done[path[:d]] == total[path[:d]])
    subtrees.add(path[:depth])
  return sorted(_path_str(p) for p in subtrees)


def merge_into(variables: Mapping[str, Any], partial: Mapping[str, Any]):
  """Replaces the leaves of ``variables`` that ``partial`` provides.

  Typical use: fresh variables from ``model.init`` and a backbone-only
  converted checkpoint (``{'params': {'backbone': ...}, 'batch_stats': {...}}``).
  Every leaf of ``partial`` must exist in ``variables`` with the same shape;
  values are cast to the existing dtype, and placed with the existing sharding
  when the existing leaf is a jax array.

  Returns:
    ``(merged, report)``: a new variables dict and a :class:`MergeReport`.

  Raises:
    CheckpointMismatchError: naming leaves of ``partial`` that are absent from
      ``variables`` or have another shape.
  """
  flat = _flatten(variables)
  new = _flatten(partial)
  unknown = sorted(p for p in new if p not in flat)
  mismatched = sorted(p for p in new if p in flat and tuple(np.shape(new[p]))
                      != tuple(np.shape(flat[p])))
  if unknown or mismatched:
    lines = []
    if unknown:
      lines.append(f"{len(unknown)} arrays have no counterpart in the model: "
                   f"{_name_list(unknown)}")
    if mismatched:
      lines.append(f"{len(mismatched)} shape mismatches: " + ", ".join(
          f"{_path_str(p)} checkpoint {tuple(np.shape(new[p]))} model "
          f"{tuple(np.shape(flat[p]))}" for p in mismatched[:20]))
    raise CheckpointMismatchError("Cannot merge the checkpoint:\n  " + "\n  ".join(lines))
  for p, value in new.items():
    old = flat[p]
    value = np.asarray(value).astype(old.dtype)
    if isinstance(old, jax.Array):
      value = jax.device_put(value, old.sharding)
    flat[p] = value
  report = MergeReport(
      replaced=sorted(_path_str(p) for p in new),
      kept=sorted(_path_str(p) for p in flat if p not in new),
      replaced_subtrees=_largest_subtrees(set(new), flat))
  return flax.traverse_util.unflatten_dict(flat), report
